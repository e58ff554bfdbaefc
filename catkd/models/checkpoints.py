"""Weights into CAM models: checkpoints in classifier form (ours, torchvision's, timm's,
the reference code base's CIFAR teachers) or in CAM form, as a state dict or
``.safetensors``; the Linear head becomes the 1x1 CAM head. A checkpoint that does not fit
is refused in one line naming the file, the architecture asked for and the one the
weights look like (``identify_architecture``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

import torch

from catkd.errors import first_line
from catkd.models.cam import CAMClassifier
from catkd.models.convert import CheckpointMismatchError, ConversionError
from catkd.models.identify import identify_architecture
from catkd.models.registry import build_model

CHECKPOINT_FORMAT = "catkd.model"
CHECKPOINT_VERSION = 1


def _strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel / DDP checkpoints prefix every key with "module."."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def _describe(state: Mapping[str, torch.Tensor]) -> str:
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    head = f", last Linear {tuple(weights[-1].shape)} (classes x features)" if weights else ""
    return f"{len(state)} tensors{head}"


def load_state_into(
    model: CAMClassifier, state: Mapping[str, torch.Tensor], *, arch: str, source: str = "checkpoint"
) -> None:
    """Load classifier-form or CAM-form weights into ``model`` (built as ``arch``).

    Raises ``CheckpointMismatchError`` naming the checkpoint's likely architecture and
    ``arch`` when the weights do not fit.
    """
    state = _strip_module_prefix(state)
    if "head.weight" in state:  # already in CAM form (our own checkpoints)
        cam_state = dict(state)
    else:
        cam_state = _classifier_to_cam_state(model, state, arch=arch, source=source)
    if model.bias is not None and "bias" not in cam_state:
        cam_state["bias"] = torch.zeros(model.num_classes)
    if model.bias is None and "bias" in cam_state:
        if torch.count_nonzero(cam_state["bias"]):
            raise CheckpointMismatchError(
                f"{source}: has a non-zero classifier bias but {arch} was built without one; build the teacher with "
                "bias=True"
            )
        del cam_state["bias"]
    try:
        model.load_state_dict(cam_state, strict=True)
    except RuntimeError as exc:
        raise _mismatch(state, arch, model.num_classes, source, _key_difference(model, cam_state, exc)) from None


def _classifier_to_cam_state(
    model: CAMClassifier, state: dict[str, torch.Tensor], *, arch: str, source: str
) -> dict[str, torch.Tensor]:
    key = model.source_head
    if f"{key}.weight" not in state:
        raise _mismatch(state, arch, model.num_classes, source, f"no classifier weights {key}.weight")
    weight = state[f"{key}.weight"]
    expected = (model.num_classes, model.num_features)
    if tuple(weight.shape) != expected:
        raise _mismatch(
            state,
            arch,
            model.num_classes,
            source,
            f"{key}.weight has shape {tuple(weight.shape)}, {arch} needs {expected}",
        )
    cam_state = {f"backbone.{k}": v for k, v in state.items() if not k.startswith(f"{key}.")}
    cam_state["head.weight"] = weight.reshape(*expected, 1, 1)
    if f"{key}.bias" in state:
        cam_state["bias"] = state[f"{key}.bias"]
    return cam_state


def _mismatch(
    state: Mapping[str, torch.Tensor], arch: str, num_classes: int, source: str, detail: object
) -> CheckpointMismatchError:
    """One line: the file, the architecture asked for and the one the weights look like;
    the key-level detail only when no registered architecture fits them."""
    guesses = identify_architecture(state)
    if guesses:
        looks_like = f"it looks like {' or '.join(guesses)}"
    else:
        looks_like = f"it matches no registered model ({_describe(state)}): {str(detail)[:300]}"
    return CheckpointMismatchError(f"{source}: weights do not fit {arch} with {num_classes} classes; {looks_like}")


def _key_difference(module: torch.nn.Module, state: Mapping[str, torch.Tensor], exc: Exception) -> str:
    """How ``state`` differs from ``module``'s own, counted (not the hundreds of keys
    torch lists)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = [
        f"{len(keys)} {what} (first {keys[0]})"
        for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape"))
        if keys
    ]
    return ", ".join(parts) or first_line(exc)


