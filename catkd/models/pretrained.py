"""A model with the weights its spec names: ``build_model`` gives the architecture with
random weights; a pretrained spec (``timm:NAME.TAG:pretrained=true``,
``tv_NAME:weights=ENUM``) then gets the hub's file (``catkd.models.hub``). This is how a
student is made; a teacher's weights go through ``load_checkpoint`` (its head must fit)."""

from __future__ import annotations

from catkd.models.cam import CAMClassifier
from catkd.models.checkpoints import load_pretrained_into, read_checkpoint
from catkd.models.hub import resolve_weights, wants_pretrained
from catkd.models.registry import build_model


def build_pretrained(name: str, num_classes: int, *, bias: bool = False) -> CAMClassifier:
    """``name`` in CAM form, with its spec's pretrained weights where it names them. The
    classifier is kept where its class count is ``num_classes``; otherwise only the
    backbone is pretrained (fine-tuning an ImageNet model on another label set)."""
    model = build_model(name, num_classes, bias=bias)
    if wants_pretrained(name):
        path = resolve_weights(name)
        load_pretrained_into(model, read_checkpoint(path)["state"], arch=name, source=path)
    return model
