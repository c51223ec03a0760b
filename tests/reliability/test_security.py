"""Security: pods unprivileged, tokens only from Secrets and never in status, Events or Job specs, no remote
code (trust_remote_code) anywhere, pickle weights refused unless explicitly allowed."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from internvl_operator import api, builders

REPO = Path(__file__).resolve().parents[2]
NS = "sec"
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"


def _finetune(**spec) -> api.InternVLFineTune:
    body = {"metadata": {"name": "ft", "namespace": NS, "generation": 1},
            "spec": {"model": {"modelType": "internvl-tiny", "hubId": "OpenGVLab/InternVL3-1B-hf", "hubTokenSecret": {"name": "hf", "key": "token"}},
                     "dataset": {"pvc": {"claimName": "data"}, "files": ["train.jsonl"]}, "output": {"claimName": "out"},
                     "gpusPerNode": 2, "serve": {"gpus": 1}, **spec}}
    return api.InternVLFineTune.model_validate(body)


def every_pod_spec():
    ft = _finetune()
    yield "datacheck", builders.build_datacheck_job(ft)["spec"]["template"]["spec"], True
    yield "train", builders.build_train_job(ft)["spec"]["template"]["spec"], True
    yield "merge", builders.build_merge_job(ft)["spec"]["template"]["spec"], True
    for engine in ("worker", "vllm"):
        svc = api.InternVLService.model_validate({"metadata": {"name": "s", "namespace": NS, "generation": 1},
                                                  "spec": {"model": {"modelType": "internvl-tiny", "hubId": "OpenGVLab/InternVL3-1B-hf"}, "engine": engine, "gpus": 1}})
        yield f"serve-{engine}", builders.build_deployment(svc)["spec"]["template"]["spec"], engine == "worker"


@pytest.mark.parametrize("name,pod,read_only", list(every_pod_spec()), ids=[p[0] for p in every_pod_spec()])
def test_pods_are_unprivileged(name, pod, read_only):
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0 and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        csc = container["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"] == {"drop": ["ALL"]}
        assert csc["readOnlyRootFilesystem"] is read_only
        env = {e["name"]: e.get("value") for e in container["env"]}
        written = [v for k, v in env.items() if k in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME") and v]
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        # Everything a read-only container writes lies on a mounted volume.
        assert all(any(v == m or v.startswith(m + "/") for m in mounts) for v in written), (written, mounts)
        # Secrets come by reference only.
        for e in container["env"]:
            if e["name"] in ("HF_TOKEN", "VLLM_API_KEY"):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"]


def test_no_remote_code_anywhere():
    """`trust_remote_code` would run a model repository's Python: nothing in the product passes it on."""
    tracked = subprocess.run(["git", "ls-files", "worker", "operator", "charts", "images", "examples", "crds"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for rel in tracked:
        text = (REPO / rel).read_text(errors="ignore")
        for m in re.finditer(r"trust_remote_code\s*=\s*True|[\"']--trust-remote-code[\"']|trust_remote_code:\s*true", text):
            hits.append(f"{rel}: {m.group(0)}")
    assert not hits, hits
    svc = api.InternVLService.model_validate({"metadata": {"name": "s", "namespace": NS}, "spec": {
        "model": {"modelType": "internvl-tiny", "pvc": {"claimName": "m"}}, "engine": "vllm", "gpus": 1}})
    assert "--trust-remote-code" not in builders.build_deployment(svc)["spec"]["template"]["spec"]["containers"][0]["args"]


def test_pickle_weights_are_refused_unless_allowed(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from internvl_worker.modeling import ModelLoadError, check_safetensors, load_model

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that would run code")
    with pytest.raises(ModelLoadError, match="only pickle weights .*pytorch_model.bin.*INTERNVL_ALLOW_PICKLE=1"):
        load_model(model, dtype="fp32")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="LoRA adapter .* only pickle weights"):
        check_safetensors(adapter, what="LoRA adapter", stem="adapter_model")
    monkeypatch.setenv("INTERNVL_ALLOW_PICKLE", "1")
    check_safetensors(adapter, what="LoRA adapter", stem="adapter_model")  # the explicit opt-in


def test_hub_token_never_reaches_status_events_or_job_specs(tmp_path):
    """A recognisable token in the HF token Secret; a worker that prints it when it fails. The operator's
    Jobs reference the Secret, and the failure it copies onto the CR (log tail) is redacted."""
    from kubernetes import client

    from internvl_operator import constants as c, handlers
    from internvl_operator.kube import Kube
    from internvl_operator.settings import OperatorSettings
    from tests.kube.apiserver import ApiServer

    log_dir = tmp_path / "logs"
    server = ApiServer(log_dir=str(log_dir)).start()
    try:
        cfg = client.Configuration()
        cfg.host = server.url
        kube = Kube(client.ApiClient(cfg))
        for path in sorted((REPO / "crds").glob("*.yaml")):
            kube._call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body=yaml.safe_load(path.read_text()))
        kube._call("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        for claim in ("data", "out"):
            kube.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": NS}, "spec": {}})
        kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf", "namespace": NS}, "stringData": {"token": FAKE_TOKEN}})
        manifest = {"apiVersion": c.API_VERSION, "kind": c.FINETUNE_KIND, "metadata": {"name": "ft", "namespace": NS},
                    "spec": {"model": {"modelType": "internvl-tiny", "hubId": "OpenGVLab/InternVL3-1B-hf", "hubTokenSecret": {"name": "hf", "key": "token"}},
                             "dataset": {"pvc": {"claimName": "data"}, "files": ["train.jsonl"]}, "output": {"claimName": "out"}}}
        kube.create(manifest)
        handlers.configure(kube=kube, settings=OperatorSettings(worker_image="reg/worker:1"))
        handlers.reconcile_finetune(kube.get(c.API_VERSION, c.FINETUNE_KIND, NS, "ft"))
        job = kube.get("batch/v1", "Job", NS, "ft-datacheck")
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in env

        # The data-check pod fails and its log shows the token (a library printing its environment).
        labels = {**builders.finetune_labels("ft", c.COMPONENT_DATACHECK), "job-name": "ft-datacheck"}
        kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ft-datacheck-abcde", "namespace": NS, "labels": labels},
                     "spec": {"containers": [{"name": "datacheck", "image": "reg/worker:1"}]}})
        kube.patch_status("v1", "Pod", NS, "ft-datacheck-abcde", {"phase": "Failed", "containerStatuses": [
            {"name": "datacheck", "ready": False, "restartCount": 0, "image": "reg/worker:1", "imageID": "",
             "state": {"terminated": {"exitCode": 2, "reason": "Error"}}}]})
        pod_log = log_dir / NS / "ft-datacheck-abcde" / "datacheck.log"
        pod_log.parent.mkdir(parents=True)
        pod_log.write_text(f"loading OpenGVLab/InternVL3-1B-hf\nHF_TOKEN={FAKE_TOKEN}\nAuthorization: Bearer {FAKE_TOKEN}\n"
                           f"internvl: error: could not download with token {FAKE_TOKEN}\n")
        kube.patch_status("batch/v1", "Job", NS, "ft-datacheck", {"failed": 1, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]})
        handlers.reconcile_finetune(kube.get(c.API_VERSION, c.FINETUNE_KIND, NS, "ft"))
        cr = kube.get(c.API_VERSION, c.FINETUNE_KIND, NS, "ft")
        assert cr["status"]["phase"] == "Failed", cr["status"]
        assert "***" in json.dumps(cr["status"]["failure"]), cr["status"]  # the log tail was copied onto the CR ...
        events = kube._call("GET", f"/api/v1/namespaces/{NS}/events").get("items", [])
        jobs = kube._call("GET", f"/apis/batch/v1/namespaces/{NS}/jobs").get("items", [])
        for what, obj in (("CR", cr), ("Events", events), ("Jobs", jobs)):
            assert FAKE_TOKEN not in json.dumps(obj), f"the token leaked into {what}"  # ... without the token
    finally:
        server.stop()
