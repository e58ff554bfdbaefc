"""Model registry: one small builder per variant, registered by name (as in timm)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from catkd.errors import CatkdError
from catkd.models.cam import CAMClassifier
from catkd.models.spec import parse_options

Builder = Callable[..., CAMClassifier]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder
    input_size: int  # the side of the images the model is meant for (32 CIFAR, 224 ImageNet)
    family: str  # "cifar" or "imagenet"
    # the model's pretrained weights, where a zoo offers them (torchvision's weights enum)
    weights_enum: Callable[[], type[Enum]] | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    builder: Builder,
    *,
    input_size: int,
    family: str,
    weights_enum: Callable[[], type[Enum]] | None = None,
) -> None:
    """Register ``builder(num_classes=..., bias=...) -> CAMClassifier`` under ``name``
    (random weights: pretrained ones are loaded by ``catkd.models.pretrained``)."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = ModelEntry(name, builder, input_size, family, weights_enum)


def split_spec(name: str) -> tuple[str, dict[str, Any]]:
    """A registered model's spec: ``tv_resnet50:weights=IMAGENET1K_V2`` ->
    ("tv_resnet50", {"weights": "IMAGENET1K_V2"}); a bare name has no options."""
    base, _, options = name.partition(":")
    return base, parse_options(options, name)


def zoo_weights(name: str) -> Enum | None:
    """The weights enum member a registered model's spec names (``weights=NAME``), or None."""
    base, options = split_spec(name)
    if "weights" not in options:
        return None
    enum = _REGISTRY[base].weights_enum()  # type: ignore[misc]  # model_problem checked it
    return enum[str(options["weights"])]


def _zoo_spec_problem(name: str) -> str | None:
    base, options = split_spec(name)
    if base not in _REGISTRY:
        return f"unknown model {base!r}; `catkd models` lists them, and timm:NAME builds any timm model"
    unknown = sorted(set(options) - {"weights"})
    entry = _REGISTRY[base]
    if unknown or ("weights" in options and entry.weights_enum is None):
        what = "weights=NAME (torchvision's weights enums)" if entry.weights_enum else "no options"
        return f"{name}: {base} takes {what}, got {', '.join(unknown or ['weights'])}"
    if "weights" in options:
        members = entry.weights_enum().__members__  # type: ignore[misc]
        if str(options["weights"]) not in members:
            return f"{name}: {base} has no weights {options['weights']!r}; it has {', '.join(members)}"
    return None


def list_models(family: str | None = None) -> list[str]:
    return [n for n, e in _REGISTRY.items() if family is None or e.family == family]


class UnknownModelError(CatkdError, LookupError):
    """A model name the registry does not hold."""


def model_problem(name: str) -> str | None:
    """Why ``name`` names no model catkd can build (a registered name, or ``timm:NAME``
    of the installed timm), or None."""
    from catkd.models import timm_models

    if timm_models.is_timm_name(name):
        return timm_models.timm_name_problem(name)
    return _zoo_spec_problem(name)


def model_entry(name: str) -> ModelEntry:
    from catkd.models import timm_models

    if problem := model_problem(name):
        raise UnknownModelError(problem)
    if timm_models.is_timm_name(name):

        def build(num_classes: int, bias: bool = False) -> CAMClassifier:
            return timm_models.build_timm(name, num_classes, bias=bias)

        return ModelEntry(name, build, timm_models.timm_input_size(name), "timm")
    return _REGISTRY[split_spec(name)[0]]


def build_model(name: str, num_classes: int, *, bias: bool = False) -> CAMClassifier:
    """Build ``name`` in CAM form; ``bias=True`` only for a converted teacher."""
    return model_entry(name).builder(num_classes=num_classes, bias=bias)


def model_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The input (mean, std) a model's weights expect when the model says (a timm model's
    pretrained_cfg); None for the zoo, which takes its augmentation spec's."""
    from catkd.models import timm_models

    return timm_models.timm_normalization(name) if timm_models.is_timm_name(name) else None
