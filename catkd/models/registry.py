"""Model registry: one small builder per variant, registered by name (as in timm)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from catkd.errors import CatkdError
from catkd.models.cam import CAMClassifier

Builder = Callable[..., CAMClassifier]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder
    input_size: int  # the side of the images the model is meant for (32 CIFAR, 224 ImageNet)
    family: str  # "cifar" or "imagenet"


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, builder: Builder, *, input_size: int, family: str) -> None:
    """Register ``builder(num_classes=..., bias=...) -> CAMClassifier`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = ModelEntry(name, builder, input_size, family)


def list_models(family: str | None = None) -> list[str]:
    return [n for n, e in _REGISTRY.items() if family is None or e.family == family]


class UnknownModelError(CatkdError, LookupError):
    """A model name the registry does not hold."""


def model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(_REGISTRY)
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None


def build_model(name: str, num_classes: int, *, bias: bool = False) -> CAMClassifier:
    """Build ``name`` in CAM form; ``bias=True`` only for a converted teacher."""
    return model_entry(name).builder(num_classes=num_classes, bias=bias)
