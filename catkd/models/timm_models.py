"""timm models as teachers and students: ``timm:NAME[.TAG]``, ``timm:hf-hub:ORG/NAME`` or
``timm:local-dir:PATH``, optionally followed by ``:key=value,...``: ``timm.create_model``
arguments (such as ConvNeXt's ``head_norm_first=true``) and catkd's own ``pretrained=true``
(the hub weights the name points to: ``catkd.models.hub``). Built here with random
weights and put in CAM form by the conversion's own head check (``gap_linear_head``:
global average pooling, then one Linear layer); weights are loaded afterwards
(``catkd.models.checkpoints``), from a file the user gives or the resolved hub file.

The families whose head is global average pooling then one Linear layer convert:
ResNet, EfficientNet, RegNet, ConvNeXt with ``head_norm_first``. Other heads are
refused with the reason (``NO_CAM``). timm is an optional dependency
(``pip install catkd[timm]``), imported only when a ``timm:`` name is used.
"""

from __future__ import annotations

import difflib
from functools import cache
from typing import Any

import torch
import torch.fx

from catkd.errors import CatkdError, first_line
from catkd.models.cam import CAMClassifier
from catkd.models.convert import ConversionError, cam_around, gap_linear_head
from catkd.models.hub_env import hf_cache_dir
from catkd.models.spec import parse_options

PREFIX = "timm:"
# timm's own name prefixes, whose architecture comes from a config.json (timm reads it)
SOURCE_PREFIXES = ("hf-hub:", "local-dir:")
# catkd's options, not create_model's
CATKD_OPTIONS = ("pretrained",)

# Why a family's head has no CAM form, by the model's class name.
NO_CAM = {
    "ConvNeXt": (
        "ConvNeXt's default head pools, then applies a LayerNorm (head.norm) to the pooled vector, then fc; a norm "
        "of the pooled vector has no per-location form. Build it with the LayerNorm before pooling: "
        "timm:{name}:head_norm_first=true"
    ),
    "MobileNetV3": (
        "MobileNetV3's head pools first, then applies a 1x1 convolution and an activation (conv_head) to the pooled "
        "vector before the classifier, so its logits are not a linear map of per-location features"
    ),
    "VisionTransformer": "a ViT classifies a token (class token or pooled tokens), not a spatial feature map",
}


class TimmUnavailableError(CatkdError, ImportError):
    """A timm: model asked for without timm installed."""


def is_timm_name(name: str) -> bool:
    return name.startswith(PREFIX)


def parse_timm_name(name: str) -> tuple[str, dict[str, Any]]:
    """``timm:convnext_atto:head_norm_first=true`` -> ("convnext_atto", {"head_norm_first": True});
    ``timm:hf-hub:timm/resnet18.a1_in1k:pretrained=true`` -> ("hf-hub:timm/resnet18.a1_in1k", {"pretrained": True})."""
    rest = name.removeprefix(PREFIX)
    source = next((p for p in SOURCE_PREFIXES if rest.startswith(p)), "")
    model, _, options = rest.removeprefix(source).partition(":")
    return source + model, parse_options(options, name)


def wants_pretrained(name: str) -> bool:
    return is_timm_name(name) and parse_timm_name(name)[1].get("pretrained") is True


def _timm():
    try:
        import timm
    except ImportError:
        raise TimmUnavailableError("timm: models need timm: pip install 'catkd[timm]'") from None
    return timm


@cache
def _names() -> frozenset[str]:
    return frozenset(_timm().list_models())


def timm_name_problem(name: str) -> str | None:
    """Why ``name`` is not a timm model this timm can build (with close matches), or None."""
    model, options = parse_timm_name(name)
    if options.get("pretrained", False) not in (True, False):
        return f"pretrained: expected true or false, got {options['pretrained']!r}"
    if model.startswith(SOURCE_PREFIXES):
        return None  # its architecture is in its config.json, read when it is built
    if _timm().is_model(model):
        if "." in model:  # a pretrained tag: timm must know it
            try:
                _timm().models.get_pretrained_cfg(model)
            except RuntimeError as exc:
                return (
                    f"{exc} (timm {_timm().__version__}); `timm.list_pretrained('{model.split('.')[0]}*')` lists them"
                )
        return None
    close = difflib.get_close_matches(model.split(".")[0], sorted(_names()), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(PREFIX + c for c in close)}" if close else ""
    return f"unknown timm model {model!r} (timm {_timm().__version__}){hint}"


