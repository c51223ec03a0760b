"""Handlers against kmock's in-process Kubernetes API (real HTTP on loopback, the real `kubernetes` client).

The handlers are sync (Kopf runs them in a thread); each call here runs in a thread too, while kmock
serves on the test's event loop. After each call the test reads the CR back, as Kopf's next event would.
"""

from __future__ import annotations

import asyncio

import kopf
import pytest
from kubernetes import client

from internvl_operator import constants as c, handlers, metrics
from internvl_operator.kube import Kube
from internvl_operator.settings import OperatorSettings

from operator_helpers import finetune_body, service_body

pytestmark = pytest.mark.asyncio

FT = ("internvl.ai/v1alpha1", "InternVLFineTune")
SVC = ("internvl.ai/v1alpha1", "InternVLService")


@pytest.fixture()
def kube(kmock):
    config = client.Configuration()
    config.host = str(kmock.url).rstrip("/")
    kube = Kube(client.ApiClient(config))
    for resource in ("v1/pods", "v1/events", "v1/services", "v1/persistentvolumeclaims", "v1/configmaps", "batch/v1/jobs",
                     "apps/v1/deployments", "autoscaling/v2/horizontalpodautoscalers", "policy/v1/poddisruptionbudgets",
                     "internvl.ai/v1alpha1/internvlfinetunes", "internvl.ai/v1alpha1/internvlservices"):  # fmt: skip
        kmock.resources[resource] = {}
    handlers.configure(kube=kube, settings=OperatorSettings(worker_image="reg/worker:1"))
    return kube


async def call(fn, *args, **kwargs):
    return await asyncio.to_thread(fn, *args, **kwargs)


async def put(kube, obj):
    assert await call(kube.create, obj)


