"""Helpers for the chart tests: the real `helm` and `kubectl` (tests/kube/binaries.py) and rendering."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.kube` is imported as a package from the repository root
    sys.path.insert(0, str(REPO))

from tests.kube.binaries import tool_paths  # noqa: E402
from tests.kube.fixtures import kube_api, kubectl  # noqa: E402,F401

CHART = REPO / "charts" / "internvl-operator"
RELEASE, RELEASE_NS = "ivl", "internvl-system"
K8S_VERSION = "1.30"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # Helm's own config/cache dirs go to a temp place: tests never touch the user's repositories.
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"internvl-chart-helm-{os.getuid()}"
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    proc = subprocess.run([tool_paths()["helm"], *args], capture_output=True, text=True, env=env, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def render_text(values: dict | None = None, *, check: bool = True) -> subprocess.CompletedProcess:
    """`helm template` with `values` given as a values file (JSON is YAML); returns the process."""
    args = ["template", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--kube-version", K8S_VERSION]
    if values:
        path = _values_file(json.dumps(values, sort_keys=True))
        args += ["--values", path]
    return helm(*args, check=check)


@functools.cache
def _values_file(text: str) -> str:
    import hashlib
    import tempfile

    path = Path(tempfile.gettempdir()) / f"internvl-chart-values-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    path.write_text(text)
    return str(path)


@functools.cache
def _render_cached(values_json: str) -> tuple[dict, ...]:
    values = json.loads(values_json)
    proc = render_text(values or None)
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def render(values: dict | None = None) -> list[dict]:
    """The objects `helm template` renders for `values` (cached per distinct values)."""
    import copy

    return copy.deepcopy(list(_render_cached(json.dumps(values or {}, sort_keys=True))))


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


@pytest.fixture(scope="session")
def helm_bin() -> str:
    return tool_paths()["helm"]
