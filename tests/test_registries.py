"""Every entry of every registry, checked by what its kind requires (shapes, finiteness,
determinism, round trips). A new entry is covered without editing this file; a new kind of
registry needs one check function below."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import underpar.tracks.finetune  # noqa: F401  (importing the tracks registers every entry)
import underpar.tracks.pretrain  # noqa: F401
import underpar.tracks.randopt  # noqa: F401
from underpar.registry import Registry

CHECKS: dict[str, Callable[[str, Any], None]] = {}


def check(kind: str):
    def add(fn):
        CHECKS[kind] = fn
        return fn
    return add


# ---- model and quantization checks

# ---- optimizer, schedule and finetune checks

# ---- task, answer and randopt checks


def _registries() -> dict[str, Registry]:
    return {kind: r for kind, r in Registry.all().items() if not kind.startswith("test-")}


def test_every_registry_kind_has_a_check():
    missing = sorted(set(_registries()) - set(CHECKS))
    assert not missing, f"registries without a check in tests/test_registries.py: {missing}"


@pytest.mark.parametrize("kind,name", [(k, n) for k, r in _registries().items() for n in r])
def test_registered_entry(kind: str, name: str):
    CHECKS[kind](name, _registries()[kind][name])
