"""Dataclass configurations from YAML and ``key=value`` overrides, checked against the
fields' type hints, so that a wrong value is one line naming its field
(``epochs: expected an integer, got 'abc'``) instead of a traceback later.

    load_settings(TrainConfig, "jobs/configs/demo_catkd.yaml", ["epochs=3", "beta=2.0"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union

import yaml

from catkd.errors import ConfigError

T = TypeVar("T")
_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the field ``name`` of type ``hint`` takes it, or a ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return check_value(name, value, option)
            except ConfigError as exc:
                errors.append(exc)
        raise (
            errors[0]
            if len(errors) == 1
            else ConfigError(f"{name}: got {value!r}, which is none of {' / '.join(_describe(o) for o in options)}")
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [check_value(f"{name}[{k}]", v, args[0]) for k, v in enumerate(value)] if args else value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as text, by YAML 1.1's rule
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def parse_override(item: str, hints: dict[str, Any]) -> tuple[str, Any]:
    """``key=value`` -> (key, value typed as the field is). Values are read as YAML
    (numbers, true/false, lists, null); a string field takes the text as written."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r}: expected key=value")
    if key not in hints:
        raise ConfigError(f"{key}: unknown key; keys: {', '.join(hints)}")
    try:
        parsed = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        parsed = raw
    hint = hints[key]
    free_text = _takes_text(hint) and not (parsed is None and type(None) in typing.get_args(hint))
    return key, check_value(key, raw if free_text else parsed, hint)


def _takes_text(hint: Any) -> bool:
    """Whether a field's value is text (a string, or one of a Literal's strings)."""
    if hint is str:
        return True
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(_takes_text(a) for a in args if a is not type(None))
    return typing.get_origin(hint) is Literal and all(isinstance(a, str) for a in args)


def load_settings(cls: type[T], path: str | None = None, overrides: list[str] | None = None) -> T:
    """``cls`` from a YAML file (optional), then ``key=value`` overrides; every value is
    checked against its field's type, unknown keys and unreadable files are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = {k: v for k, v in hints.items() if k in fields}
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(f"{path}: unknown config keys {unknown}; keys: {', '.join(hints)}")
        values = {k: check_value(f"{path}: {k}", v, hints[k]) for k, v in values.items()}
    for item in overrides or []:
        key, value = parse_override(item, hints)
        values[key] = value
    return cls(**values)
