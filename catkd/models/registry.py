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


def model_problem(name: str) -> str | None:
    """Why ``name`` names no model catkd can build (a registered name, or ``timm:NAME``
    of the installed timm), or None."""
    from catkd.models import timm_models

    if name in _REGISTRY:
        return None
    if timm_models.is_timm_name(name):
        return timm_models.timm_name_problem(name)
    return f"unknown model {name!r}; `catkd models` lists them, and timm:NAME builds any timm model"


def model_entry(name: str) -> ModelEntry:
    from catkd.models import timm_models

    if problem := model_problem(name):
        raise UnknownModelError(problem)
    if timm_models.is_timm_name(name):

        def build(num_classes: int, bias: bool = False) -> CAMClassifier:
            return timm_models.build_timm(name, num_classes, bias=bias)

        return ModelEntry(name, build, timm_models.timm_input_size(name), "timm")
    return _REGISTRY[name]


def build_model(name: str, num_classes: int, *, bias: bool = False) -> CAMClassifier:
    """Build ``name`` in CAM form; ``bias=True`` only for a converted teacher."""
    return model_entry(name).builder(num_classes=num_classes, bias=bias)


def model_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The input (mean, std) a model's weights expect when the model says (a timm model's
    pretrained_cfg); None for the zoo, which takes its augmentation spec's."""
    from catkd.models import timm_models

    return timm_models.timm_normalization(name) if timm_models.is_timm_name(name) else None
