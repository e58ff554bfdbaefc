"""A teacher's weights file: the URL the user gave, else the hub file its pretrained
spec names. One function for every command that loads a teacher (cache build, verify,
online distillation), so each reads the same bytes and names the same source."""

from __future__ import annotations

from catkd.errors import ConfigError
from catkd.models.hub import resolve_weights, wants_pretrained
from pipeline.storage import filesystem

PRETRAINED_EXAMPLE = "timm:resnet50.a1_in1k:pretrained=true or tv_resnet50:weights=IMAGENET1K_V2"


def check_weights_given(model: str, weights: str | None, field: str) -> None:
    """Refuse a teacher with neither a weights URL nor a pretrained spec."""
    if weights is None and not wants_pretrained(model):
        raise ConfigError(
            f"{field}: required for teacher {model}, whose spec names no pretrained weights (give a checkpoint URL, "
            f"or a pretrained spec such as {PRETRAINED_EXAMPLE})"
        )


def read_weights(model: str, weights: str | None, field: str = "weights") -> tuple[bytes, str]:
    """The bytes of the weights of ``model`` and where they were read: ``weights`` (any
    fsspec URL) when given, else the hub file of its pretrained spec (fetched into the
    hub's cache unless offline)."""
    check_weights_given(model, weights, field)
    url = weights if weights is not None else resolve_weights(model)
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path), url
    except FileNotFoundError:
        raise ConfigError(f"{field}: {url}: no such file") from None
