"""kubectl apply of an InternVLFineTune -> data check -> training -> merge -> InternVLService -> answers.

The real `internvl-operator` (a subprocess), the real kubectl, and the real worker CLI (run as local
processes by the process kubelet, or in the worker image on a real cluster). Tiny sizes throughout: the
1 MB random InternVL, 32 rows, 8 optimizer steps on CPU.
"""
from __future__ import annotations

import json
import re

import pytest

from .cluster import EXAMPLE, bad_dataset, condition, example_finetune
from .data import COLORS, png_data_url

pytestmark = pytest.mark.e2e

NAME = "tiny-lora-e2e"  # metadata.name in examples/finetune-lora-tiny-e2e.yaml
TRAIN = f"internvl.ai/finetune={NAME},app.kubernetes.io/component=train"


def job_names(ns) -> list[str]:
    return sorted(j["metadata"]["name"] for j in ns.list("Job") if j["metadata"]["name"] != "tiny-model")


def test_apply_trains_merges_and_serves(e2e_ns):
    ns = e2e_ns
    ns.start_operator()
    ns.kubectl("apply", "-f", str(EXAMPLE))

    cr = ns.wait_finetune(NAME, phases={"Succeeded"}, timeout=300)
    status = cr["status"]
    # Every stage ran, in order, as its own Job.
    assert job_names(ns) == [f"{NAME}-datacheck", f"{NAME}-merge", f"{NAME}-train"]
    for cond in ("SpecValid", "DatasetValidated", "TrainingSucceeded", "MergeSucceeded", "ServiceCreated", "Complete"):
        assert condition(cr, cond).get("status") == "True", (cond, status)
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 8, status["progress"]
    assert status["progress"]["summary"] == "8/8" and status["progress"]["loss"] > 0
    outputs = status["outputs"]
    assert outputs["claimName"] == "internvl-output" and outputs["directory"] == NAME
    assert re.fullmatch(rf"{NAME}/checkpoint-8", outputs["checkpointPath"]), outputs
    assert outputs["mergedModelPath"] == outputs["modelPath"] == f"{NAME}/merged"
    assert status["serviceName"] == NAME
    assert status["url"] == f"http://{NAME}.{ns.name}.svc.cluster.local"
    assert status["url"] in status["message"]
    events = [e for e in ns.list("Event") if e["involvedObject"].get("name") == NAME
              and e["involvedObject"].get("kind") == "InternVLFineTune"]
    assert {e["reason"] for e in events} == {"Validating", "Training", "Merging", "Serving", "Succeeded"}, events

    # The InternVLService the operator made serves the merged model through a Deployment + Service.
    svc = ns.get("InternVLService", NAME)
    assert svc["spec"]["model"]["pvc"] == {"claimName": "internvl-output", "path": f"{NAME}/merged"}
    assert svc["metadata"]["ownerReferences"][0]["kind"] == "InternVLFineTune"
    assert svc["status"]["phase"] == "Serving" and svc["status"]["readyReplicas"] == 1, svc["status"]
    deployment = ns.get("Deployment", NAME)
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["serve", "--model_id_or_path", f"/models/{NAME}/merged"]  # the output PVC, mounted read-only

    # A text-generation client asks about an image (markdown image with a data: URL, as TGI takes it).
    from text_generation import Client

    url = ns.service_url(NAME, 80)
    client = Client(url, timeout=60)
    image = png_data_url(COLORS["red"], (40, 40))
    response = client.generate(f"![]({image})What is the dominant color?", max_new_tokens=4, do_sample=False)
    assert isinstance(response.generated_text, str)
    assert 1 <= response.details.generated_tokens <= 4
    # The image really goes through the server's image path: a broken one is refused, not ignored.
    from text_generation.errors import BadRequestError, ValidationError

    with pytest.raises((BadRequestError, ValidationError)):
        client.generate("![](data:image/png;base64,bm90IGFuIGltYWdl)What is the dominant color?", max_new_tokens=1)

    # kubectl get shows the printer columns.
    table = ns.kubectl("get", "internvlfinetunes").stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "GPUS", "AGE"], table
    cells = row.split()
    assert cells[:3] == [NAME, "Succeeded", "8/8"] and cells[4] == "0", table  # GPUS 0: a CPU run
    assert float(cells[3]) == pytest.approx(status["progress"]["loss"]), table
    assert ns.operator.errors() == [], ns.operator.log_tail()

    # Deleting the fine-tune deletes everything it made (ownerReferences), down to the serving process.
    ns.kubectl("delete", "internvlfinetune", NAME, "--wait=false")

    def leftovers():
        return [f"{kind}/{obj['metadata']['name']}"
                for kind in ("InternVLService", "Job", "Deployment", "ReplicaSet", "Service", "Pod")
                for obj in ns.list(kind) if not obj["metadata"]["name"].startswith("tiny-model")]

    ns.wait(lambda: not leftovers(), timeout=90, what="the fine-tune's children to be deleted")
    with pytest.raises(Exception):  # nobody answers any more (connection refused, or 503 from the proxy)
        client.generate("hello", max_new_tokens=1)


