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

    cr = ns.wait_finetune(NAME, phases={"Serving"}, timeout=300,
                          check=lambda cr: bool((cr.get("status") or {}).get("url")))
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

    # The InternVLService the operator made serves the merged model through a Deployment + Service.
    svc = ns.get("InternVLService", NAME)
    assert svc["spec"]["model"]["pvc"] == {"claimName": "internvl-output", "path": f"{NAME}/merged"}
    assert svc["metadata"]["ownerReferences"][0]["kind"] == "InternVLFineTune"
    ns.wait(lambda: (ns.get("InternVLService", NAME) or {}).get("status", {}).get("phase") == "Serving",
            timeout=120, what="InternVLService Serving")
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
    assert response.details.generated_tokens >= 1
    assert response.details.prefill is not None

    # kubectl get shows the printer columns.
    table = ns.kubectl("get", "internvlfinetunes").stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "GPUS", "AGE"], table
    assert row.split()[:3] == [NAME, "Serving", "8/8"], table
    assert ns.operator.errors() == [], ns.operator.log_tail()


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
