"""Configs: nested dataclasses, TOML presets, `a.b=value` overrides with type coercion,
validation that names the key and the valid choices, and a JSON round trip.

Each component owns its config dataclass next to its code; this module only knows how to
build, override, validate and serialize any of them. Fields declare their valid values
with `choice(...)` or `bounded(...)`; a dataclass may add cross-field checks in `check()`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import tomllib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from underpar.errors import ConfigError

T = TypeVar("T")

# track name -> "module:RootConfigClass"; imported lazily so `underpar --help` stays fast.
TRACKS = {
    "prepare": "underpar.data.prepare:DataConfig",
    "pretrain": "underpar.tracks.pretrain:PretrainConfig",
    "finetune": "underpar.tracks.finetune:FinetuneConfig",
    "randopt": "underpar.tracks.randopt:RandOptConfig",
}


def choice(default: Any, valid: typing.Iterable[Any]) -> Any:
    """A field whose value must be one of `valid`."""
    return dataclasses.field(default=default, metadata={"choices": tuple(valid)})


def bounded(default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    """A numeric field that must lie in [lo, hi] (either end may be open)."""
    return dataclasses.field(default=default, metadata={"range": (lo, hi)})


def nested(cls: type) -> Any:
    """A sub-config field."""
    return dataclasses.field(default_factory=cls)


def items(default: list) -> Any:
    """A list field."""
    return dataclasses.field(default_factory=lambda: list(default))


# ---------------------------------------------------------------------------------------
# building from plain data


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table of settings, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build `cls` from nested plain data; unknown keys and bad values raise ConfigError."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------
# overrides and validation


def _parse_literal(text: str) -> Any:
    """`0.04` -> float, `[3, 5]` -> list, `true` -> bool; anything else stays a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def override(cfg: T, assignment: str) -> T:
    """Return a copy of `cfg` with one `a.b.c=value` assignment applied."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like section.key=value")
    path, text = (s.strip() for s in assignment.split("=", 1))
    keys = path.split(".")
    return _set(cfg, keys, text, path)


def _set(obj: Any, keys: list[str], text: str, path: str) -> Any:
    names = [f.name for f in dataclasses.fields(obj)]
    key = keys[0]
    if key not in names:
        raise ConfigError(f"unknown config key '{path}'; valid keys here: {', '.join(names)}")
    tp = _hints(type(obj))[key]
    current = getattr(obj, key)
    if len(keys) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"'{path}': '{key}' is a value, not a section")
        return dataclasses.replace(obj, **{key: _set(current, keys[1:], text, path)})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"'{path}' is a section; set one of its keys, e.g. {path}.<key>=value")
    value = text if tp is str else _parse_literal(text)
    return dataclasses.replace(obj, **{key: _coerce(value, tp, path)})


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field's declared choices and ranges, then each section's own `check()`."""
    for f in dataclasses.fields(cfg):
        path = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, path)
            continue
        valid = f.metadata.get("choices")
        if valid is not None:
            values = value if isinstance(value, list) else [value]
            for v in values:
                if v not in valid:
                    raise ConfigError(
                        f"{path} = {v!r} is not valid; choose one of: {', '.join(map(str, valid))}"
                    )
        lo, hi = f.metadata.get("range", (None, None))
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise ConfigError(f"{path} = {value!r} is out of range; it must lie in {span}")
    check = getattr(cfg, "check", None)
    if callable(check):
        check()


# ---------------------------------------------------------------------------------------
# tracks, presets, JSON


def root_class(track: str) -> type:
    if track not in TRACKS:
        raise ConfigError(f"unknown track '{track}'; valid tracks: {', '.join(TRACKS)}")
    module, name = TRACKS[track].split(":")
    return getattr(importlib.import_module(module), name)


def list_presets() -> dict[str, str]:
    """Preset name -> its track."""
    out = {}
    for entry in sorted(resources.files("underpar.presets").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            out[entry.name[: -len(".toml")]] = tomllib.loads(entry.read_text()).get("track", "?")
    return out


def load_preset(name: str) -> tuple[str, dict[str, Any]]:
    """(track, settings) of a shipped preset."""
    presets = list_presets()
    if name not in presets:
        raise ConfigError(f"unknown preset '{name}'; presets: {', '.join(presets) or '(none)'}")
    data = tomllib.loads(resources.files("underpar.presets").joinpath(f"{name}.toml").read_text())
    track = data.pop("track", None)
    if track is None:
        raise ConfigError(f"preset '{name}' names no track")
    return track, data


def resolve(track: str, preset: str | None = None, sets: typing.Sequence[str] = ()) -> Any:
    """Defaults of `track`, then the preset (which must belong to it), then each override."""
    cls = root_class(track)
    data: dict[str, Any] = {}
    if preset is not None:
        preset_track, data = load_preset(preset)
        if preset_track != track:
            raise ConfigError(f"preset '{preset}' is for '{preset_track}', not '{track}'")
    cfg = from_dict(cls, data)
    for assignment in sets:
        cfg = override(cfg, assignment)
    validate(cfg)
    return cfg


def track_of(cfg: Any) -> str:
    for name, target in TRACKS.items():
        module, clsname = target.split(":")
        if type(cfg).__module__ == module and type(cfg).__name__ == clsname:
            return name
    raise ConfigError(f"{type(cfg).__name__} is not a track's root config")


def save_json(cfg: Any, path: str | Path) -> None:
    """The resolved config, enough to rerun exactly: {"track": ..., "config": {...}}."""
    text = json.dumps({"track": track_of(cfg), "config": to_dict(cfg)}, indent=2)
    Path(path).write_text(text + "\n")


def load_json(path: str | Path) -> Any:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    cfg = from_dict(root_class(data["track"]), data["config"])
    validate(cfg)
    return cfg