def read_checkpoint(file: str | IO[bytes]) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` (or safetensors) and recognise the forms we accept.

    Returns ``{"state": state_dict, "arch": str | None, "num_classes": int | None}``.
    """
    source = file if isinstance(file, str) else getattr(file, "name", "checkpoint")
    if _is_safetensors(file):
        return {"state": _load_safetensors(file, source), "arch": None, "num_classes": None}
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's first line says what is wrong; the rest is advice about weights_only
        raise ConversionError(f"{source}: cannot be read as a PyTorch checkpoint ({first_line(exc)})") from None
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return {"state": obj["state_dict"], "arch": obj["arch"], "num_classes": obj["num_classes"]}
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):  # the reference code base
        return {"state": obj["model"], "arch": None, "num_classes": None}
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state": obj, "arch": None, "num_classes": None}
    raise ConversionError(f"{source}: not a state dict, a catkd checkpoint, or a dict with a 'model' state dict")


def _is_safetensors(file: str | IO[bytes]) -> bool:
    """safetensors files open with an 8-byte header length, then the JSON header."""
    if isinstance(file, str):
        with open(file, "rb") as f:
            head = f.read(9)
    else:
        position = file.tell()
        head = file.read(9)
        file.seek(position)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _load_safetensors(file: str | IO[bytes], source: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load
    except ImportError:
        raise ConversionError(f"{source}: a .safetensors file needs safetensors: pip install 'catkd[timm]'") from None
    data = open(file, "rb").read() if isinstance(file, str) else file.read()
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise ConversionError(f"{source}: cannot be read as safetensors ({str(exc)[:200]})") from None


def load_checkpoint(file: str | IO[bytes], arch: str, num_classes: int) -> CAMClassifier:
    """Build ``arch`` in CAM form (with bias, as a teacher) and load ``file`` into it."""
    source = file if isinstance(file, str) else getattr(file, "name", "checkpoint")
    ckpt = read_checkpoint(file)
    if ckpt["arch"] is not None and (ckpt["arch"], ckpt["num_classes"]) != (arch, num_classes):
        raise CheckpointMismatchError(
            f"{source}: is a {ckpt['arch']} checkpoint with {ckpt['num_classes']} classes, not {arch} with "
            f"{num_classes} classes"
        )
    model = build_model(arch, num_classes, bias=True)
    load_state_into(model, ckpt["state"], arch=arch, source=str(source))
    return model


def checkpoint_payload(model: CAMClassifier, arch: str) -> dict[str, Any]:
    """What our own model checkpoints hold: enough to rebuild the model, nothing else."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": arch,
        "num_classes": model.num_classes,
        "state_dict": model.state_dict(),
    }


def load_pretrained_into(
    model: CAMClassifier, state: Mapping[str, torch.Tensor], *, arch: str, source: str = "checkpoint"
) -> bool:
    """Load pretrained classifier-form weights into a model being fine-tuned (a pretrained
    student): the backbone must fit; the classifier is loaded only where its class count
    is the model's (an ImageNet head on 10 classes starts from random, as in timm's
    ``num_classes=``), and its bias only where the model has one. Returns whether the
    classifier was loaded."""
    state = _strip_module_prefix(state)
    key = model.source_head
    backbone = {k: v for k, v in state.items() if not k.startswith(f"{key}.")}
    try:
        model.backbone.load_state_dict(backbone, strict=True)
    except RuntimeError as exc:
        raise _mismatch(
            state, arch, model.num_classes, source, _key_difference(model.backbone, backbone, exc)
        ) from None
    weight = state.get(f"{key}.weight")
    if weight is None or tuple(weight.shape) != (model.num_classes, model.num_features):
        return False
    with torch.no_grad():
        model.head.weight.copy_(weight.reshape_as(model.head.weight))
        if model.bias is not None and f"{key}.bias" in state:
            model.bias.copy_(state[f"{key}.bias"])
    return True