def build_timm(name: str, num_classes: int, *, bias: bool = False) -> CAMClassifier:
    """``timm:NAME`` with random weights in CAM form, or a ConversionError saying why not."""
    if problem := timm_name_problem(name):
        raise ConversionError(f"{name}: {problem}")
    model_name, kwargs = parse_timm_name(name)
    kwargs = {k: v for k, v in kwargs.items() if k not in CATKD_OPTIONS}
    try:
        model = _timm().create_model(
            model_name, pretrained=False, num_classes=num_classes, cache_dir=hf_cache_dir(), **kwargs
        )
    except TypeError as exc:  # an option the family does not take
        raise ConversionError(f"{name}: timm cannot build it with {kwargs} ({exc})") from None
    except (OSError, RuntimeError) as exc:  # hf-hub: / local-dir: without its config.json
        raise ConversionError(f"{name}: timm cannot read its config ({first_line(exc, 300)})") from None
    family = type(model).__name__
    try:
        head, source_head = _linear_after_gap(model, family)
    except ConversionError as exc:
        reason = NO_CAM.get(family, str(exc)).format(name=name.removeprefix(PREFIX))
        raise ConversionError(
            f"{name}: no CAM form, so it can be neither a CAT-KD teacher nor a CAT-KD student: {reason}"
        ) from None
    # The model itself is the backbone: its forward_features gives the feature map before
    # pooling, with every module as timm wrote it (batch norms keep their training mode,
    # state-dict keys stay timm's); only the classifier leaves it, to become the CAM head.
    model.reset_classifier(0)
    return cam_around(model, head, source_head, bias=bias)


class _Head(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(features)


def _linear_after_gap(model: torch.nn.Module, family: str) -> tuple[torch.nn.Linear, str]:
    """The classifier Linear layer and its name in ``model``, if ``forward_head`` is global
    average pooling of the feature map then that layer (the conversion's own check, on the
    head alone: tracing the whole model would freeze timm's batch norms in one mode)."""
    try:
        traced = torch.fx.symbolic_trace(_Head(model))
    except Exception as exc:  # torch.fx raises many types for untraceable code
        raise ConversionError(f"{family}: torch.fx cannot trace its head ({exc})") from exc
    features, head, qualified = gap_linear_head(traced, family)
    if features.op != "placeholder":
        raise ConversionError(f"{family}: its head computes on the feature map before pooling it")
    return head, qualified.removeprefix("model.")


def pretrained_cfg(model_name: str) -> dict[str, Any]:
    """timm's pretrained config of ``NAME[.TAG]`` (its default tag when none is given),
    or the config.json of an ``hf-hub:`` repo or a ``local-dir:`` folder."""
    from timm.models import _hub

    if model_name.startswith("hf-hub:"):
        cfg = _hub.load_model_config_from_hf(model_name.removeprefix("hf-hub:"), cache_dir=hf_cache_dir())[0]
    elif model_name.startswith("local-dir:"):
        cfg = _hub.load_model_config_from_path(model_name.removeprefix("local-dir:"))[0]
    else:
        cfg = _timm().models.get_pretrained_cfg(model_name)
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def timm_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) the model's pretrained_cfg names: what its weights were trained
    with, so what its inputs must be normalised by. None when the config has none."""
    model_name, _ = parse_timm_name(name)
    try:
        cfg = pretrained_cfg(model_name)
    except Exception:  # a model without a pretrained config, or a repo not cached
        return None
    if "mean" not in cfg or "std" not in cfg:
        return None
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def timm_input_size(name: str) -> int:
    model_name, _ = parse_timm_name(name)
    try:
        return int(pretrained_cfg(model_name)["input_size"][-1])
    except Exception:
        return 224
