"""Config machinery: coercion, overrides, validation messages, presets, JSON round trip."""

import dataclasses

import pytest

from underpar import config as cfglib
from underpar.config import bounded, choice, items, nested
from underpar.data.config import DataConfig
from underpar.errors import ConfigError


@dataclasses.dataclass
class Inner:
    width: int = bounded(64, 1, 4096)
    activation: str = choice("relu2", ["relu2", "leaky_relu2", "gelu"])
    loop: list[int] = items([3, 5])
    scale: float = 1.5
    label: str = "x"
    enabled: bool = False
    limit: int | None = None


@dataclasses.dataclass
class Outer:
    inner: Inner = nested(Inner)
    lr: float = 0.04


def test_override_coerces_types():
    cfg = Outer()
    cfg = cfglib.override(cfg, "inner.width=128")
    cfg = cfglib.override(cfg, "inner.loop=[1, 2, 3]")
    cfg = cfglib.override(cfg, "inner.scale=2")
    cfg = cfglib.override(cfg, "inner.enabled=true")
    cfg = cfglib.override(cfg, "inner.label=123")
    cfg = cfglib.override(cfg, "inner.limit=7")
    cfg = cfglib.override(cfg, "lr=1e-3")
    assert cfg.inner == Inner(width=128, loop=[1, 2, 3], scale=2.0, enabled=True, label="123", limit=7)
    assert isinstance(cfg.inner.scale, float) and cfg.lr == 1e-3


def test_override_does_not_mutate_original():
    cfg = Outer()
    cfglib.override(cfg, "inner.width=9")
    assert cfg.inner.width == 64


