"""One conversion from classifier form to CAM form, for every architecture.

Two entry points:

* ``cam_from_classifier(model)``: any classifier whose head is global average pooling
  followed by one Linear layer becomes a ``CAMClassifier`` (traced with torch.fx).
* ``cam_around(backbone, head, ...)``: a backbone and the Linear layer after its global
  pooling, already found (timm models, whose ``forward_head`` is traced alone).

Weights are loaded by ``catkd.models.checkpoints``.

Refused, with a ``ConversionError`` that says why: a model torch.fx cannot trace; a
head that is not exactly [global average pooling] -> [flatten / dropout]* -> [one
Linear] (VGG-style multi-layer heads, max pooling, attention pooling); an average
pooling whose window is not provably global (``nn.AvgPool2d(k)``: use adaptive pooling).
Dropout between pooling and Linear is dropped: it is the identity in evaluation, so
logits are unchanged.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from catkd.errors import CatkdError
from catkd.models.cam import CAMClassifier


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
