"""Layer: custom resources. Each corpus/crs/*.yaml is refused where it should be:
- `refused-by: schema`: the API server (the emulator with our CRDs: OpenAPI schema + CEL rules) answers 422
  with the rule's message, and nothing is stored;
- `refused-by: operator`: the schema allows it, the operator's reconcile refuses it: phase Failed, a
  condition and message naming the field, no Job/Deployment/Service created, no traceback.
"""

from __future__ import annotations

from pathlib import Path

import kopf
import pytest
import yaml

from .corpus import cr_cases

REPO = Path(__file__).resolve().parents[2]
NS = "reliability"
CASES = cr_cases()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from kubernetes import client

    from internvl_operator.kube import Kube
    from tests.kube.apiserver import ApiServer

    server = ApiServer(log_dir=str(tmp_path_factory.mktemp("logs"))).start()
    cfg = client.Configuration()
    cfg.host = server.url
    kube = Kube(client.ApiClient(cfg))
    for path in sorted((REPO / "crds").glob("*.yaml")):
        kube._call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body=yaml.safe_load(path.read_text()))
    kube._call("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    for claim in ("models", "data", "out"):
        kube.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": NS},
                     "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    yield kube
    server.stop()


def children(kube) -> list[str]:
    return [f"{kind}/{o['metadata']['name']}" for api_version, kind in (("batch/v1", "Job"), ("apps/v1", "Deployment"), ("v1", "Service"))
            for o in kube.list(api_version, kind, NS, labels={})]


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_invalid_cr_is_refused_cleanly(api, case):
    from internvl_operator import handlers
    from internvl_operator.kube import ApiError
    from internvl_operator.settings import OperatorSettings

    manifest = dict(case["manifest"], metadata={"name": "bad", "namespace": NS})
    kind = manifest["kind"]
    if case["refused_by"] == "schema":
        with pytest.raises(ApiError) as exc:
            api.create(manifest)
        assert exc.value.status == 422, exc.value
        assert case["expect"] in str(exc.value), str(exc.value)
        assert api.get(manifest["apiVersion"], kind, NS, "bad") is None  # nothing stored
        return
    api.create(manifest)
    try:
        handlers.configure(kube=api, settings=OperatorSettings(worker_image="reg/worker:1"))
        body = api.get(manifest["apiVersion"], kind, NS, "bad")
        reconcile = handlers.reconcile_finetune if kind == "InternVLFineTune" else handlers.reconcile_service
        with pytest.raises((kopf.PermanentError, kopf.TemporaryError)) as exc:
            reconcile(body)
        assert case["expect"] in str(exc.value), str(exc.value)
        status = api.get(manifest["apiVersion"], kind, NS, "bad")["status"]
        assert status["phase"] == "Failed" and case["expect"] in status["message"], status
        failed = [c for c in status["conditions"] if c["status"] == "False" and case["expect"] in c.get("message", "")]
        assert failed, status["conditions"]
        assert children(api) == [], "an invalid CR created children"
    finally:
        api.delete(manifest["apiVersion"], kind, NS, "bad")


def test_counts():
    by = {"schema": 0, "operator": 0}
    for c in CASES:
        by[c["refused_by"]] += 1
    print(f"\n[reliability] crs: {len(CASES)} invalid CRs refused ({by['schema']} by the schema/CEL, {by['operator']} by the operator)")
    assert by["schema"] and by["operator"]