@pytest.mark.parametrize(
    "assignment, fragment",
    [
        ("inner.depth=3", "unknown config key 'inner.depth'"),
        ("inner.depth=3", "valid keys here: width, activation, loop"),
        ("nope=1", "unknown config key 'nope'"),
        ("inner.width=wide", "inner.width: expected an integer"),
        ("inner.enabled=maybe", "expected true or false"),
        ("inner.loop=3", "expected a list"),
        ("inner=3", "is a section"),
        ("lr.x=3", "is a value, not a section"),
        ("lr", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(assignment, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        cfglib.override(Outer(), assignment)


def test_validation_lists_choices_and_ranges():
    with pytest.raises(ConfigError, match="inner.activation = 'swish' is not valid; choose one of: relu2, leaky_relu2, gelu"):
        cfglib.validate(cfglib.override(Outer(), "inner.activation=swish"))
    with pytest.raises(ConfigError, match=r"inner.width = 0 is out of range; it must lie in \[1, 4096\]"):
        cfglib.validate(cfglib.override(Outer(), "inner.width=0"))


def test_from_dict_unknown_key_and_nested():
    cfg = cfglib.from_dict(Outer, {"inner": {"width": 8, "loop": [1]}, "lr": 1})
    assert cfg.inner.width == 8 and cfg.lr == 1.0
    with pytest.raises(ConfigError, match="unknown config key 'inner.colour'"):
        cfglib.from_dict(Outer, {"inner": {"colour": 1}})


def test_json_round_trip(tmp_path):
    cfg = cfglib.resolve("prepare", sets=["vocab_size=512", "source=text", "path=/tmp/x", "val_docs=10"])
    cfglib.save_json(cfg, tmp_path / "config.json")
    again = cfglib.load_json(tmp_path / "config.json")
    assert again == cfg and isinstance(again, DataConfig)


def test_cross_field_check():
    with pytest.raises(ConfigError, match="needs data.path"):
        cfglib.resolve("prepare", sets=["source=text"])


def test_presets_listed_and_loaded():
    presets = cfglib.list_presets()
    assert presets, "the package ships presets"
    for name, track in presets.items():
        cfg = cfglib.resolve(track, name)
        assert cfglib.track_of(cfg) == track
    with pytest.raises(ConfigError, match="unknown preset 'nope'; presets: "):
        cfglib.load_preset("nope")


def test_the_largest_model_preset_is_the_one_measured():
    """golf-max16mb is what benchmarks/quant_largest.py found to fit 16,000,000 bytes on an H200
    (results/quant_largest-h200.json): its parameter count and the export that made it fit."""
    import torch

    from underpar.model.gpt import build, num_params

    cfg = cfglib.resolve("pretrain", "golf-max16mb")
    with torch.device("meta"):
        assert num_params(build(cfg.model)) == 35_948_152
    q = cfg.quant
    assert (q.qat_bits, q.qat_clip, q.qat_start, q.gptq, q.lqer_rank, q.clip.matrix_sigmas) == (6, "sdclip", 0.5, True, 4, 14.0)


def test_unknown_track():
    with pytest.raises(ConfigError, match="unknown track 'golf'; valid tracks: prepare"):
        cfglib.root_class("golf")


# ---------------------------------------------------------------- registries and variants

from underpar.registry import Registry  # noqa: E402

SHAPES = Registry("test-shape")


@SHAPES.register("flat")
@dataclasses.dataclass
class Flat:
    level: float = bounded(1.0, 0.0)


@SHAPES.register("ramp")
@dataclasses.dataclass
class Ramp:
    start: float = bounded(0.0, 0.0, 1.0)
    steps: int = bounded(10, 1)


@dataclasses.dataclass
class WithVariant:
    shape: Flat | Ramp = cfglib.variant(SHAPES, "flat")
    kind: str = choice("flat", SHAPES)


def test_registry_lists_valid_names_and_refuses_duplicates():
    assert list(SHAPES) == ["flat", "ramp"] and "ramp" in SHAPES and SHAPES["ramp"] is Ramp
    with pytest.raises(ConfigError, match="unknown test-shape 'wave'; valid: flat, ramp"):
        SHAPES["wave"]
    with pytest.raises(ValueError, match="registered twice"):
        SHAPES.register("flat")(Flat)
    assert SHAPES.name_of(Ramp()) == "ramp" and Registry.all()["test-shape"] is SHAPES


def test_choice_from_a_registry_is_checked_at_validation_so_later_entries_count():
    cfg = cfglib.override(WithVariant(), "kind=wave")
    with pytest.raises(ConfigError, match="kind = 'wave' is not valid; choose one of: flat, ramp"):
        cfglib.validate(cfg)
    SHAPES._entries["wave"] = Flat  # what a later module's registration does
    try:
        cfglib.validate(cfg)
    finally:
        del SHAPES._entries["wave"]


def test_variant_sections_switch_set_and_round_trip():
    cfg = WithVariant()
    assert cfg.shape == Flat()
    cfg = cfglib.override(cfg, "shape=ramp")
    assert cfg.shape == Ramp()
    cfg = cfglib.override(cfg, "shape.steps=20")
    assert cfg.shape == Ramp(steps=20)
    assert cfglib.override(cfg, "shape=ramp").shape == Ramp(steps=20)  # same name keeps settings
    assert cfglib.override(cfg, "shape.name=flat").shape == Flat()
    assert cfglib.override(cfg, "shape={name = 'ramp', start = 0.5}").shape == Ramp(start=0.5)
    data = cfglib.to_dict(cfg)
    assert data["shape"] == {"name": "ramp", "start": 0.0, "steps": 20}
    assert cfglib.from_dict(WithVariant, data) == cfg
    assert cfglib.from_dict(WithVariant, {"shape": "ramp"}).shape == Ramp()
    with pytest.raises(ConfigError, match="shape = 'wave' is not valid; choose one of: flat, ramp"):
        cfglib.override(cfg, "shape=wave")
    with pytest.raises(ConfigError, match=r"'shape.level' is a setting of flat, not of 'ramp'; switch first: --set shape=flat"):
        cfglib.override(cfg, "shape.level=2")  # a field of the other variant
    with pytest.raises(ConfigError, match="unknown config key 'shape.width'; valid keys here: start, steps"):
        cfglib.override(cfg, "shape.width=2")
    with pytest.raises(ConfigError, match="needs a 'name'"):
        cfglib.from_dict(WithVariant, {"shape": {"steps": 3}})
    with pytest.raises(ConfigError, match=r"shape.start = 2.0 is out of range"):
        cfglib.validate(cfglib.override(cfg, "shape.start=2"))


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(text):
    with pytest.raises(ConfigError, match="lr: expected a finite number"):
        cfglib.override(Outer(), f"lr={text}")
