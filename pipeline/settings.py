"""Dataclass configurations from YAML and ``key=value`` overrides, checked against the
fields' type hints, so that a wrong value is one line naming its field
(``epochs: expected an integer, got 'abc'``) instead of a traceback later.

    load_settings(TrainConfig, "jobs/configs/demo_catkd.yaml", ["epochs=3", "beta=2.0"])
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
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


def check_fields(config: Any, at_least: dict[str, float] | None = None) -> None:
    """A dataclass config's ``__post_init__`` checks: every field against its type hint
    (types first: later checks compare values), then the lowest value of each field in
    ``at_least`` (None, an unset optional field, passes)."""
    hints = _field_hints(type(config))
    for f in dataclasses.fields(config):
        check_value(f.name, getattr(config, f.name), hints[f.name])
    for name, low in (at_least or {}).items():
        value = getattr(config, name)
        if value is not None and value < low:
            raise ConfigError(f"{name}: must be at least {low}, got {value}")


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


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


def load_settings(
    cls: type[T], path: str | None = None, overrides: list[str] | None = None, sections: tuple[str, ...] = ()
) -> T:
    """``cls`` from a YAML file (optional), then ``key=value`` overrides; every value is
    checked against its field's type, unknown keys and unreadable files are errors.
    ``sections`` are top-level keys of the file that other settings read (``sweep``)."""
    hints = _own_hints(cls)
    values: dict[str, Any] = {}
    if path:
        values = checked_values(cls, {k: v for k, v in read_yaml(path).items() if k not in sections}, path)
    for item in overrides or []:
        key, value = parse_override(item, hints)
        values[key] = value
    return cls(**values)


def checked_values(cls: type, values: dict[str, Any], where: str, noun: str = "config keys") -> dict[str, Any]:
    """``values`` (from a file) as the fields of ``cls`` take them: unknown keys and wrong
    values are a ConfigError that starts with ``where`` (the file, and its section)."""
    hints = _own_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"{where}: unknown {noun} {unknown}; keys: {', '.join(hints)}")
    return {k: check_value(f"{where}: {k}", v, hints[k]) for k, v in values.items()}


def _own_hints(cls: type) -> dict[str, Any]:
    """The type hints of the dataclass fields of ``cls``, in declaration order."""
    hints = _field_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def read_yaml(path: str) -> dict[str, Any]:
    """A config file's top-level mapping, or a ConfigError naming the file."""
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


# ---------------------------------------------------------------- command-line flags
# Commands whose settings are flags (``catkd shard``, ``catkd cache build``) derive them
# from the dataclass: ``num_views`` is ``--num-views``, a bool is ``--name/--no-name``,
# a list takes several values; help is the field's comment and the dataclass default.
# Values go through the same checks as ``key=value`` overrides, and defaults live in
# the dataclass only: a flag not given is not passed on.


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: on its line (or lines), or the comment
    block right above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    starts = [
        (number, match.group(1))
        for number, line in enumerate(lines, 1)
        if (match := re.match(r"    (\w+)\s*:", line)) and match.group(1) in names
    ]
    out = {}
    for k, (number, name) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else number + 1
        inline = [comments[n] for n in range(number, end) if n in comments and lines[n - 1].strip()[:1] != "#"]
        above, n = [], number - 1
        while n in comments and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        text = " ".join(inline or above)
        if text:
            out[name] = text
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def field_table(cls: type, title: str = "fields (key=value)") -> str:
    """Every field of ``cls`` in declaration order, with its type, default and comment:
    the help of commands that take ``key=value`` overrides (``catkd train``, ``catkd
    sweep``), derived from the dataclass as the flags of the others are."""
    hints, comments = _field_hints(cls), field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = _default(f)
        if default is dataclasses.MISSING:
            shown = "(required)"
        elif isinstance(default, list):  # as an override writes it
            shown = "[" + ",".join(map(str, default)) + "]"
        else:
            shown = _shown(default)
        kind = _describe_type(hints[f.name])
        rows.append((f"{f.name}={shown}", kind, comments.get(f.name, "")))
    width = max(len(r[0]) for r in rows) + 2
    kind_width = max(len(r[1]) for r in rows) + 2
    indent = " " * (2 + width + kind_width)
    lines = [f"{title}:"]
    for key, kind, comment in rows:
        text = textwrap.wrap(comment, width=max(40, 118 - len(indent))) or [""]
        lines.append(f"  {key:<{width}}{kind:<{kind_width}}{text[0]}".rstrip())
        lines += [indent + more for more in text[1:]]
    return "\n".join(lines)


def _describe_type(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " | ".join(_describe_type(a) for a in args if a is not type(None)) + " | null"
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin is list:
        return f"list[{_describe_type(args[0]) if args else 'any'}]"
    return getattr(hint, "__name__", str(hint))


def add_flags(parser: Any, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (except ``skip``), into ``parser`` (an argparse
    parser or group); fields without a default are required flags."""
    import argparse

    hints = _field_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint, default = hints[f.name], _default(f)
        flag = "--" + f.name.replace("_", "-")
        help_text = comments.get(f.name, "")
        if default is dataclasses.MISSING:
            kwargs: dict[str, Any] = {"required": True}
        else:
            kwargs = {}
            if "(default:" not in help_text:
                help_text = f"{help_text} (default: {_shown(default)})".strip()
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(_optional(hint)) is list:
            kwargs["nargs"] = "+"
        parser.add_argument(
            flag, dest=f.name, default=argparse.SUPPRESS, help=help_text, metavar=_metavar(hint), **kwargs
        )


def _optional(hint: Any) -> Any:
    """X for ``X | None``."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return options[0] if len(options) == 1 else hint
    return hint


def _metavar(hint: Any) -> str | None:
    if hint is bool:
        return None
    hint = _optional(hint)
    if typing.get_origin(hint) is list:
        hint = (typing.get_args(hint) or (str,))[0]
    if typing.get_origin(hint) is Literal:
        return "{" + ",".join(map(str, typing.get_args(hint))) + "}"
    return {int: "N", float: "X", str: "TEXT"}.get(hint, "VALUE")


def flag_values(cls: type, args: Any) -> dict[str, Any]:
    """The fields of ``cls`` given as flags in ``args``, typed and checked as
    ``key=value`` overrides are; fields not given are left out (their default holds)."""
    hints = _field_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not hasattr(args, f.name):
            continue
        raw, hint = getattr(args, f.name), hints[f.name]
        if isinstance(raw, list):
            element = (typing.get_args(_optional(hint)) or (str,))[0]
            values[f.name] = [parse_override(f"{f.name}={item}", {f.name: element})[1] for item in raw]
        elif isinstance(raw, bool):
            values[f.name] = raw
        else:
            values[f.name] = parse_override(f"{f.name}={raw}", {f.name: hint})[1]
    return values


def check_normalization(cfg: Any) -> None:
    """``mean`` and ``std`` of a config, when set: three values per RGB channel, std positive."""
    for name in ("mean", "std"):
        values = getattr(cfg, name)
        if values is None:
            continue
        if len(values) != 3:
            raise ConfigError(f"{name}: expected 3 values (R, G, B), got {values!r}")
        if name == "std" and min(values) <= 0:
            raise ConfigError(f"std: must be positive, got {values!r}")
