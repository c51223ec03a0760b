"""Cluster faults on the e2e harness (API emulator + process kubelet + the real `internvl-operator`):
API server errors, timeouts and 410s while the operator reconciles; the model server crashing; a training pod lost
mid-run. Emulator only: the faults are injected through its test hooks.
"""
from __future__ import annotations

import json
import re
import signal

import pytest

from tests.e2e.cluster import condition
from tests.e2e.conftest import e2e_cluster, e2e_ns  # noqa: F401  (fixtures)
from tests.e2e.test_finetune_e2e import NAME, TRAIN, job_names, short_run, start_event

pytestmark = pytest.mark.e2e

OPERATOR_UA = "OpenAPI-Generator"  # the operator's `kubernetes` client (Kopf's own calls say kopf/...)
DATACHECK = f"internvl.ai/finetune={NAME},app.kubernetes.io/component=datacheck"


@pytest.fixture
def emulated(e2e_ns):
    if e2e_ns.cluster.real:
        pytest.skip("injects faults through the API emulator and the process kubelet")
    return e2e_ns


def test_api_errors_timeouts_and_410s_while_reconciling(emulated):
    ns = emulated
    server = ns.cluster.server
    jobs, pods = rf"/namespaces/{ns.name}/jobs", rf"/namespaces/{ns.name}/pods"
    # The operator gives up on an answer after 2 s; the delayed requests below take 3 s and are then served,
    # so a Job create that "timed out" really was created: the retry must find it (409), not make another.
    ns.operator.env = {"INTERNVL_OPERATOR_API_TIMEOUT_S": "2"}
    faults = [
        server.inject_fault(jobs, "POST", status=0, delay=3, times=1, user_agent=OPERATOR_UA),  # data-check create
        server.inject_fault(jobs, "GET", status=500, times=2, user_agent=OPERATOR_UA),
        server.inject_fault(pods, "GET", status=503, times=2, user_agent=OPERATOR_UA),
    ]
    server.gone_on_next_watches(3)  # Kopf's first watches start with a 410
    ns.start_operator()
    ns.apply(short_run(max_steps=12))
    ns.wait(lambda: ns.get("Job", f"{NAME}-datacheck"), timeout=60, what="the data-check Job")
    # While the data check runs and training starts: more errors, timeouts, every watch expired, history compacted.
    faults += [
        server.inject_fault(jobs, "POST", status=0, delay=3, times=1, user_agent=OPERATOR_UA),  # training create
        server.inject_fault(jobs, "GET", status=500, times=3, user_agent=OPERATOR_UA),
        server.inject_fault(rf"{pods}/[^/]+/log", "GET", status=0, delay=3, times=2, user_agent=OPERATOR_UA),
    ]
    server.expire_watches()
    server.compact()
    ns.wait_finetune(NAME, phases={"Training"}, timeout=90)
    faults += [
        server.inject_fault(pods, "GET", status=500, times=3, user_agent=OPERATOR_UA),
        server.inject_fault(jobs, "GET", status=0, delay=3, times=1, user_agent=OPERATOR_UA),
    ]
    server.expire_watches()
    server.compact()
    server.gone_on_next_watches(2)
    cr = ns.wait_finetune(NAME, phases={"Succeeded"}, timeout=120)

    unused = [(f.method, f.path, f.status, f.delay) for f in faults if f.times > 0]
    assert not unused, f"faults the operator never hit: {unused}"
    assert server._gone_next_watches == 0, "not every forced 410 reached a watch"
    assert cr["status"]["progress"]["summary"] == "12/12"
    assert condition(cr, "TrainingSucceeded")["status"] == "True"
    # One Job per stage, each created once (a timed-out create that did land is found, not repeated).
    assert job_names(ns) == [f"{NAME}-datacheck", f"{NAME}-train"]
    created = [r for r in server.requests_for(jobs, verb="create", user_agent=OPERATOR_UA) if r.status == 201]
    assert len(created) == 2, [(r.path, r.status) for r in server.requests_for(jobs, verb="create")]
    assert len(ns.pods(TRAIN)) == 1 and len(ns.pods(DATACHECK)) == 1
    # The operator said what went wrong and retried; nothing crashed.
    log = ns.operator.log_path.read_text(errors="replace")
    retries = [line for line in log.splitlines() if "failed temporarily" in line and "Kubernetes API" in line]
    assert any("HTTP 500" in line for line in retries), ns.operator.log_tail(80)
    assert any("HTTP 503" in line for line in retries), ns.operator.log_tail(80)
    assert any("HTTP 0" in line and "timed out" in line.lower() for line in retries), ns.operator.log_tail(80)
    assert ns.operator.errors() == [], ns.operator.log_tail(80)
    assert ns.operator.alive


SERVICE = "tiny-svc"


