"""A `Config` to and from JSON: every run writes its resolved config, and reads it back strictly."""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
from pathlib import Path
from typing import Any

from mm1.config.overrides import parse_scalar
from mm1.config.schema import Config, ConfigError
from mm1.config.validate import validate


def to_dict(cfg: Any) -> dict[str, Any]:
    def convert(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(dataclasses.asdict(cfg))


def _value_from_dict(typ: Any, value: Any, full: str) -> Any:
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{full}: expected a section, got {value!r}")
        return from_dict(typ, value, prefix=f"{full}.")
    if typing.get_origin(typ) is dict:
        item = typing.get_args(typ)[1]
        if not isinstance(value, dict):
            raise ConfigError(f"{full}: expected a mapping of names to sections, got {value!r}")
        return {k: _value_from_dict(item, v, f"{full}.{k}") for k, v in value.items()}
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        return parse_scalar(full, str(value), typ)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Rebuild a config from `to_dict` output; unknown keys raise, missing keys keep defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'")
        kwargs[key] = _value_from_dict(hints[key], value, full)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field (a source's kind) is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def save(cfg: Config, path: str | Path) -> None:
    from mm1.files import write_json

    write_json(Path(path), to_dict(cfg))


MOVED = {("model", "vision_init"): ("model", "vision", "init")}  # keys of configs saved by earlier versions


def from_saved(data: dict[str, Any]) -> Config:
    """A `Config` from a saved config.json, keys that have moved since it was written moved too."""
    for old, new in MOVED.items():
        section = data.get(old[0])
        if isinstance(section, dict) and old[1] in section:
            value = section.pop(old[1])
            section.setdefault(new[1], {}).setdefault(new[2], value)
    return from_dict(Config, data)


def load(path: str | Path) -> Config:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    return validate(from_saved(data))
