"""Config layering: dataclass defaults -> YAML file -> ``--set key=value`` overrides.

Each component owns a typed dataclass; a run's config nests them. Unknown keys are errors (a
misspelled option must never fall back silently to a default, the classic R2Gen-fork bug), and
values are checked against the field types. The resolved config is plain JSON/YAML-able data.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar, Union

import yaml

from ifnet.errors import DataError, UsageError

_FLOAT_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")

T = TypeVar("T")


class SettingError(ValueError):
    """A setting out of its range, raised by a config dataclass's ``__post_init__``.

    ``field`` is the setting's name within its dataclass; :func:`from_dict` prefixes it with the section, so
    the user reads ``<config>: field 'optim.ema_decay': must be in (0, 1) ...`` in one line."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field} {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` (dataclass, Optional, list, scalars)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, source)
            except DataError as e:
                errors.append(e.detail)
        raise DataError(source, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}", field=where)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise DataError(source, f"must be one of {list(typing.get_args(tp))}, got {value!r}", field=where)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise DataError(source, f"expected a mapping, got {value!r}", field=where)
        return from_dict(tp, value, source=source, prefix=where + ".")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise DataError(source, f"expected a list, got {value!r}", field=where)
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise DataError(source, f"expected a mapping, got {value!r}", field=where)
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DataError(source, f"expected true/false, got {value!r}", field=where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            # YAML 1.1 reads "2e-3" (no dot in the mantissa) as a string; it is a number to every user.
            return float(value)
        raise DataError(source, f"expected a number, got {value!r}", field=where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DataError(source, f"expected an integer, got {value!r}", field=where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise DataError(source, f"expected a string, got {value!r}", field=where)
    return value


def _printable(key: Any) -> str:
    """A key as text for an error message: YAML keys may be numbers, and a newline must not split the line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(key))


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if not isinstance(data, Mapping):  # e.g. a config.json holding a list: a clear error, not AttributeError
        raise DataError(source, f"expected a mapping of settings, got {type(data).__name__}",
                        field=prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(_printable(k) for k in data if k not in fields)
    if unknown:
        raise DataError(source, f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                                f"valid: {', '.join(prefix + k for k in fields)}", field=prefix + unknown[0])
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except SettingError as e:
        raise DataError(source, e.message, field=prefix + e.field) from None
    except (TypeError, ValueError) as e:
        raise DataError(source, str(e), field=prefix.rstrip(".") or None) from None


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) from nested dataclasses."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[keys[-1]] = value


def parse_overrides(items: Sequence[str]) -> dict:
    """``["optim.lr=1e-3", "data.iec=clahe"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_path(tree, key.strip(), value)
    return tree


def deep_merge(base: Mapping, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(p, "config file not found") from None
    except IsADirectoryError:
        raise DataError(p, "is a directory, expected a YAML config file") from None
    except UnicodeDecodeError as e:  # e.g. a binary file given by mistake: one line, no traceback
        raise DataError(p, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.safe_load(text)  # safe_load: a config file never constructs Python objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise DataError(p, f"invalid YAML{at}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DataError(p, "top level must be a mapping of config sections")
    return data


def resolve(cls: type[T], yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls`` <- YAML file <- overrides, validated into a ``cls`` instance."""
    data: dict = to_dict(cls()) if _all_defaults(cls) else {}
    source = "<defaults>"
    if yaml_path is not None:
        data = deep_merge(data, load_yaml(yaml_path))
        source = str(yaml_path)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
        source = f"{source} + --set"
    return from_dict(cls, data, source=source)


def _all_defaults(cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls) if f.init)
