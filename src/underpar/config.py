"""Configs: nested dataclasses, TOML presets, `a.b=value` overrides with type coercion,
validation that names the key and the valid choices, and a JSON round trip.

Each component owns its config dataclass next to its code; this module only knows how to
build, override, validate and serialize any of them. Fields declare their valid values
with `choice(...)` (a name from a list or a `Registry`) or `bounded(...)`; `variant(...)` is a
section whose class is chosen by name from a registry of parameter dataclasses (a schedule
and its own parameters, a finetune method and its own settings); a dataclass may add
cross-field checks in `check()`. Numbers must be finite.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import tomllib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from underpar.errors import ConfigError
from underpar.registry import Registry

T = TypeVar("T")

# track name -> "module:RootConfigClass"; imported lazily so `underpar --help` stays fast.
TRACKS = {
    "prepare": "underpar.data.config:DataConfig",
    "pretrain": "underpar.tracks.pretrain:PretrainConfig",
    "finetune": "underpar.tracks.finetune:FinetuneConfig",
    "randopt": "underpar.tracks.randopt:RandOptConfig",
}


def choice(default: Any, valid: typing.Iterable[Any] | Registry) -> Any:
    """A field whose value (or each value of a list) must be one of `valid`: a fixed list, or
    a `Registry` whose names are looked up when the config is validated."""
    return dataclasses.field(default=default, metadata={"choices": valid if isinstance(valid, Registry) else tuple(valid)})


def variant(registry: Registry, default: str) -> Any:
    """A section whose class is the parameter dataclass registered under a name in `registry`.
    In TOML or JSON it is `{name = "...", <that class's fields>}` (or just the name, for the
    defaults); `--set path=NAME` switches it to NAME's defaults, `--set path.field=v` sets one
    of its fields."""
    return dataclasses.field(default_factory=lambda: registry[default](), metadata={"variant": registry})


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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
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
            raise _unknown_key(path, names)
        registry = _variant_registry(cls, key)
        kwargs[key] = _variant_from(registry, value, path) if registry else _coerce(value, hints[key], path)
    return cls(**kwargs)


def _unknown_key(path: str, names: list[str]) -> ConfigError:
    return ConfigError(f"unknown config key '{path}'; valid keys here: {', '.join(names) or 'none'}")


def _variant_registry(cls: type, key: str) -> Registry | None:
    return next((f.metadata.get("variant") for f in dataclasses.fields(cls) if f.name == key), None)


def _variant_from(registry: Registry, value: Any, path: str) -> Any:
    """A variant section from a name, a {"name": ..., fields...} table, or an instance."""
    if isinstance(value, str):
        return _variant_class(registry, value, path)()
    if isinstance(value, dict):
        if "name" not in value:
            raise ConfigError(f"{path}: the table needs a 'name' (one of: {', '.join(registry)})")
        rest = {k: v for k, v in value.items() if k != "name"}
        return from_dict(_variant_class(registry, value["name"], path), rest, prefix=path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        registry.name_of(value)
        return value
    raise ConfigError(f"{path}: expected a {registry.kind} name or table, got {value!r}")


def _variant_class(registry: Registry, name: Any, path: str) -> type:
    if name not in registry:
        raise ConfigError(f"{path} = {name!r} is not valid; choose one of: {', '.join(registry)}")
    return registry[name]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested data (what JSON and TOML hold); a variant section carries its name."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
            if "variant" in f.metadata:
                value = {"name": f.metadata["variant"].name_of(getattr(cfg, f.name)), **value}
        elif isinstance(value, list):
            value = list(value)
        out[f.name] = value
    return out


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
        raise _unknown_key(path, names)
    tp = _hints(type(obj))[key]
    current = getattr(obj, key)
    registry = _variant_registry(type(obj), key)
    if registry is not None and (len(keys) == 1 or keys[1:] == ["name"]):
        if len(keys) == 1 and text.lstrip().startswith("{"):
            return dataclasses.replace(obj, **{key: _variant_from(registry, _parse_literal(text), path)})
        if text.strip() == registry.name_of(current):
            return obj  # the same entry: keep its settings
        return dataclasses.replace(obj, **{key: _variant_from(registry, text.strip(), path)})
    if len(keys) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"'{path}': '{key}' is a value, not a section")
        if registry is not None and keys[1] not in {f.name for f in dataclasses.fields(current)}:
            owners = [n for n, cls in registry.items() if keys[1] in {f.name for f in dataclasses.fields(cls)}]
            if owners:
                prefix = path[: -len(".".join(keys[1:])) - 1]
                raise ConfigError(f"'{path}' is a setting of {' and '.join(owners)}, not of "
                                  f"{registry.name_of(current)!r}; switch first: --set {prefix}={owners[0]}")
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
            if "variant" in f.metadata:
                f.metadata["variant"].name_of(value)
            validate(value, path)
            continue
        valid = f.metadata.get("choices")
        if valid is not None:
            values = value if isinstance(value, list) else [value]
            for v in values:
                if not isinstance(v, typing.Hashable) or v not in valid:
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
