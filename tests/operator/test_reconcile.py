"""The fine-tune pipeline and the service state as pure plans: observed children in, actions and status out."""

from __future__ import annotations

from internvl_operator import api, builders, constants as c, reconcile, status as st
from internvl_operator.settings import OperatorSettings

from operator_helpers import finetune_body, service_body

SETTINGS = OperatorSettings()
NOW = "2026-11-26T10:00:00Z"

COMPLETE = {"conditions": [{"type": "Complete", "status": "True"}]}
FAILED = {"failed": 4, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
RUNNING = {"active": 1}


def job(name, status, generation=1):
    return {"metadata": {"name": name, "labels": {builders.GENERATION_LABEL: str(generation)}}, "status": status}


def stage(name, status=None, *, pods=(), log="", generation=1):
    return reconcile.StageObservation(
        job=st.observe_job(name, job(name, status, generation) if status is not None else None), pods=list(pods), log=log
    )


def observe(datacheck=None, train=None, merge=None, service=None, **kw):
    return reconcile.FineTuneObservation(
        datacheck=stage("tiny-datacheck", datacheck, **kw.get("dc", {})),
        train=stage("tiny-train", train, **kw.get("tr", {})),
        merge=stage("tiny-merge", merge, **kw.get("mg", {})),
        service=service,
    )


def plan(ft_body, obs):
    ft = api.InternVLFineTune.model_validate(ft_body)
    return reconcile.plan_finetune(ft, obs, settings=SETTINGS, now=NOW)


def advance(body, obs):
    """Plan, then store the status as the API server would (what the next reconcile reads)."""
    result = plan(body, obs)
    body["status"] = result.status
    return result


def kinds(result):
    return [(m["kind"], m["metadata"]["name"]) for m in result.creates]


def cond(body, cond_type):
    return st.get_condition(body["status"]["conditions"], cond_type)


def test_lora_pipeline_runs_stage_by_stage_to_serving_then_succeeded():
    body = finetune_body(serve={"replicas": 1})
    r = advance(body, observe())
    assert kinds(r) == [("Job", "tiny-datacheck")]
    assert body["status"]["phase"] == "Validating" and body["status"]["gpus"] == 1
    assert r.events == [("Normal", "Validating", "checking the dataset before any GPU is requested")]

    # Nothing new while the data check runs; repeating the reconcile creates nothing twice.
    r = advance(body, observe(datacheck=RUNNING))
    assert r.creates == [] and body["status"]["phase"] == "Validating" and r.events == []

    r = advance(body, observe(datacheck=COMPLETE))
    assert kinds(r) == [("Job", "tiny-train")]  # one node: no rendezvous Service
    assert cond(body, "DatasetValidated")["status"] == "True"
    assert body["status"]["phase"] == "Training"

    log = '{"event": "progress", "step": 30, "total_steps": 120, "loss": 0.7, "lr": 1e-4, "epoch": 0.25}\n'
    r = advance(body, observe(datacheck=COMPLETE, train=RUNNING, tr={"log": log}))
    assert r.creates == []
    assert body["status"]["progress"]["summary"] == "30/120" and body["status"]["progress"]["loss"] == 0.7
    assert "30/120" in body["status"]["message"]

    done = log + '{"event": "done", "checkpoint": "/output/tiny/checkpoint-120"}\n'
    r = advance(body, observe(datacheck=COMPLETE, train=COMPLETE, tr={"log": done}))
    assert kinds(r) == [("Job", "tiny-merge")]
    assert body["status"]["phase"] == "Merging"
    assert body["status"]["outputs"]["checkpointPath"] == "tiny/checkpoint-120"

    r = advance(body, observe(datacheck=COMPLETE, train=COMPLETE, merge=COMPLETE))
    assert kinds(r) == [("InternVLService", "tiny")]
    assert r.creates[0]["spec"]["model"]["pvc"] == {"claimName": "out", "path": "tiny/merged"}
    assert body["status"]["phase"] == "Serving" and body["status"]["completionTime"] == NOW
    assert body["status"]["outputs"]["modelPath"] == "tiny/merged"
    assert cond(body, "Complete")["status"] == "True"

    loading = {"status": {"url": "http://tiny.ml.svc.cluster.local", "readyReplicas": 0, "message": "Loading"}}
    r = advance(body, observe(datacheck=COMPLETE, train=COMPLETE, merge=COMPLETE, service=loading))
    assert r.creates == [] and body["status"]["phase"] == "Serving" and "Loading" in body["status"]["message"]

    # Succeeded once a replica answers: the service's URL and the outputs are in status.
    svc = {"status": {"url": "http://tiny.ml.svc.cluster.local", "readyReplicas": 1}}
    r = advance(body, observe(datacheck=COMPLETE, train=COMPLETE, merge=COMPLETE, service=svc))
    assert r.creates == [] and body["status"]["url"] == "http://tiny.ml.svc.cluster.local"
    assert body["status"]["phase"] == "Succeeded" and r.events[-1][:2] == ("Normal", "Succeeded")
    assert "http://tiny.ml.svc.cluster.local" in body["status"]["message"]
    # Final for this generation: nothing more happens even if the service later scales to zero.
    r = advance(body, observe(datacheck=COMPLETE, train=COMPLETE, merge=COMPLETE, service=loading))
    assert r.creates == [] and r.deletes == [] and body["status"]["phase"] == "Succeeded"


def test_done_stages_are_not_rerun_after_their_jobs_are_gone():
    """ttlSecondsAfterFinished deletes finished Jobs; the conditions remember they succeeded."""
    body = finetune_body(merge=False)
    advance(body, observe())
    advance(body, observe(datacheck=COMPLETE))
    r = advance(body, observe(train=COMPLETE, tr={"log": '{"event": "done", "checkpoint": "/output/tiny/checkpoint-9"}'}))
    assert r.creates == [] and body["status"]["phase"] == "Succeeded"
    assert body["status"]["outputs"]["adapterPath"] == "tiny/checkpoint-9"
    r = advance(body, observe())  # every Job deleted by TTL
    assert r.creates == [] and body["status"]["phase"] == "Succeeded"


def test_multi_node_creates_headless_service_with_the_job():
    body = finetune_body(method="full", gpusPerNode=2, nodes=2, deepspeed="zero2")
    advance(body, observe())
    r = advance(body, observe(datacheck=COMPLETE))
    assert kinds(r) == [("Service", "tiny-train"), ("Job", "tiny-train")]
    assert body["status"]["gpus"] == 4


def test_bad_rows_fail_before_any_gpu_job():
    body = finetune_body()
    advance(body, observe())
    log = "/data/train.jsonl:17: 2 <image> tags but 1 image\n/data/train.jsonl:40: image not found: a.jpg\n"
    r = advance(body, observe(datacheck=FAILED, dc={"log": log}))
    assert r.creates == []
    assert body["status"]["phase"] == "Failed"
    dv = cond(body, "DatasetValidated")
    assert dv["status"] == "False" and dv["reason"] == "BadRows"
    assert "/data/train.jsonl:17" in dv["message"] and "/data/train.jsonl:40" in dv["message"]
    assert r.events[0][0] == "Warning"
    # Final for this generation: later polls change nothing, even after the pods are gone.
    r = advance(body, observe())
    assert r.creates == [] and body["status"]["phase"] == "Failed"


def test_fixing_the_spec_after_a_failure_reruns_the_failed_stage():
    body = finetune_body()
    advance(body, observe())
    advance(body, observe(datacheck=FAILED, dc={"log": "/data/train.jsonl:1: bad\n"}))
    body["metadata"]["generation"] = 2  # user fixed the dataset path
    r = advance(body, observe(datacheck=FAILED))
    assert [(d.kind, d.name) for d in r.deletes] == [("Job", "tiny-datacheck")] and r.creates == []
    assert body["status"]["phase"] == "Pending"
    r = advance(body, observe())  # the old Job is gone
    assert kinds(r) == [("Job", "tiny-datacheck")]
    assert r.creates[0]["metadata"]["labels"][builders.GENERATION_LABEL] == "2"


OOM_POD = {
    "metadata": {"name": "tiny-train-0-abc", "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
    "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]},
}


def test_training_failure_copies_the_pod_reason_and_log_tail():
    body = finetune_body()
    advance(body, observe())
    advance(body, observe(datacheck=COMPLETE))
    log = "step 3\ntorch.OutOfMemoryError: CUDA out of memory. token=hf_abcdefghijklmnopqrstuvwxyz\n"
    r = advance(body, observe(datacheck=COMPLETE, train=FAILED, tr={"pods": [OOM_POD], "log": log}))
    status = body["status"]
    assert status["phase"] == "Failed"
    assert status["failure"]["reason"] == "OOMKilled" and status["failure"]["exitCode"] == 137
    assert status["failure"]["pod"] == "tiny-train-0-abc"
    assert "CUDA out of memory" in status["failure"]["logTail"] and "hf_abc" not in status["failure"]["logTail"]
    training = cond(body, "TrainingSucceeded")
    assert training["reason"] == "OOMKilled" and "BackoffLimitExceeded" in training["message"]
    assert r.events == [("Warning", "Failed", status["message"])]


def test_a_retried_pod_is_reported_while_the_job_still_runs():
    body = finetune_body()
    advance(body, observe())
    advance(body, observe(datacheck=COMPLETE))
    advance(body, observe(datacheck=COMPLETE, train=RUNNING, tr={"pods": [OOM_POD]}))
    assert body["status"]["phase"] == "Training"
    assert "OOMKilled" in body["status"]["message"] and body["status"]["failure"]["reason"] == "OOMKilled"


def test_suspend_deletes_the_training_job_and_resume_recreates_it():
    body = finetune_body()
    advance(body, observe())
    advance(body, observe(datacheck=COMPLETE))
    body["spec"]["suspend"] = True
    r = advance(body, observe(datacheck=COMPLETE, train=RUNNING))
    assert [(d.kind, d.name) for d in r.deletes] == [("Job", "tiny-train")] and r.creates == []
    assert body["status"]["phase"] == "Suspended"
    assert "checkpoints stay on PVC out" in cond(body, "Suspended")["message"]
    r = advance(body, observe(datacheck=COMPLETE))  # Job gone, still suspended: nothing is created
    assert r.creates == [] and r.deletes == []

    body["spec"]["suspend"] = False
    r = advance(body, observe(datacheck=COMPLETE))
    assert kinds(r) == [("Job", "tiny-train")]
    args = r.creates[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--resume_from_checkpoint") + 1] == "latest"
    assert cond(body, "Suspended")["status"] == "False" and body["status"]["phase"] == "Training"


def test_full_finetune_without_serve_succeeds_with_its_checkpoint():
    body = finetune_body(method="full")
    advance(body, observe())
    advance(body, observe(datacheck=COMPLETE))
    r = advance(body, observe(datacheck=COMPLETE, train=COMPLETE, tr={"log": '{"event": "done", "checkpoint": "/output/tiny/checkpoint-7"}'}))
    assert r.creates == []  # no merge for a full fine-tune
    assert body["status"]["phase"] == "Succeeded" and body["status"]["outputs"]["modelPath"] == "tiny/checkpoint-7"


# --------------------------------------------------------------------------- service


def plan_svc(body, *, deployment=None, pods=(), existing=()):
    svc = api.InternVLService.model_validate(body)
    obs = reconcile.ServiceObservation(deployment=deployment, pods=list(pods), existing=set(existing))
    return reconcile.plan_service(svc, obs, settings=SETTINGS, now=NOW)


def test_service_is_pending_then_serving():
    r = plan_svc(service_body())
    assert [m["kind"] for m in r.updates] == ["Deployment", "Service"]
    assert r.status["phase"] == "Pending" and r.status["url"] == "http://chat.ml.svc.cluster.local"
    assert r.status["model"] == "pvc://models/m"
    r = plan_svc(service_body(), deployment={"status": {"replicas": 1, "readyReplicas": 1}})
    assert r.status["phase"] == "Serving" and r.status["readyReplicas"] == 1
    ready = st.get_condition(r.status["conditions"], "Ready")
    assert ready["status"] == "True"


def test_service_not_ready_while_pods_crashloop():
    crash = {"metadata": {"name": "chat-1"}, "status": {"containerStatuses": [
        {"name": "server", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
         "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "model not found"}}}]}}  # fmt: skip
    r = plan_svc(service_body(), deployment={"status": {"replicas": 1, "readyReplicas": 0}}, pods=[crash])
    assert r.status["phase"] == "Failed"
    ready = st.get_condition(r.status["conditions"], "Ready")
    assert ready["status"] == "False" and ready["reason"] == "CrashLoopBackOff" and "model not found" in ready["message"]
    assert r.events[0][0] == "Warning"


def test_turning_autoscaling_off_deletes_the_hpa():
    r = plan_svc(service_body(), existing={"HorizontalPodAutoscaler"})
    assert [(d.kind, d.name) for d in r.deletes] == [("HorizontalPodAutoscaler", "chat")]
    r = plan_svc(service_body(autoscaling={"maxReplicas": 3}), existing={"HorizontalPodAutoscaler"})
    assert r.deletes == [] and "HorizontalPodAutoscaler" in [m["kind"] for m in r.updates]
