"""Guess which registered architecture a state dict was saved from (for error messages)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache

import torch

from catkd.models.registry import build_model, list_models

Signature = frozenset[tuple[str, tuple[int, ...]]]


def _state_signature(state: Mapping[str, torch.Tensor]) -> Signature:
    # The CAM-form "bias" is optional (students have none), so it never decides a match.
    return frozenset(
        (k, tuple(v.shape)) for k, v in state.items() if k != "bias" and not k.endswith("num_batches_tracked")
    )


@cache
def _model_signature(name: str, num_classes: int, cam_form: bool) -> Signature:
    model = build_model(name, num_classes, bias=True)
    return _state_signature(model.state_dict() if cam_form else model.classifier_state_dict())


def identify_architecture(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered models (with class counts) whose CAM or classifier form fits ``state``."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    cam_form = "head.weight" in state
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.ndim in (2, 4)]
    if not matrices:
        return []
    num_classes = int((state["head.weight"] if cam_form else matrices[-1]).shape[0])
    candidate = _state_signature(state)
    return [
        f"{name} with {num_classes} classes"
        for name in list_models()
        if _model_signature(name, num_classes, cam_form) == candidate
    ]
