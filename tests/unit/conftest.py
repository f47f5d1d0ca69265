"""Fixtures shared by the unit tests that run the tiny model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loraloop.devtools.tiny_model import ensure_tiny_model


@pytest.fixture(scope="module", autouse=True)
def _pin_threads() -> Iterator[None]:
    """Two cores here; more intra-op threads than cores only slows tiny matmuls down."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The default tiny model from the shared cache (built once, then reused across runs)."""
    return ensure_tiny_model(progress=False)