def test_bad_dataset_fails_at_data_check_with_the_row(e2e_ns):
    ns = e2e_ns
    ns.put_dataset("tiny-dataset", bad_dataset(bad_line=7))
    ns.start_operator()
    ns.kubectl("apply", "-f", str(EXAMPLE))
    cr = ns.wait_finetune(NAME, phases={"Failed"}, timeout=180)
    cond = condition(cr, "DatasetValidated")
    assert cond["status"] == "False" and cond["reason"] == "BadRows", cond
    assert re.search(r"train\.jsonl:7: missing field 'response'", cond["message"]), cond["message"]
    assert "train.jsonl:7" in cr["status"]["message"]
    # Nothing past the data check was created: no GPU was ever requested.
    assert job_names(ns) == [f"{NAME}-datacheck"]


def short_run(*, max_steps: int = 8) -> dict:
    """The example without merge and serving: the pipeline ends at Succeeded after training."""
    ft = example_finetune()
    ft["spec"]["merge"] = False
    del ft["spec"]["serve"]
    ft["spec"]["training"]["maxSteps"] = max_steps
    return ft


def start_event(log: str) -> dict:
    """The worker's first JSON line: {"event": "start", ..., "resume_from": <checkpoint or null>}."""
    for line in log.splitlines():
        if line.startswith('{"event": "start"'):
            return json.loads(line)
    raise AssertionError(f"no start event in the log:\n{log[-3000:]}")


def test_killed_trainer_is_retried_and_resumes_from_its_checkpoint(e2e_ns):
    ns = e2e_ns
    if ns.cluster.real:
        pytest.skip("kills a process through the process kubelet (emulator only)")
    # The node "loses" the trainer right after its first checkpoint (step 2 of 16) was written.
    hook = ns.cluster.kubelet.kill_on_log(ns.name, f"{NAME}-train-", r'"event": "checkpoint"')
    ns.start_operator()
    ns.apply(short_run(max_steps=16))
    cr = ns.wait_finetune(NAME, phases={"Succeeded"}, timeout=240)

    pods = {p["metadata"]["name"]: p for p in ns.pods(TRAIN)}
    assert len(pods) == 2 and len(hook.killed) == 1 and hook.killed[0] in pods, (list(pods), hook.killed)
    first = pods.pop(hook.killed[0])
    (second,) = pods.values()
    killed = first["status"]["containerStatuses"][0]["state"]["terminated"]
    assert killed["exitCode"] == 137 and killed["reason"] == "Error", killed
    first_log = ns.log(first["metadata"]["name"])
    assert start_event(first_log)["resume_from"] is None
    assert '"event": "done"' not in first_log, "the kill came after training had finished"
    resumed = start_event(ns.log(second["metadata"]["name"]))["resume_from"]
    assert resumed and re.search(r"checkpoint-2/?$", resumed), resumed
    job = ns.get("Job", f"{NAME}-train")["status"]
    assert (job.get("failed"), job.get("succeeded")) == (1, 1), job
    assert cr["status"]["progress"]["summary"] == "16/16"
    assert cr["status"]["outputs"]["checkpointPath"] == f"{NAME}/checkpoint-16"
    assert "failure" not in cr["status"], cr["status"]  # cleared once the retry succeeded


