"""Argo CD health checks (Lua, run in Lua 5.1 like Argo CD's gopher-lua, through lupa) against status
objects the operator's own planning code writes, and the GitOps example manifests."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import CHART, REPO

LUA_DIR = CHART / "argocd"
GITOPS = REPO / "examples" / "gitops"
NOW = "2026-01-01T00:00:00Z"


def health(kind: str, obj: dict) -> dict:
    from lupa import lua51

    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    script = (LUA_DIR / f"{kind.lower()}-health.lua").read_text()
    fn = lua.execute(f"return function(obj)\n{script}\nend")
    # JSON -> Lua tables, as Argo CD converts the live object (arrays become 1-based sequences).
    result = fn(_lua_value(lua, json.loads(json.dumps(obj))))
    return {"status": result["status"], "message": result["message"] or ""}


def _lua_value(lua, value):
    if isinstance(value, dict):
        return lua.table_from({k: _lua_value(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_lua_value(lua, v) for v in value])
    return value


# --------------------------------------------------------------------------- InternVLService


def _service_status(*, ready: int, pods=(), replicas: int = 1) -> dict:
    """The status plan_service writes for a Deployment with `ready` ready replicas and these pods."""
    from internvl_operator import api, reconcile
    from internvl_operator.settings import OperatorSettings

    body = {"metadata": {"name": "chat", "namespace": "ml", "generation": 2},
            "spec": {"model": {"modelType": "internvl3-1b", "pvc": {"claimName": "models"}}, "replicas": replicas}}
    svc = api.InternVLService.model_validate(body)
    deployment = {"status": {"replicas": max(replicas, 1) if replicas else 0, "readyReplicas": ready}}
    obs = reconcile.ServiceObservation(deployment=deployment, pods=list(pods))
    plan = reconcile.plan_service(svc, obs, settings=OperatorSettings(), now=NOW)
    return {"apiVersion": "internvl.ai/v1alpha1", "kind": "InternVLService", "metadata": body["metadata"],
            "spec": body["spec"], "status": plan.status}


def _crashing_pod() -> dict:
    return {"metadata": {"name": "chat-abc", "labels": {}},
            "status": {"phase": "Running", "containerStatuses": [{
                "name": "server", "ready": False, "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "CUDA error"}}}]}}


def test_service_ready_is_healthy():
    obj = _service_status(ready=1)
    assert obj["status"]["phase"] == "Serving"
    assert health("InternVLService", obj) == {"status": "Healthy", "message": obj["status"]["message"]}


def test_service_loading_is_progressing():
    obj = _service_status(ready=0)
    assert obj["status"]["phase"] == "Pending"
    assert health("InternVLService", obj)["status"] == "Progressing"


def test_service_crash_loop_is_degraded_with_the_reason():
    obj = _service_status(ready=0, pods=[_crashing_pod()])
    assert obj["status"]["phase"] == "Failed", obj["status"]
    hs = health("InternVLService", obj)
    assert hs["status"] == "Degraded" and "CrashLoopBackOff" in hs["message"], hs


def test_service_ready_with_a_failing_replica_stays_healthy():
    obj = _service_status(ready=1, pods=[_crashing_pod()])
    hs = health("InternVLService", obj)
    assert hs["status"] == "Healthy" and "failing" in hs["message"]


def test_service_scaled_to_zero_is_suspended():
    obj = _service_status(ready=0, replicas=0)
    assert health("InternVLService", obj)["status"] == "Suspended"


def test_service_without_status_or_with_an_old_generation_is_progressing():
    obj = _service_status(ready=1)
    assert health("InternVLService", {**obj, "status": None})["status"] == "Progressing"
    newer = {**obj, "metadata": {**obj["metadata"], "generation": 3}}
    hs = health("InternVLService", newer)
    assert hs["status"] == "Progressing" and "generation 3" in hs["message"]


# --------------------------------------------------------------------------- InternVLFineTune


def _finetune(status: dict | None, generation: int = 1) -> dict:
    obj = {"apiVersion": "internvl.ai/v1alpha1", "kind": "InternVLFineTune",
           "metadata": {"name": "tiny", "namespace": "ml", "generation": generation}, "spec": {}}
    if status is not None:
        obj["status"] = {"observedGeneration": generation, **status}
    return obj


def _cond(kind: str, ok: bool, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message,
            "lastTransitionTime": NOW}


def test_finetune_phases_map_to_health():
    from internvl_operator import constants as c

    expect = {
        c.PHASE_PENDING: "Progressing", c.PHASE_VALIDATING: "Progressing", c.PHASE_TRAINING: "Progressing",
        c.PHASE_MERGING: "Progressing", c.PHASE_SUCCEEDED: "Healthy", c.PHASE_FAILED: "Degraded",
        c.PHASE_SUSPENDED: "Suspended",
    }
    assert set(expect) | {c.PHASE_SERVING} == set(c.PHASES), "a phase without an expected health"
    for phase, status in expect.items():
        assert health("InternVLFineTune", _finetune({"phase": phase, "message": "m"}))["status"] == status, phase
    serving_done = {"phase": c.PHASE_SERVING, "conditions": [_cond(c.COND_COMPLETE, True, "Completed")]}
    assert health("InternVLFineTune", _finetune(serving_done))["status"] == "Healthy"


def test_finetune_training_shows_progress():
    from internvl_operator import constants as c

    status = {"phase": c.PHASE_TRAINING, "message": "training", "progress": {"step": 30, "totalSteps": 120,
                                                                              "summary": "30/120", "loss": 0.71}}
    hs = health("InternVLFineTune", _finetune(status))
    assert hs == {"status": "Progressing", "message": "Training 30/120 loss 0.71: training"}


def test_finetune_failure_from_the_operator_is_degraded():
    """A missing PVC: the status the operator's waiting_plan writes (phase Failed + Failed condition)."""
    from internvl_operator import api, constants as c, reconcile

    plan = reconcile.waiting_plan(api.InternVLFineTuneStatus(), generation=1, phase=c.PHASE_FAILED,
                                  cond_type=c.COND_SPEC_VALID, reason="PVCNotFound",
                                  message="spec.output.claimName: PersistentVolumeClaim 'out' not found", now=NOW)
    hs = health("InternVLFineTune", _finetune(plan.status))
    assert hs == {"status": "Degraded", "message": "spec.output.claimName: PersistentVolumeClaim 'out' not found"}
    # A Failed condition that is False ("Succeeded" after a retry) is not a failure.
    ok = {"phase": c.PHASE_TRAINING, "conditions": [_cond(c.COND_FAILED, False, "Succeeded")]}
    assert health("InternVLFineTune", _finetune(ok))["status"] == "Progressing"


