"""Reliability suite: every bad input refused cleanly, every injected fault survived, counted for the README."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:  # `tests.kube` and `tests.e2e` are imported as packages from the repository root
    sys.path.insert(0, ROOT)

from tests.e2e.conftest import pytest_configure, pytest_runtest_makereport  # noqa: E402,F401  (e2e marker; e2e_ns reads rep_call)