def tiny_service() -> dict:
    return {
        "apiVersion": "internvl.ai/v1alpha1", "kind": "InternVLService", "metadata": {"name": SERVICE},
        "spec": {"model": {"modelType": "internvl-tiny", "pvc": {"claimName": "models", "path": "tiny"}},
                 "engine": "worker", "replicas": 1, "gpus": 0,
                 "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}, "startupTimeoutSeconds": 300},
    }


def generate(url: str) -> dict:
    import urllib.request

    body = json.dumps({"inputs": "What is the dominant color?", "parameters": {"max_new_tokens": 2}}).encode()
    req = urllib.request.Request(url + "/generate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        return json.loads(r.read())


def test_model_server_crash_restarts_and_status_says_why(emulated):
    ns = emulated
    kubelet = ns.cluster.kubelet
    ns.start_operator()
    ns.apply(tiny_service())

    def ready_status():
        st = (ns.get("InternVLService", SERVICE) or {}).get("status") or {}
        return st if condition({"status": st}, "Ready").get("status") == "True" else None

    def down_status(reason: str, exit_code: int):
        """The Ready condition while no replica is ready: False, naming the crash and its exit code."""
        st = (ns.get("InternVLService", SERVICE) or {}).get("status") or {}
        ready = condition({"status": st}, "Ready")
        if ready.get("status") == "False" and ready.get("reason") == reason and f"exit code {exit_code}" in ready.get("message", ""):
            return st
        return None

    ns.wait(ready_status, timeout=60, what=f"InternVLService {SERVICE} to be Ready")
    assert generate(ns.service_url(SERVICE))["generated_text"] is not None
    (pod,) = ns.pods(f"app.kubernetes.io/instance={SERVICE}") or ns.list("Pod")
    name = pod["metadata"]["name"]

    # 1. The kernel OOM-kills the server: restarted in place; while it reloads the service is not Ready, saying why.
    assert kubelet.oom_kill(ns.name, name)
    down = ns.wait(lambda: down_status("OOMKilled", 137), timeout=30, what="Ready=False reason OOMKilled")
    assert down["phase"] == "Failed" and down["readyReplicas"] == 0, down
    assert down["failure"]["reason"] == "OOMKilled" and down["failure"]["exitCode"] == 137, down["failure"]
    up = ns.wait(ready_status, timeout=60, what=f"InternVLService {SERVICE} to be Ready again after the OOM kill")
    assert up["phase"] == "Serving" and up["readyReplicas"] == 1 and "failure" not in up, up
    cs = ns.get("Pod", name)["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 1 and cs["lastState"]["terminated"]["reason"] == "OOMKilled", cs
    generate(ns.service_url(SERVICE))

    # 2. The server dies on its own (killed, exit 137, reason Error): same pod restarts, status names the crash.
    hook = kubelet.kill_on_log(ns.name, name, r".")  # the log already has lines: killed at the next tick
    ns.wait(lambda: hook.killed, timeout=10, what="the kill hook to fire")
    down = ns.wait(lambda: down_status("CrashLoopBackOff", 137) or down_status("Error", 137), timeout=30,
                   what="Ready=False naming the crash (exit code 137)")
    assert down["phase"] == "Failed", down
    ns.wait(ready_status, timeout=60, what=f"InternVLService {SERVICE} to be Ready again after the crash")
    cs = ns.get("Pod", name)["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 2 and cs["lastState"]["terminated"]["exitCode"] == 137, cs
    assert len(ns.list("Pod")) == 1  # restarted in place, not replaced
    generate(ns.service_url(SERVICE))
    events = {e["reason"] for e in ns.list("Event") if e["involvedObject"].get("name") == SERVICE}
    assert {"Serving", "Failed"} <= events, events
    assert ns.operator.errors() == [], ns.operator.log_tail(80)


def test_training_pod_lost_mid_run_resumes_from_the_latest_checkpoint(emulated):
    """A node lost mid-training, single-node form: the process kubelet cannot run a multi-node rendezvous (one
    loopback host, no pod DNS), so the lost "node" is the only training pod, deleted while it trains."""
    ns = emulated
    # Freeze the trainer right after its first checkpoint: "mid-training" lasts until the pod is deleted.
    hook = ns.cluster.kubelet.kill_on_log(ns.name, f"{NAME}-train-", r'"event": "checkpoint"', sig=signal.SIGSTOP)
    ns.start_operator()
    ns.apply(short_run(max_steps=8))
    ns.wait(lambda: hook.killed, timeout=120, what="the trainer to write its first checkpoint")
    (lost,) = hook.killed
    assert '"event": "done"' not in ns.log(lost)
    ns.kubectl("delete", "pod", lost, "--wait=false")  # the node is gone, and its pod with it

    def replacement():
        return [p["metadata"]["name"] for p in ns.pods(TRAIN) if p["metadata"]["name"] != lost]

    (new,) = ns.wait(replacement, timeout=60, what="the Job controller to make a new training pod")
    resumed = ns.wait(lambda: '"event": "start"' in ns.log(new) and start_event(ns.log(new))["resume_from"],
                      timeout=90, what=f"pod {new} to start training from a checkpoint")
    assert re.search(r"checkpoint-2/?$", resumed), resumed  # the newest complete one: at most one interval lost
    cr = ns.wait_finetune(NAME, phases={"Succeeded"}, timeout=120)
    assert cr["status"]["progress"]["summary"] == "8/8"
    assert cr["status"]["outputs"]["checkpointPath"] == f"{NAME}/checkpoint-8"
    assert ns.get("Pod", lost) is None and [p["metadata"]["name"] for p in ns.pods(TRAIN)] == [new]
    assert job_names(ns) == [f"{NAME}-datacheck", f"{NAME}-train"]
    assert "failure" not in cr["status"], cr["status"]
    assert ns.operator.errors() == [], ns.operator.log_tail(80)
