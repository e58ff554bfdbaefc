"""Models in CAM form: ``build_model(name, num_classes)`` returns a module whose forward
gives ``(logits, cam)``. Importing this package registers the whole zoo."""

from catkd.models import cifar_mobilenet, cifar_resnet, cifar_resnetv2, cifar_shufflenet, cifar_vgg, cifar_wrn, imagenet  # noqa: F401
from catkd.models.cam import CAMClassifier
from catkd.models.checkpoints import checkpoint_payload, load_checkpoint, load_state_into, read_checkpoint
from catkd.models.convert import CheckpointMismatchError, ConversionError, cam_from_classifier
from catkd.models.identify import identify_architecture
from catkd.models.registry import build_model, list_models, model_entry, model_normalization, model_problem

__all__ = [
    "CAMClassifier",
    "CheckpointMismatchError",
    "ConversionError",
    "build_model",
    "cam_from_classifier",
    "checkpoint_payload",
    "identify_architecture",
    "list_models",
    "load_checkpoint",
    "load_state_into",
    "model_entry",
    "model_normalization",
    "model_problem",
    "read_checkpoint",
]
