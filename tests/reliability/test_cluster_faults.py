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
