"""One conversion from classifier form to CAM form, for every architecture.

Two entry points:

* ``cam_from_classifier(model)``: any classifier whose head is global average pooling
  followed by one Linear layer becomes a ``CAMClassifier`` (traced with torch.fx).
* ``load_state_into(model, state)`` and ``load_checkpoint(...)``: weights in classifier
  form (ours, torchvision's, the reference code base's CIFAR teachers) or in CAM form
  are loaded into a CAM model; the Linear head becomes the 1x1 CAM head.

Refused, with a ``ConversionError`` that says why: a model torch.fx cannot trace; a
head that is not exactly [global average pooling] -> [flatten / dropout]* -> [one
Linear] (VGG-style multi-layer heads, max pooling, attention pooling); an average
pooling whose window is not provably global (``nn.AvgPool2d(k)``: use adaptive pooling).
Dropout between pooling and Linear is dropped: it is the identity in evaluation, so
logits are unchanged.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import IO, Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from catkd.errors import CatkdError
from catkd.models.cam import CAMClassifier

CHECKPOINT_FORMAT = "catkd.model"
CHECKPOINT_VERSION = 1


class ConversionError(CatkdError, ValueError):
    """A model or checkpoint cannot be put in CAM form."""


class CheckpointMismatchError(ConversionError):
    """A checkpoint's weights are for another architecture or class count."""


# ---------------------------------------------------------------- model conversion


class FeatureGraph(torch.fx.GraphModule):
    """A traced classifier cut just before its global pooling: the CAM backbone."""

    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


_FLATTEN_METHODS = {"flatten", "view", "reshape", "squeeze"}
_FLATTEN_FUNCTIONS = {torch.flatten, torch.squeeze}


def _is_global_avg_pool(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    def is_one(size: Any) -> bool:
        return size == 1 or tuple(size) == (1, 1)

    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, nn.AdaptiveAvgPool2d) and is_one(module.output_size)
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return is_one(node.args[1] if len(node.args) > 1 else node.kwargs["output_size"])
    if node.op == "call_method" and node.target == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dims is not None and sorted(int(d) % 4 for d in dims) == [2, 3]
    return False


def _is_passthrough(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Flatten and dropout between pooling and the Linear layer."""
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.Dropout, nn.Flatten, nn.Identity))
    if node.op == "call_method":
        return node.target in _FLATTEN_METHODS
    if node.op == "call_function":
        return node.target in _FLATTEN_FUNCTIONS or node.target is F.dropout or node.target is operator.getitem
    return False


def _describe_node(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    """What a traced node computes, in the model's own names: ``head.norm (LayerNorm2d)``."""
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    target = getattr(node.target, "__name__", node.target)
    # a module traced into functions: name the module through the parameters it reads
    owner = next(
        (a.target.rsplit(".", 1)[0] for a in node.all_input_nodes if a.op == "get_attr" and "." in a.target), None
    )
    return f"{target}" + (f" of {owner}" if owner else "")


def gap_linear_head(traced: torch.fx.GraphModule, name: str) -> tuple[torch.fx.Node, nn.Linear, str]:
    """In a traced classifier, the node that global average pooling pools (the feature
    map), the Linear layer after it and that layer's qualified name; a ConversionError
    naming what stands in the way when the head is not GAP -> [flatten/dropout] -> Linear."""
    modules = dict(traced.named_modules())
    output = next(n for n in traced.graph.nodes if n.op == "output")
    linear = output.args[0]
    # A flatten or identity after the Linear layer (timm's ClassifierHead) changes nothing.
    while isinstance(linear, torch.fx.Node) and _is_passthrough(linear, modules) and linear.args:
        linear = linear.args[0]
    if not (
        isinstance(linear, torch.fx.Node)
        and linear.op == "call_module"
        and isinstance(modules[linear.target], nn.Linear)
    ):
        found = _describe_node(linear, modules) if isinstance(linear, torch.fx.Node) else repr(linear)
        raise ConversionError(f"{name}: the output is not produced by one nn.Linear layer (it comes from {found})")
    node = linear.args[0]
    while isinstance(node, torch.fx.Node) and _is_passthrough(node, modules):
        node = node.args[0]
    if not (isinstance(node, torch.fx.Node) and _is_global_avg_pool(node, modules)):
        found = _describe_node(node, modules) if isinstance(node, torch.fx.Node) else repr(node)
        raise ConversionError(
            f"{name}: the Linear head {linear.target} is not fed by global average pooling (it is fed by {found}); "
            "only GAP -> [flatten/dropout] -> Linear heads can be written as CAMs"
        )
    return node.args[0], modules[linear.target], str(linear.target)


def cam_around(backbone: nn.Module, head: nn.Linear, source_head: str, *, bias: bool) -> CAMClassifier:
    """A CAMClassifier whose 1x1 CAM head (and bias) is the Linear layer ``head``."""
    backbone.num_features = head.in_features
    cam = CAMClassifier(backbone, head.out_features, bias=bias, source_head=source_head)
    with torch.no_grad():
        cam.head.weight.copy_(head.weight.view_as(cam.head.weight))
        if bias:
            cam.bias.copy_(head.bias if head.bias is not None else torch.zeros_like(cam.bias))
    return cam


def cam_from_classifier(model: nn.Module, *, bias: bool = True) -> CAMClassifier:
    """Rewrite ``GAP -> Linear`` classifier ``model`` in CAM form, weights included."""
    name = type(model).__name__
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # torch.fx raises many types for untraceable code
        raise ConversionError(f"{name}: torch.fx cannot trace this model ({exc})") from exc
    features, head, source_head = gap_linear_head(traced, name)
    traced.graph.erase_node(next(n for n in traced.graph.nodes if n.op == "output"))
    traced.graph.output(features)
    traced.graph.eliminate_dead_code()
    backbone = FeatureGraph(traced, traced.graph, class_name=f"{name}Features")
    backbone.delete_all_unused_submodules()
    return cam_around(backbone, head, source_head, bias=bias)


# ---------------------------------------------------------------- weights


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
        raise _mismatch(state, arch, model.num_classes, source, exc) from None


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
    from catkd.models.identify import identify_architecture

    guesses = identify_architecture(state)
    looks_like = (
        f"it looks like {' or '.join(guesses)}" if guesses else f"it matches no registered model ({_describe(state)})"
    )
    return CheckpointMismatchError(
        f"{source}: weights do not fit {arch} with {num_classes} classes; {looks_like}. Detail: {str(detail)[:400]}"
    )


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
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"{source}: cannot be read as a PyTorch checkpoint ({reason[:200]})") from None
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
    from catkd.models.registry import build_model

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
