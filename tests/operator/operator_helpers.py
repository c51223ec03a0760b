"""Test helpers: sample CRs, the API server's admission of a CR (schema + defaults + CEL), manifest validation."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
EXAMPLES_DIR = REPO / "examples"
K8S_VERSION = "1.30"


def finetune_body(name: str = "tiny", namespace: str = "ml", **spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"modelType": "internvl3-1b", "pvc": {"claimName": "models", "path": "InternVL3-1B-hf"}},
        "dataset": {"pvc": {"claimName": "data"}, "files": ["train.jsonl"]},
        "output": {"claimName": "out"},
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "internvl.ai/v1alpha1",
        "kind": "InternVLFineTune",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1},
        "spec": spec,
    }


def service_body(name: str = "chat", namespace: str = "ml", **spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"modelType": "internvl3-1b", "pvc": {"claimName": "models", "path": "m"}}}
    spec.update(spec_overrides)
    return {
        "apiVersion": "internvl.ai/v1alpha1",
        "kind": "InternVLService",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1},
        "spec": spec,
    }


# --------------------------------------------------------------------------- manifests


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Strict validation against the Kubernetes 1.30 OpenAPI schemas (unknown fields are errors)."""
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


# --------------------------------------------------------------------------- CRDs


@functools.cache
def _programs(rule: str) -> Any:
    return _CEL_ENV.program(_CEL_ENV.compile(rule))


@functools.cache
def load_crds() -> dict[str, dict[str, Any]]:
    crds = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        crds[crd["spec"]["names"]["kind"]] = crd
    return crds


def crd_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """Structural OpenAPI v3 -> JSON Schema, closing objects as kubectl's strict field validation does."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "default":
            continue
        if key == "properties":
            out[key] = {name: to_jsonschema(prop) for name, prop in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_jsonschema(value)
        elif key == "exclusiveMinimum" and value is True:
            out["exclusiveMinimum"] = node["minimum"]
            out.pop("minimum", None)
        elif key == "exclusiveMaximum" and value is True:
            out["exclusiveMaximum"] = node["maximum"]
            out.pop("maximum", None)
        elif key in ("minimum", "maximum") and node.get("exclusive" + key.capitalize()) is True:
            continue
        elif key == "nullable":
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: fill absent fields that have a default, recursively."""
    if isinstance(value, dict) and "properties" in node:
        value = dict(value)
        for name, prop in node["properties"].items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                value[name] = apply_defaults(prop, value[name])
    elif isinstance(value, list) and "items" in node:
        value = [apply_defaults(node["items"], item) for item in value]
    return value


_CEL_ENV = celpy.Environment()


def cel_messages(node: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Evaluate every x-kubernetes-validations rule below `node` on `value`; return 'path: message' of failures."""
    failures = []
    for rule in node.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # transition rules need an old object; tested separately
        program = _programs(rule["rule"])
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        if not bool(result):
            failures.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(value, dict):
        for name, prop in node.get("properties", {}).items():
            if name in value:
                failures += cel_messages(prop, value[name], f"{path}.{name}")
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            failures += cel_messages(node["items"], item, f"{path}[{i}]")
    return failures


@functools.cache
def _validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(to_jsonschema(crd_schema(load_crds()[kind])))


def admit(obj: dict[str, Any]) -> list[str]:
    """What `kubectl apply` would be told: schema errors (with their path), then CEL rule failures."""
    schema = crd_schema(load_crds()[obj["kind"]])
    obj = apply_defaults(schema, obj)
    validator = _validator(obj["kind"])
    errors = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
    if errors:
        return errors  # the API server stops at schema errors before running CEL
    return [m.lstrip(".") for m in cel_messages(schema, obj)]


def strip_ws(text: str) -> str:
    return re.sub(r"\s+", " ", text)