def test_finetune_without_status_or_with_stale_status_is_progressing():
    assert health("InternVLFineTune", _finetune(None))["status"] == "Progressing"
    stale = _finetune({"phase": "Succeeded"}, generation=2)
    stale["status"]["observedGeneration"] = 1
    assert health("InternVLFineTune", stale)["status"] == "Progressing"


# --------------------------------------------------------------------------- manifests


def test_argocd_configmap_carries_the_tested_scripts():
    cm = yaml.safe_load((GITOPS / "argocd-cm-health.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"] == {
        "name": "argocd-cm", "namespace": "argocd", "labels": {"app.kubernetes.io/part-of": "argocd"}}
    for kind in ("InternVLFineTune", "InternVLService"):
        script = (LUA_DIR / f"{kind.lower()}-health.lua").read_text()
        assert cm["data"][f"resource.customizations.health.internvl.ai_{kind}"] == script, kind


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_gitops_examples_point_at_the_chart_with_valid_values():
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    apps = _docs(GITOPS / "argocd-application.yaml")
    operator_app = next(a for a in apps if a["spec"]["source"]["path"] == "charts/internvl-operator")
    flux = {d["kind"]: d for d in _docs(GITOPS / "flux.yaml")}
    release = flux["HelmRelease"]
    assert release["spec"]["chart"]["spec"]["chart"] == "charts/internvl-operator"
    for values in (operator_app["spec"]["source"]["helm"]["valuesObject"], release["spec"]["values"]):
        jsonschema.validate({**defaults, **values}, schema)
    assert "ServerSideApply=true" in operator_app["spec"]["syncPolicy"]["syncOptions"]
    # Paths the examples sync exist in this repository.
    models_app = next(a for a in apps if a["spec"]["source"]["path"] == "examples")
    assert (REPO / "examples" / models_app["spec"]["source"]["directory"]["include"]).exists()
    kustomization = flux["Kustomization"]
    folder = REPO / kustomization["spec"]["path"]
    assert (folder / "kustomization.yaml").exists()


def test_flux_models_parse_as_operator_crs():
    from internvl_operator import api

    folder = GITOPS / "models"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    models = {"InternVLService": api.InternVLService, "InternVLFineTune": api.InternVLFineTune}
    for name in kustomization["resources"]:
        for doc in _docs(folder / name):
            models[doc["kind"]].model_validate({"metadata": doc["metadata"], "spec": doc["spec"]})


@pytest.mark.parametrize("path", sorted(p.name for p in GITOPS.glob("*.yaml")))
def test_gitops_yaml_parses(path):
    for doc in _docs(GITOPS / path):
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
