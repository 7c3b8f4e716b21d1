"""Dotted command-line overrides (`model.connector.kind=attention_pool`) applied to a `Config`.

A key is resolved field by field, so an unknown one is refused with the nearest real key, and a
value is parsed by the field's type; `data.sources.NAME...` may start a new source by its kind.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any

from mm1.config.schema import Config, ConfigError, SourceKind
from mm1.config.validate import validate


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_scalar(key: str, text: str, typ: Any) -> Any:
    """`text` as a value of type `typ` (an optional, enum, bool, int, float or str) or ConfigError naming `key`."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return parse_scalar(key, text, args[0])
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        choices = [m.value for m in typ]
        if text not in choices:
            raise ConfigError(f"{key}: '{text}' is not one of {', '.join(choices)}")
        return typ(text)
    if typ is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got '{text}'")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got '{text}'") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got '{text}'") from None
    if typ is str:
        return text
    raise ConfigError(f"{key}: cannot be set from the command line")


# The familiar keys of the default sources, kept as names for their place in `data.sources`.
ALIASES = {
    "data.mixture.caption": "data.sources.caption.weight",
    "data.mixture.interleaved": "data.sources.interleaved.weight",
    "data.mixture.text": "data.sources.text.weight",
    "data.caption_shards": "data.sources.caption.paths",
    "data.interleaved_shards": "data.sources.interleaved.paths",
    "data.text_shards": "data.sources.text.paths",
    "data.sft_json": "data.sft_sources.sft.paths",
    "model.vision_init": "model.vision.init",
}


def _step_into_dict(node: dict, name: str, key: str, value_type: Any, is_last: bool, parts: list[str],
                    text: str) -> Any:
    """One step of a dotted key into a `dict[str, SourceConfig]` field; a new name starts a new entry."""
    if is_last:
        raise ConfigError(f"{key}: is a source; set one of its keys, e.g. {key}.weight=...")
    if name not in node:
        if parts[-1] != "kind" or len(parts) < 2:
            raise ConfigError(f"{key}: '{name}' is not a source here ({', '.join(node) or 'none'}); "
                              f"a new source starts with its kind, e.g. {'.'.join(parts[:-1])}.kind=caption")
        node[name] = value_type(kind=parse_scalar(key, text.strip(), SourceKind))
    return node[name]


def apply_override(cfg: Config, assignment: str) -> None:
    """Apply one `dotted.key=value` assignment to `cfg` in place, or raise ConfigError."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' is not of the form key=value")
    key, text = assignment.split("=", 1)
    key = ALIASES.get(key.strip(), key.strip())
    node: Any = cfg
    parts = key.split(".")
    value_type: Any = None
    for depth, name in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            node = _step_into_dict(node, name, key, value_type, last, parts, text)
            continue
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"unknown config key '{key}': '{'.'.join(parts[:depth])}' is a value")
        names = [f.name for f in dataclasses.fields(node)]
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean '{'.'.join([*parts[:depth], near[0]])}'?)" if near else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        typ = _field_types(type(node))[name]
        if last:
            if dataclasses.is_dataclass(getattr(node, name)) or isinstance(getattr(node, name), dict):
                raise ConfigError(f"{key}: is a section; set one of its keys, e.g. {key}.<name>=...")
            setattr(node, name, parse_scalar(key, text.strip(), typ))
        else:
            if typing.get_origin(typ) is dict:
                value_type = typing.get_args(typ)[1]
            node = getattr(node, name)


def apply_overrides(cfg: Config, assignments: list[str]) -> Config:
    """Apply every assignment in order, then validate the result."""
    for assignment in assignments:
        apply_override(cfg, assignment)
    validate(cfg)
    return cfg
