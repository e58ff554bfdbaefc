"""A sweep's search space over TrainConfig fields, written on the command line or in YAML.

    beta=grid:0.5,1,2,4,8        every value, each in its own trial (Tune's grid_search)
    student=choice:resnet8,resnet14   one value drawn per trial
    lr=uniform:0.01,0.1          a number drawn uniformly (an integer field: an integer)
    beta=loguniform:0.5,8        drawn uniformly in log space (an integer field: an integer)

Values are typed and checked as ``key=value`` overrides are (pipeline.settings), so
``beta=grid:1,big`` is refused at once, naming ``beta``; a list field's values are YAML
lists (``lr_decay_epochs=grid:[[2],[3]]``). No Ray import here: the space is checked
before anything starts.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from catkd.errors import ConfigError
from pipeline.settings import parse_override

KINDS = ("grid", "choice", "uniform", "loguniform")
# The sweep names every trial's run folder itself.
NOT_SWEPT = ("name", "storage_path")


@dataclass(frozen=True)
class Dimension:
    """One swept field: a list of values (grid, choice) or a range (uniform, loguniform)."""

    field: str
    kind: str
    values: tuple[Any, ...]  # grid, choice: every value; uniform, loguniform: (low, high)
    integer: bool = False  # a range over an int field draws integers

    @property
    def is_range(self) -> bool:
        return self.kind in ("uniform", "loguniform")

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.integer:  # Tune's integer ranges exclude their upper bound
            return (tune.lograndint if self.kind == "loguniform" else tune.randint)(low, high + 1)
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(low, high)

    def describe(self) -> str:
        joined = ",".join(map(str, self.values))
        return f"{self.field}={self.kind}:{joined}"


def parse_dimension(item: str, config_cls: type) -> Dimension:
    """``FIELD=KIND:VALUES`` (or ``FIELD=[v1, v2]``, a grid) -> a checked Dimension."""
    key, sep, spec = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"space: expected FIELD=KIND:VALUES (KIND one of {', '.join(KINDS)}), got {item!r}")
    hints = {f.name: typing.get_type_hints(config_cls)[f.name] for f in dataclasses.fields(config_cls)}
    if key not in hints:
        raise ConfigError(f"space: {key}: unknown field; fields: {', '.join(h for h in hints if h not in NOT_SWEPT)}")
    if key in NOT_SWEPT:
        raise ConfigError(f"space: {key}: the sweep sets it for every trial (its folder under the sweep's)")
    kind, colon, raw = spec.partition(":")
    if not colon and spec.startswith("["):
        kind, raw = "grid", spec
    if kind not in KINDS:
        raise ConfigError(f"space: {key}: unknown kind {kind!r} in {item!r}; kinds: {', '.join(KINDS)}")
    texts = _split_values(key, raw)
    if not texts:
        raise ConfigError(f"space: {key}: no values in {item!r}")
    values = tuple(parse_override(f"{key}={text}", hints)[1] for text in texts)
    if kind in ("grid", "choice"):
        return Dimension(key, kind, values)
    return _range(key, kind, values, hints[key])


def _split_values(key: str, raw: str) -> list[str]:
    """The values' texts: a YAML flow list (for list fields, or quoting), else comma-separated."""
    if raw.strip().startswith("["):
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"space: {key}: {raw!r} is not a YAML list") from None
        if not isinstance(parsed, list):
            raise ConfigError(f"space: {key}: {raw!r} is not a YAML list")
        return [yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip() for v in parsed]
    return [text.strip() for text in raw.split(",") if text.strip()]


def _range(key: str, kind: str, values: tuple[Any, ...], hint: Any) -> Dimension:
    if hint not in (int, float):
        raise ConfigError(f"space: {key}: {kind} draws numbers, but {key} is not a number field: use grid or choice")
    if len(values) != 2:
        raise ConfigError(f"space: {key}: {kind} takes LOW,HIGH, got {len(values)} value(s)")
    low, high = values
    if not low < high:
        raise ConfigError(f"space: {key}: {kind} needs LOW < HIGH, got {low} and {high}")
    if kind == "loguniform" and not low > 0:
        raise ConfigError(f"space: {key}: loguniform needs LOW > 0, got {low}")
    return Dimension(key, kind, (low, high), integer=hint is int)


def space_items(mapping: dict[str, Any]) -> list[str]:
    """A YAML mapping of FIELD to ``KIND:VALUES`` text or a list (a grid), as items."""
    return [f"{k}={_yaml_value(v)}" for k, v in mapping.items()]


def parse_space(items: list[str], config_cls: type) -> list[Dimension]:
    """Every dimension of ``FIELD=KIND:VALUES`` items; a field given twice is refused."""
    dims = [parse_dimension(item, config_cls) for item in items]
    seen: set[str] = set()
    for dim in dims:
        if dim.field in seen:
            raise ConfigError(f"space: {dim.field}: given twice")
        seen.add(dim.field)
    return dims


def _yaml_value(value: Any) -> str:
    if isinstance(value, list):
        return "grid:" + yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def grid_size(dims: list[Dimension]) -> int:
    """Trials per sample: the product of the grids' lengths."""
    return math.prod(len(d.values) for d in dims if d.kind == "grid")


def check_against(dims: list[Dimension], base: Any) -> None:
    """Every value (or range end) a trial may get, in ``base``: a value the config
    itself refuses (``lr=grid:0.1,-1``) is refused now, naming the field."""
    for dim in dims:
        for value in dim.values:
            try:
                dataclasses.replace(base, **{dim.field: value})
            except ConfigError as exc:
                raise ConfigError(f"space: {exc}") from None