def test_operator_restart_mid_training_creates_no_duplicates(e2e_ns):
    ns = e2e_ns
    ns.start_operator()
    ns.apply(short_run())
    train_job = ns.wait(lambda: ns.get("Job", f"{NAME}-train"), timeout=120, what="the training Job")
    assert not (train_job.get("status") or {}).get("succeeded"), "training finished before the restart"
    before = {j["metadata"]["name"]: j["metadata"]["uid"] for j in ns.list("Job")}
    ns.operator.stop(kill=True)  # a crash: no graceful shutdown
    ns.start_operator()
    cr = ns.wait_finetune(NAME, phases={"Succeeded"}, timeout=240)
    after = {j["metadata"]["name"]: j["metadata"]["uid"] for j in ns.list("Job")}
    assert after == before, (before, after)  # same Jobs, not re-created
    assert len(ns.pods(TRAIN)) == 1
    assert len(ns.pods(f"internvl.ai/finetune={NAME},app.kubernetes.io/component=datacheck")) == 1
    assert cr["status"]["progress"]["summary"] == "8/8"
    assert ns.operator.starts == 2


def test_suspend_stops_training_and_resume_continues_from_the_checkpoint(e2e_ns):
    ns = e2e_ns
    emulated = not ns.cluster.real
    if emulated:
        # Freeze the trainer right after its first checkpoint, so "mid-training" lasts as long as the test needs.
        import signal

        ns.cluster.kubelet.kill_on_log(ns.name, f"{NAME}-train-", r'"event": "checkpoint"', sig=signal.SIGSTOP)
    ns.start_operator()
    ns.apply(short_run(max_steps=10 if emulated else 400))  # a real cluster trains on: give it steps to suspend in

    def checkpointed(cr):
        return bool((cr["status"].get("outputs") or {}).get("checkpointPath"))

    ns.wait_finetune(NAME, phases={"Training"}, check=checkpointed, timeout=180)
    first = ns.pods(TRAIN)[0]["metadata"]["name"]

    ns.kubectl("patch", "internvlfinetune", NAME, "--type=merge", "-p", '{"spec": {"suspend": true}}')
    cr = ns.wait_finetune(NAME, phases={"Suspended"}, timeout=60)
    assert condition(cr, "Suspended")["status"] == "True"
    ns.wait(lambda: ns.get("Job", f"{NAME}-train") is None and not ns.pods(TRAIN), timeout=60,
            what="the training Job and its pods to be deleted")
    checkpoint = cr["status"]["outputs"]["checkpointPath"]

    ns.kubectl("patch", "internvlfinetune", NAME, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    pod = ns.wait(lambda: [p for p in ns.pods(TRAIN) if p["metadata"]["name"] != first], timeout=60,
                  what="a new training pod")[0]["metadata"]["name"]
    resumed = ns.wait(lambda: '"event": "start"' in ns.log(pod) and start_event(ns.log(pod))["resume_from"],
                      timeout=120, what=f"pod {pod} to start training")
    # The new pod continues from a checkpoint the suspended one wrote: the one in status at suspend time, or a
    # later one if that pod saved again before it was stopped (it trains until its pod is deleted).
    match = re.search(r"checkpoint-(\d+)/?$", resumed)
    assert match and int(match.group(1)) >= int(checkpoint.rsplit("-", 1)[-1]), (resumed, checkpoint)
    step = int(match.group(1))
    if emulated:
        cr = ns.wait_finetune(NAME, phases={"Succeeded"}, timeout=180)
        assert cr["status"]["progress"]["summary"] == "10/10"
        assert condition(cr, "Suspended")["status"] == "False"
    else:
        ns.wait_finetune(NAME, phases={"Training"}, timeout=180,
                         check=lambda cr: (cr["status"].get("progress") or {}).get("step", 0) > step)
