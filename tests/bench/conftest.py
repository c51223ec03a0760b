"""Bench scripts as modules: they import their neighbours (train_bench, train_check, record) from bench/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench_path():
    """bench/ on sys.path while a module's tests run (the scripts import from their own folder lazily)."""
    sys.path.insert(0, str(ROOT / "bench"))
    yield ROOT / "bench"
    sys.path.remove(str(ROOT / "bench"))
