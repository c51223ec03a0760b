"""Pod failure reasons, worker progress lines, conditions and redaction."""

from __future__ import annotations

import pytest

from internvl_operator import status as st


def pod(name="p", *, phase="Running", conditions=None, statuses=None, reason=None, index=None, created="2026-01-01T00:00:00Z"):
    meta = {"name": name, "creationTimestamp": created}
    if index is not None:
        meta["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    status = {"phase": phase, "conditions": conditions or [], "containerStatuses": statuses or []}
    if reason:
        status["reason"] = reason
    return {"metadata": meta, "status": status}


def test_oomkilled_wins_over_a_generic_error():
    pods = [
        pod("a", statuses=[{"name": "trainer", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]),
        pod("b", statuses=[{"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]),
    ]
    failure = st.worst_pod_failure(pods)
    assert (failure.reason, failure.exit_code, failure.pod, failure.container) == ("OOMKilled", 137, "b", "trainer")
    assert "memory" in failure.message


def test_crashloop_reports_the_last_termination():
    p = pod(statuses=[{"name": "server", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                       "lastState": {"terminated": {"exitCode": 3, "reason": "Error", "message": "no such model"}}}])  # fmt: skip
    failure = st.pod_failure(p)
    assert (failure.reason, failure.exit_code) == ("CrashLoopBackOff", 3)
    assert "no such model" in failure.summary()
    assert st.pod_failure(pod(statuses=[{"name": "s", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                         "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}])).reason == "OOMKilled"  # fmt: skip


def test_a_restarted_replica_still_loading_reports_its_last_crash():
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    loading = pod(statuses=[{"name": "server", "ready": False, "restartCount": 1, "state": {"running": {}}, "lastState": oom}])
    failure = st.pod_failure(loading)
    assert (failure.reason, failure.exit_code) == ("OOMKilled", 137) and "restarted 1 time(s)" in failure.message
    crashed = {"terminated": {"exitCode": 1, "reason": "Error"}}
    assert st.pod_failure(pod(statuses=[{"name": "s", "ready": False, "restartCount": 2, "state": {"running": {}},
                                         "lastState": crashed}])).summary().startswith("Error (exit code 1)")  # fmt: skip
    # Once it is ready again (or never crashed), nothing is failing.
    assert st.pod_failure(pod(statuses=[{"name": "s", "ready": True, "restartCount": 1, "state": {"running": {}}, "lastState": oom}])) is None
    assert st.pod_failure(pod(statuses=[{"name": "s", "ready": False, "restartCount": 0, "state": {"running": {}}}])) is None


def test_image_pull_and_unschedulable():
    pull = pod(statuses=[{"name": "t", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found: reg/x:1"}}}])
    assert st.pod_failure(pull).reason == "ImagePullBackOff"
    assert "reg/x:1" in st.pod_failure(pull).summary()
    pending = pod(phase="Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                               "message": "0/4 nodes: 4 Insufficient nvidia.com/gpu"}])  # fmt: skip
    failure = st.pod_failure(pending)
    assert failure.reason == "Unschedulable" and "nvidia.com/gpu" in failure.message


def test_healthy_and_completed_pods_are_not_failures():
    assert st.pod_failure(pod(statuses=[{"name": "t", "state": {"running": {}}}])) is None
    assert st.pod_failure(pod(statuses=[{"name": "t", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}])) is None
    assert st.pod_failure(pod(statuses=[{"name": "t", "state": {"waiting": {"reason": "ContainerCreating"}}}])) is None
    assert st.pod_failure(pod(reason="Evicted")).reason == "Evicted"


def test_newest_pod_of_index_zero():
    pods = [pod("old", index=0, created="2026-01-01T00:00:00Z"), pod("new", index=0, created="2026-01-02T00:00:00Z"),
            pod("rank1", index=1, created="2026-01-03T00:00:00Z")]  # fmt: skip
    assert st.newest_pod(pods, index=0)["metadata"]["name"] == "new"


LOG = """\
[rank0] loading model
{"event": "progress", "step": 10, "total_steps": 100, "loss": 1.23, "lr": 9e-05, "epoch": 0.1, "samples_per_s": 3.2, "tokens_per_s": 8000}
not json {"event": "progress", "step": 99}
{"event": "progress", "step": 20, "total_steps": 100, "loss": 0.98, "lr": 8e-05, "epoch": 0.2}
{"event": "progress", "step": "bad", "loss": NaN}
{"event": "done", "checkpoint": "/output/x/checkpoint-100"}
"""


def test_progress_is_the_last_well_formed_progress_line():
    progress = st.parse_worker_log(LOG)
    assert (progress.step, progress.total_steps, progress.loss) == (20, 100, 0.98)


def test_progress_fields_and_done_checkpoint():
    progress = st.parse_worker_log(LOG.replace('{"event": "progress", "step": "bad", "loss": NaN}\n', ""))
    assert (progress.step, progress.total_steps, progress.loss, progress.epoch) == (20, 100, 0.98, 0.2)
    assert progress.checkpoint == "/output/x/checkpoint-100"
    assert progress.to_status()["summary"] == "20/100"
    assert st.relative_to_output(progress.checkpoint) == "x/checkpoint-100"


def test_checkpoint_events_update_the_checkpoint_while_training():
    log = (
        '{"event": "checkpoint", "step": 2, "path": "/output/x/checkpoint-2"}\n'
        '{"event": "progress", "step": 3, "total_steps": 8}\n'
        '{"event": "checkpoint", "step": 4, "path": "/output/x/checkpoint-4"}\n'
    )
    assert st.parse_worker_log(log).checkpoint == "/output/x/checkpoint-4"
    assert st.parse_worker_log(log + '{"event": "done", "checkpoint": "/output/x/checkpoint-8"}').checkpoint == "/output/x/checkpoint-8"


@pytest.mark.parametrize("printed", ["/output/x/checkpoint-4", "/var/lib/kubelet/pvc/ns/out/x/checkpoint-4/", "x/checkpoint-4"])
def test_checkpoint_path_is_relative_to_the_output_pvc_whatever_the_mount(printed):
    assert st.checkpoint_path("x", printed) == "x/checkpoint-4"


def test_malformed_progress_values_are_dropped_not_stored():
    progress = st.parse_worker_log('{"event": "progress", "step": "ten", "loss": NaN, "total_steps": true}')
    assert progress.step is None and progress.to_status() == {}
    progress = st.parse_worker_log('{"event": "progress", "step": 5, "loss": NaN, "total_steps": true}')
    assert progress.step == 5 and progress.loss is None and progress.total_steps is None


def test_bad_rows_from_data_check_output():
    text = "checking 3 files\n/data/a.jsonl:17: 2 <image> tags but 1 image\n/data/a.jsonl:40: image not found: x.jpg\nFAILED\n"
    assert st.bad_rows(text) == ["/data/a.jsonl:17: 2 <image> tags but 1 image", "/data/a.jsonl:40: image not found: x.jpg"]


def test_tokens_never_reach_status():
    text = "login with hf_abcdefghijklmnopqrstuvwxyz123\nAuthorization: Bearer sk-123\napi_key=s3cr3t ok"
    tail = st.log_tail(text)
    assert "hf_abc" not in tail and "sk-123" not in tail and "s3cr3t" not in tail
    assert tail.count("***") == 3


def test_log_tail_is_bounded():
    text = "\n".join(f"line {i} " + "x" * 500 for i in range(100))
    tail = st.log_tail(text, lines=10)
    assert len(tail) <= 2000 and tail.endswith("x") and "line 99" in tail


def test_condition_transition_time_moves_only_on_flip():
    conds = st.set_condition([], "Ready", status=False, reason="Loading", now="t1")
    conds = st.set_condition(conds, "Ready", status=False, reason="Loading", message="still", now="t2")
    assert conds[0]["lastTransitionTime"] == "t1" and conds[0]["message"] == "still"
    conds = st.set_condition(conds, "Ready", status=True, reason="Ready", now="t3")
    assert conds[0]["lastTransitionTime"] == "t3" and len(conds) == 1


def test_job_outcome():
    assert not st.observe_job("j", None).exists
    running = st.observe_job("j", {"metadata": {}, "status": {"active": 2}})
    assert running.running and running.active == 2
    failed = st.observe_job("j", {"metadata": {"labels": {"internvl.ai/generation": "3"}},
                                  "status": {"failed": 4, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}})  # fmt: skip
    assert failed.failed and failed.reason == "BackoffLimitExceeded" and failed.generation_label == 3
    done = st.observe_job("j", {"metadata": {}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}})
    assert done.succeeded and not done.running


def test_a_worker_log_tail_is_reduced_to_its_error_line():
    """With FallbackToLogsOnError the termination message is the log's tail: progress lines, a traceback's end,
    then internvl's one-line error. Status keeps that line; a message without one stays as it is."""
    tail = "\n".join([
        '{"event": "progress", "step": 2, "loss": 1.2}',
        "Traceback (most recent call last):",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB.",
        "internvl: error: GPU out of memory at step 3 (71.2 GB at the peak of 79.2 GB; 0 of 24 decoder layers checkpointed); try --gradient_checkpointing true",
        "",
    ])  # fmt: skip
    failure = st.pod_failure(pod(statuses=[{"name": "trainer", "state": {"terminated": {"exitCode": 2, "reason": "Error", "message": tail}}}]))
    assert failure.message.startswith("internvl: error: GPU out of memory at step 3") and "\n" not in failure.message
    plain = st.pod_failure(pod(statuses=[{"name": "trainer", "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "  no such model\n"}}}]))
    assert plain.message == "no such model"