async def pvcs(kube, *names, namespace="ml"):
    for name in names:
        await put(kube, {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": namespace}, "spec": {}})


async def reconcile(kube, kind, name, fn):
    """Read the CR, run one reconcile, read it back."""
    body = await call(kube.get, *kind, "ml", name)
    await call(fn, body)
    return await call(kube.get, *kind, "ml", name)


async def jobs(kube):
    return {j["metadata"]["name"]: j for j in await call(kube.list, "batch/v1", "Job", "ml", labels={c.LABEL_MANAGED_BY: c.MANAGED_BY})}


async def events(kube):
    items = (await call(kube._call, "GET", "/api/v1/namespaces/ml/events")).get("items", [])
    return [(e["type"], e["reason"]) for e in items]


def condition(obj, cond_type):
    return next(cd for cd in obj["status"]["conditions"] if cd["type"] == cond_type)


async def set_job_status(kube, name, status):
    await call(kube.patch_status, "batch/v1", "Job", "ml", name, status)


async def test_create_makes_the_datacheck_job_once_with_owner_and_event(kube):
    await pvcs(kube, "models", "data", "out")
    await put(kube, finetune_body())
    ft = await reconcile(kube, FT, "tiny", handlers.reconcile_finetune)

    found = await jobs(kube)
    assert list(found) == ["tiny-datacheck"]
    owner = found["tiny-datacheck"]["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("InternVLFineTune", "tiny", "uid-tiny", True)
    assert found["tiny-datacheck"]["spec"]["template"]["spec"]["containers"][0]["image"] == "reg/worker:1"
    assert ft["status"]["phase"] == "Validating" and ft["status"]["observedGeneration"] == 1
    assert ("Normal", "Validating") in await events(kube)

    # An operator restart loses nothing and duplicates nothing: the same reconcile again is a no-op.
    ft = await reconcile(kube, FT, "tiny", handlers.reconcile_finetune)
    assert list(await jobs(kube)) == ["tiny-datacheck"]
    assert ft["status"]["phase"] == "Validating"


async def test_restart_with_lost_status_creates_no_duplicates(kube):
    """Status lost (e.g. restored from a backup without it): the existing Job is observed, not recreated."""
    await pvcs(kube, "models", "data", "out")
    await put(kube, finetune_body())
    await reconcile(kube, FT, "tiny", handlers.reconcile_finetune)
    await call(kube.patch_status, *FT, "ml", "tiny", {"phase": None, "conditions": None})
    await reconcile(kube, FT, "tiny", handlers.reconcile_finetune)
    posts = [r for r in kube_requests(kube) if r == ("POST", "jobs")]
    assert len(posts) == 1


def kube_requests(kube):
    return KUBE_LOG.get(id(kube), [])


KUBE_LOG: dict[int, list] = {}


@pytest.fixture(autouse=True)
def _record_requests(monkeypatch):
    original = Kube._call

    def recording(self, method, path, **kwargs):
        KUBE_LOG.setdefault(id(self), []).append((method, path.rsplit("/", 1)[-1].split("?")[0]))
        return original(self, method, path, **kwargs)

    monkeypatch.setattr(Kube, "_call", recording)
    yield
    KUBE_LOG.clear()


async def test_invalid_spec_fails_permanently_naming_the_field_and_creates_nothing(kube):
    await pvcs(kube, "models", "data", "out")
    await put(kube, finetune_body(deepspeed="zero2"))  # 1 GPU: no CEL on this fake API server
    body = await call(kube.get, *FT, "ml", "tiny")
    with pytest.raises(kopf.PermanentError, match="spec.deepspeed: deepspeed needs more than one GPU"):
        await call(handlers.reconcile_finetune, body)
    ft = await call(kube.get, *FT, "ml", "tiny")
    assert ft["status"]["phase"] == "Failed"
    spec_valid = condition(ft, "SpecValid")
    assert spec_valid["status"] == "False" and spec_valid["reason"] == "InvalidSpec" and "spec.deepspeed" in spec_valid["message"]
    assert await jobs(kube) == {}
    assert ("Warning", "InvalidSpec") in await events(kube)
    # Final until the spec changes: the poll timer does not retry or re-post.
    await call(handlers.reconcile_finetune, ft)
    assert (await events(kube)).count(("Warning", "InvalidSpec")) == 1


async def test_unknown_model_type_is_a_failed_phase(kube):
    await pvcs(kube, "models", "data", "out")
    await put(kube, finetune_body(model={"modelType": "internvl3-3b", "pvc": {"claimName": "models"}}))
    with pytest.raises(kopf.PermanentError, match="unknown model type 'internvl3-3b'.*internvl3-1b"):
        await call(handlers.reconcile_finetune, await call(kube.get, *FT, "ml", "tiny"))
    ft = await call(kube.get, *FT, "ml", "tiny")
    assert ft["status"]["phase"] == "Failed" and condition(ft, "SpecValid")["reason"] == "UnknownModelType"


async def test_missing_pvc_fails_then_recovers_when_it_appears(kube):
    await pvcs(kube, "models", "data")
    await put(kube, finetune_body())
    with pytest.raises(kopf.TemporaryError, match="spec.output.claimName: PersistentVolumeClaim 'out' not found"):
        await call(handlers.reconcile_finetune, await call(kube.get, *FT, "ml", "tiny"))
    ft = await call(kube.get, *FT, "ml", "tiny")
    assert ft["status"]["phase"] == "Failed" and condition(ft, "Failed")["reason"] == "PVCNotFound"
    assert await jobs(kube) == {}  # nothing half-created

    await pvcs(kube, "out")
    ft = await reconcile(kube, FT, "tiny", handlers.reconcile_finetune)
    assert ft["status"]["phase"] == "Validating" and list(await jobs(kube)) == ["tiny-datacheck"]


async def test_pipeline_reads_progress_from_the_rank0_pod_log(kube, kmock):
    await pvcs(kube, "models", "data", "out")
    await put(kube, finetune_body(gpusPerNode=2, nodes=2, method="full", deepspeed="zero3"))
    await reconcile(kube, FT, "tiny", handlers.reconcile_finetune)
    await set_job_status(kube, "tiny-datacheck", {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
    ft = await reconcile(kube, FT, "tiny", handlers.reconcile_finetune)
    assert set(await jobs(kube)) == {"tiny-datacheck", "tiny-train"}
    assert await call(kube.get, "v1", "Service", "ml", "tiny-train") is not None
    assert ft["status"]["phase"] == "Training" and ft["status"]["gpus"] == 4

    labels = {c.LABEL_FINETUNE: "tiny", c.LABEL_COMPONENT: c.COMPONENT_TRAIN}
    for index in (0, 1):
        await put(kube, {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"tiny-train-{index}-x", "namespace": "ml", "labels": labels,
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}}, "status": {"phase": "Running"}})  # fmt: skip
    kmock["get /api/v1/namespaces/ml/pods/tiny-train-0-x/log"] << (
        b'{"event": "progress", "step": 40, "total_steps": 200, "loss": 1.5, "lr": 2e-05, "epoch": 0.2}\n'
    )
    await set_job_status(kube, "tiny-train", {"active": 2})
    ft = await reconcile(kube, FT, "tiny", handlers.reconcile_finetune)
    assert ft["status"]["progress"]["summary"] == "40/200" and ft["status"]["progress"]["loss"] == 1.5


async def test_suspend_deletes_training_job(kube):
    await pvcs(kube, "models", "data", "out")
    await put(kube, finetune_body())
    await reconcile(kube, FT, "tiny", handlers.reconcile_finetune)
    await set_job_status(kube, "tiny-datacheck", {"conditions": [{"type": "Complete", "status": "True"}]})
    await reconcile(kube, FT, "tiny", handlers.reconcile_finetune)
    await set_job_status(kube, "tiny-train", {"active": 1})
    assert "tiny-train" in await jobs(kube)

    await call(kube._call, "PATCH", "/apis/internvl.ai/v1alpha1/namespaces/ml/internvlfinetunes/tiny",
               body={"spec": {"suspend": True}}, content_type="application/merge-patch+json")  # fmt: skip
    ft = await reconcile(kube, FT, "tiny", handlers.reconcile_finetune)
    assert "tiny-train" not in await jobs(kube)
    assert ft["status"]["phase"] == "Suspended"
    assert ("Normal", "Suspended") in await events(kube)


async def test_service_creates_deployment_and_service_and_reports_url(kube):
    await pvcs(kube, "models")
    await put(kube, service_body(disruptionBudget={"minAvailable": 1}))
    svc = await reconcile(kube, SVC, "chat", handlers.reconcile_service)
    assert await call(kube.get, "apps/v1", "Deployment", "ml", "chat") is not None
    assert await call(kube.get, "v1", "Service", "ml", "chat") is not None
    assert await call(kube.get, "policy/v1", "PodDisruptionBudget", "ml", "chat") is not None
    assert svc["status"]["phase"] == "Pending" and svc["status"]["url"] == "http://chat.ml.svc.cluster.local"

    await call(kube.patch_status, "apps/v1", "Deployment", "ml", "chat", {"replicas": 1, "readyReplicas": 1})
    svc = await reconcile(kube, SVC, "chat", handlers.reconcile_service)
    assert svc["status"]["phase"] == "Serving" and condition(svc, "Ready")["status"] == "True"

    # A model change updates the Deployment in place (it then rolls).
    await call(kube._call, "PATCH", "/apis/internvl.ai/v1alpha1/namespaces/ml/internvlservices/chat",
               body={"spec": {"model": {"pvc": {"claimName": "models", "path": "v2"}}}}, content_type="application/merge-patch+json")  # fmt: skip
    await reconcile(kube, SVC, "chat", handlers.reconcile_service)
    dep = await call(kube.get, "apps/v1", "Deployment", "ml", "chat")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model_id_or_path") + 1] == "/models/v2"


async def test_service_from_finetune_waits_then_serves_its_output(kube):
    await put(kube, service_body(model={"fromFineTune": "tiny"}))
    with pytest.raises(kopf.TemporaryError, match="InternVLFineTune 'tiny' not found"):
        await call(handlers.reconcile_service, await call(kube.get, *SVC, "ml", "chat"))
    await put(kube, finetune_body())
    await call(kube.patch_status, *FT, "ml", "tiny", {
        "phase": "Succeeded", "conditions": [{"type": "Complete", "status": "True", "reason": "Completed"}],
        "outputs": {"claimName": "out", "modelPath": "tiny/merged"}})  # fmt: skip
    await pvcs(kube, "out")
    svc = await reconcile(kube, SVC, "chat", handlers.reconcile_service)
    dep = await call(kube.get, "apps/v1", "Deployment", "ml", "chat")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model_id_or_path") + 1] == "/models/tiny/merged"
    assert svc["status"]["model"] == "pvc://out/tiny/merged"


async def test_metrics_count_reconciles_and_phases(kube):
    await pvcs(kube, "models", "data", "out")
    await put(kube, finetune_body())
    before = metrics.RECONCILES.labels(kind="InternVLFineTune")._value.get()
    await reconcile(kube, FT, "tiny", handlers.reconcile_finetune)
    assert metrics.RECONCILES.labels(kind="InternVLFineTune")._value.get() == before + 1
    assert metrics.RESOURCES.labels(kind="InternVLFineTune", phase="Validating")._value.get() >= 1
