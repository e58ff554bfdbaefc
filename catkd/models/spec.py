"""The options part of a model spec: ``NAME:key=value,key=value``.

One parser for every kind of name: ``timm:resnet50.a1_in1k:pretrained=true``,
``timm:convnext_atto:head_norm_first=true``, ``tv_resnet50:weights=IMAGENET1K_V2``.
Values are read as YAML scalars (``true`` is a bool, ``3`` an int, anything else a string).
"""

from __future__ import annotations

from typing import Any

import yaml

from catkd.errors import CatkdError


class ModelSpecError(CatkdError, ValueError):
    """A model spec whose options cannot be read."""


def parse_options(options: str, spec: str) -> dict[str, Any]:
    """``"a=1,b=true"`` -> ``{"a": 1, "b": True}``; ``spec`` names the whole spec in errors."""
    parsed: dict[str, Any] = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ModelSpecError(f"{spec}: expected NAME:key=value[,key=value], got option {item!r}")
        parsed[key] = yaml.safe_load(value)
    return parsed
