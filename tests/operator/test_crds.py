"""The generated CRDs: in sync with api.py, structural, small, and refusing bad CRs with a useful message."""

from __future__ import annotations

import json
import re

import pydantic
import pytest
import yaml

from internvl_operator import api, crdgen
from internvl_operator.handlers import Invalid, parse

from operator_helpers import CRD_DIR, EXAMPLES_DIR, admit, crd_schema, finetune_body, load_crds, service_body

# Argo CD stores the last applied object in an annotation capped at 262144 bytes.
ANNOTATION_LIMIT = 262144


def test_checked_in_crds_match_the_models():
    for name, text in crdgen.rendered_files().items():
        on_disk = (CRD_DIR / name).read_text()
        assert on_disk == text, f"{name} drifted from api.py: run `python -m internvl_operator.crdgen`"
    assert crdgen.main(["--check", "--output-dir", str(CRD_DIR)]) == 0


def test_check_mode_reports_drift(tmp_path):
    assert crdgen.main(["--output-dir", str(tmp_path)]) == 0
    path = next(tmp_path.glob("*finetunes.yaml"))
    path.write_text(path.read_text().replace("minimum: 1", "minimum: 2", 1))
    assert crdgen.main(["--check", "--output-dir", str(tmp_path)]) == 1


@pytest.mark.parametrize("path", sorted(CRD_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_crd_is_far_below_the_annotation_limit(path):
    crd = yaml.safe_load(path.read_text())
    # kubectl's last-applied annotation holds the compact JSON of the whole object.
    size = len(json.dumps(crd, separators=(",", ":")))
    assert size < ANNOTATION_LIMIT // 4, size


def _walk(node, path="schema"):
    yield path, node
    for name, prop in (node.get("properties") or {}).items():
        yield from _walk(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", ["InternVLFineTune", "InternVLService"])
def test_schema_is_structural(kind):
    crd = load_crds()[kind]
    for path, node in _walk(crd_schema(crd)):
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    names = crd["spec"]["names"]
    assert names["shortNames"] and names["categories"] == ["internvl"]


def test_printer_columns():
    ft = load_crds()["InternVLFineTune"]["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in ft] == ["Phase", "Progress", "Loss", "GPUs", "Model", "URL", "Age"]
    svc = load_crds()["InternVLService"]["spec"]["versions"][0]["additionalPrinterColumns"]
    assert {"Ready", "URL", "Model"} <= {c["name"] for c in svc}


def test_defaults_are_in_the_schema():
    spec = crd_schema(load_crds()["InternVLFineTune"])["properties"]["spec"]["properties"]
    assert spec["method"]["default"] == "lora" and spec["method"]["enum"] == ["lora", "full"]
    assert spec["training"]["properties"]["learningRate"]["default"] == 1e-4
    assert spec["deepspeed"]["enum"] == ["zero2", "zero3"]
    assert spec["gpusPerNode"]["minimum"] == 0 and spec["gpusPerNode"]["maximum"] == 16  # 0 = CPU only


def _example_docs():
    docs = []
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("apiVersion") == "internvl.ai/v1alpha1":
                docs.append(pytest.param(doc, id=f"{path.name}:{doc['metadata']['name']}"))
    return docs


EXAMPLES = _example_docs()


def test_there_are_examples_of_each_kind():
    kinds = [p.values[0]["kind"] for p in EXAMPLES]
    assert kinds.count("InternVLFineTune") >= 2 and kinds.count("InternVLService") >= 2


@pytest.mark.parametrize("doc", EXAMPLES)
def test_example_is_admitted_and_parses(doc):
    assert admit(doc) == []
    model = api.InternVLFineTune if doc["kind"] == "InternVLFineTune" else api.InternVLService
    parse(model, doc)


# Each bad CR: (kind, spec change, text the API server's answer must contain).
FT = "InternVLFineTune"
SVC = "InternVLService"
INVALID = [
    (FT, {"deepspeed": "zero2"}, "spec.deepspeed: deepspeed needs more than one GPU"),
    (FT, {"method": "full", "lora": {"rank": 4}}, "spec.lora: lora settings need method: lora"),
    (FT, {"method": "full", "merge": True}, "spec.merge: merge: true needs method: lora"),
    (FT, {"model": {"modelType": "internvl3-1b"}}, "spec.model: set exactly one model source"),
    (
        FT,
        {"model": {"modelType": "internvl3-1b", "pvc": {"claimName": "m"}, "hubId": "OpenGVLab/InternVL3-1B-hf"}},
        "spec.model: set exactly one model source",
    ),
    (
        FT,
        {"model": {"modelType": "internvl3-1b", "pvc": {"claimName": "m"}, "hubTokenSecret": {"name": "hf"}}},
        "spec.model.hubTokenSecret: hubTokenSecret is only used with hubId",
    ),
    (FT, {"dataset": {"pvc": {"claimName": "d"}, "files": []}}, "spec.dataset.files"),
    (FT, {"dataset": {"files": ["a.jsonl"]}}, "spec.dataset: set exactly one dataset source: pvc or configMap"),
    (
        FT,
        {"dataset": {"pvc": {"claimName": "d"}, "configMap": {"name": "c"}, "files": ["a.jsonl"]}},
        "spec.dataset: set exactly one dataset source: pvc or configMap",
    ),
    (FT, {"gpusPerNode": -1}, "spec.gpusPerNode"),
    (FT, {"training": {"maxSteps": 0}}, "spec.training.maxSteps"),
    (FT, {"method": "qlora"}, "spec.method"),
    (FT, {"training": {"learningRate": 0}}, "spec.training.learningRate"),
    (FT, {"training": {"maxLength": 10}}, "spec.training.maxLength"),
    (FT, {"lora": {"targetModules": "q_proj; rm -rf /"}}, "spec.lora.targetModules"),
    (FT, {"dataset": {"pvc": {"claimName": "d"}, "files": ["../etc/passwd"]}}, "spec.dataset.files.0"),
    (FT, {"output": {"claimName": "Bad_Name"}}, "spec.output.claimName"),
    (FT, {"epochs": 3}, "spec: Additional properties are not allowed ('epochs' was unexpected)"),
    (SVC, {"engine": "vllm", "gpus": 0}, "spec.gpus: engine: vllm needs gpus >= 1"),
    (SVC, {"vllm": {"maxModelLen": 4096}}, "spec.vllm: vllm settings need engine: vllm"),
    (SVC, {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "spec.autoscaling.minReplicas: minReplicas must not exceed maxReplicas"),
    (SVC, {"disruptionBudget": {}}, "spec.disruptionBudget: set exactly one of minAvailable or maxUnavailable"),
    (SVC, {"adapters": [{"name": "a"}]}, "spec.adapters[0]: set exactly one adapter source"),
]


def _bad(kind, change):
    body = finetune_body() if kind == FT else service_body()
    body["spec"].update(change)
    return body


@pytest.mark.parametrize(("kind", "change", "expected"), INVALID, ids=[e for _, _, e in INVALID])
def test_api_server_refuses_invalid_cr_naming_the_field(kind, change, expected):
    errors = admit(_bad(kind, change))
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize(("kind", "change", "expected"), INVALID, ids=[e for _, _, e in INVALID])
def test_operator_refuses_the_same_cr(kind, change, expected):
    """The pydantic models hold the same rules (clusters without CEL, and the operator's own parse)."""
    model = api.InternVLFineTune if kind == FT else api.InternVLService
    with pytest.raises(Invalid) as info:
        parse(model, _bad(kind, change))
    got = str(info.value)
    if "Additional properties" in expected:  # JSON Schema and pydantic word unknown fields differently
        assert "spec.epochs: Extra inputs are not permitted" in got
    else:
        # Same field path and message; only list indexes print differently (CEL [0], pydantic .0).
        assert re.sub(r"\[(\d+)\]", r".\1", expected) in got, got


def test_dataset_urls_are_refused_by_both():
    """The worker reads local files only, so `dataset.urls` is not part of the API (kubectl's strict
    validation and the operator both refuse it instead of silently ignoring it)."""
    body = finetune_body(dataset={"urls": ["https://x/a.jsonl"], "files": ["a.jsonl"]})
    assert any("urls" in e for e in admit(body)), admit(body)
    with pytest.raises(Invalid, match=r"dataset\.urls: Extra inputs are not permitted"):
        parse(api.InternVLFineTune, body)


def test_valid_minimal_crs_are_admitted():
    assert admit(finetune_body()) == []
    assert admit(service_body()) == []


def test_defaults_do_not_trip_cross_field_rules():
    # method defaults to lora, merge is unset: a defaulted full fine-tune must stay valid.
    assert admit(finetune_body(method="full")) == []
    assert admit(finetune_body(gpusPerNode=2, deepspeed="zero3", method="full")) == []


def test_output_is_immutable_rule_exists():
    output = crd_schema(load_crds()[FT])["properties"]["spec"]["properties"]["output"]
    assert {"rule": "self == oldSelf", "message": "output is immutable (checkpoints live there)"} in output[
        "x-kubernetes-validations"
    ]


def test_cel_rules_and_pydantic_agree_on_every_message():
    """Every CEL message in the CRD is raised somewhere in api.py too (the rules are written twice)."""
    source = (api.__file__ and open(api.__file__).read()) or ""
    schema = crd_schema(load_crds()[FT])
    messages = []
    for kind in (FT, SVC):
        for _, node in _walk(crd_schema(load_crds()[kind])):
            messages += [r["message"] for r in node.get("x-kubernetes-validations", []) if "oldSelf" not in r["rule"]]
    assert messages and schema
    for message in messages:
        # The pydantic validators raise the CelRule's message (or the literal text for inline rules).
        assert message in source, message


def test_pydantic_error_names_the_yaml_field():
    with pytest.raises(pydantic.ValidationError) as info:
        api.InternVLFineTuneSpec.model_validate({**finetune_body()["spec"], "training": {"batchSize": 0}})
    assert info.value.errors()[0]["loc"] == ("training", "batchSize")
