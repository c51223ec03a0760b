"""The process kubelet: Jobs run `python -c ...` as local processes with a PVC mapped to a host
dir, failures are retried up to backoffLimit, Indexed jobs get their index, a Deployment becomes
ready through its HTTP readiness probe and a crashed server is restarted."""
import functools
import json
import os
import time
import urllib.error
import urllib.request

import pytest
from kubernetes import client

import polling

pytestmark = pytest.mark.skipif("os.environ.get('INTERNVL_E2E_REAL') == '1'")


wait_until = functools.partial(polling.wait_until, timeout=20.0, step=0.1)


def job(name, code, backoff=6, volumes=None, mounts=None, env=None, **spec):
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": dict(backoffLimit=backoff, template={"spec": {
                "restartPolicy": "Never", "volumes": volumes or [],
                "containers": [{"name": "main", "image": "python", "command": ["python", "-c", code],
                                "env": env or [], "volumeMounts": mounts or []}]}}, **spec)}


def conditions(batch, name):
    st = batch.read_namespaced_job_status(name, "default").status or client.V1JobStatus()
    return {c.type: c for c in st.conditions or []}, st


def test_job_writes_to_pvc_and_completes(kube_api, kube_client, kubelet, kubectl):
    core, batch = client.CoreV1Api(kube_client), client.BatchV1Api(kube_client)
    core.create_namespaced_persistent_volume_claim("default", {"metadata": {"name": "data"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    core.create_namespaced_secret("default", {"metadata": {"name": "s"}, "stringData": {}, "data": {
        "token": "c2VjcmV0"}})  # "secret"
    code = ("import os; open('/data/out/result.txt','w').write(os.environ['TOKEN']+' '+os.environ['POD']); "
            "print('hello from the job')")
    batch.create_namespaced_job("default", job(
        "writer", "import os; os.makedirs('/data/out', exist_ok=True); " + code,
        volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}],
        mounts=[{"name": "d", "mountPath": "/data"}],
        env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
             {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]))
    conds, st = wait_until(lambda: (lambda c: c if "Complete" in c[0] else None)(conditions(batch, "writer")))
    assert st.succeeded == 1 and st.start_time and st.completion_time
    pods = core.list_namespaced_pod("default", label_selector="job-name=writer").items
    assert len(pods) == 1 and pods[0].status.phase == "Succeeded"
    term = pods[0].status.container_statuses[0].state.terminated
    assert term.exit_code == 0 and term.reason == "Completed"
    host_file = os.path.join(kubelet.root_dir, "pvc", "default", "data", "out", "result.txt")
    assert open(host_file).read() == f"secret {pods[0].metadata.name}"
    assert kubectl("logs", pods[0].metadata.name).stdout == "hello from the job\n"
    assert "hello from the job" in kubectl("logs", "job/writer").stdout


def test_job_retries_until_backoff_limit(kube_client, kubelet):
    core, batch = client.CoreV1Api(kube_client), client.BatchV1Api(kube_client)
    batch.create_namespaced_job("default", job("flaky", "import sys; sys.exit(3)", backoff=2))
    conds, st = wait_until(lambda: (lambda c: c if "Failed" in c[0] else None)(conditions(batch, "flaky")))
    assert conds["Failed"].reason == "BackoffLimitExceeded" and st.failed == 3 and not st.active
    pods = core.list_namespaced_pod("default", label_selector="job-name=flaky").items
    assert len(pods) == 3  # the first try and backoffLimit=2 retries
    assert {p.status.container_statuses[0].state.terminated.exit_code for p in pods} == {3}


def test_indexed_job_and_oom(kube_client, kubelet):
    core, batch = client.CoreV1Api(kube_client), client.BatchV1Api(kube_client)
    batch.create_namespaced_job("default", job("idx", "import os; print(os.environ['JOB_COMPLETION_INDEX'])",
                                               completionMode="Indexed", completions=2, parallelism=2))
    conds, st = wait_until(lambda: (lambda c: c if "Complete" in c[0] else None)(conditions(batch, "idx")))
    assert st.completed_indexes == "0-1"
    pods = core.list_namespaced_pod("default", label_selector="job-name=idx").items
    logs = sorted(core.read_namespaced_pod_log(p.metadata.name, "default").strip() for p in pods)
    assert logs == ["0", "1"]
    oom = job("oom", "import time; time.sleep(30)", backoff=0)
    oom["spec"]["template"]["metadata"] = {"annotations": {"kubelet.internvl.test/oom-after-seconds": "0.2"}}
    batch.create_namespaced_job("default", oom)
    conds, st = wait_until(lambda: (lambda c: c if "Failed" in c[0] else None)(conditions(batch, "oom")))
    pod = core.list_namespaced_pod("default", label_selector="job-name=oom").items[0]
    term = pod.status.container_statuses[0].state.terminated
    assert (term.reason, term.exit_code) == ("OOMKilled", 137)


def test_kill_on_log_signals_the_pod_when_its_log_matches(kube_client, kubelet):
    """The hook the e2e tests use to "lose" a trainer right after a checkpoint line: only the first pod is
    killed (times=1, exit 137, reason Error), the Job's retry runs to completion."""
    core, batch = client.CoreV1Api(kube_client), client.BatchV1Api(kube_client)
    hook = kubelet.kill_on_log("default", "saver-", r"saved 2")
    code = ("import time\nfor i in range(1, 6):\n    print(f'saved {i}', flush=True)\n    time.sleep(0.3)\n")
    batch.create_namespaced_job("default", job("saver", code, backoff=1))
    conds, st = wait_until(lambda: (lambda c: c if "Complete" in c[0] else None)(conditions(batch, "saver")))
    assert (st.failed, st.succeeded) == (1, 1)
    pods = {p.metadata.name: p for p in core.list_namespaced_pod("default", label_selector="job-name=saver").items}
    assert len(hook.killed) == 1 and hook.killed[0] in pods and hook.times == 0
    killed = pods.pop(hook.killed[0])
    term = killed.status.container_statuses[0].state.terminated
    assert (term.reason, term.exit_code) == ("Error", 137)
    assert core.read_namespaced_pod_log(killed.metadata.name, "default").split() == ["saved", "1", "saved", "2"]
    (retry,) = pods.values()
    assert core.read_namespaced_pod_log(retry.metadata.name, "default").count("saved") == 5


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not reaped yet
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_kill_takes_the_whole_container_like_torchrun_workers(kube_client, kubelet):
    """torchrun starts its workers in a new session: an OOM kill (SIGKILL) must still take them."""
    core, batch = client.CoreV1Api(kube_client), client.BatchV1Api(kube_client)
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
            "print(child.pid, flush=True)\ntime.sleep(60)\n")
    batch.create_namespaced_job("default", job("tree", code, backoff=0))
    pod = wait_until(lambda: next(iter(core.list_namespaced_pod("default", label_selector="job-name=tree").items), None))
    name = pod.metadata.name
    child = int(wait_until(lambda: core.read_namespaced_pod_log(name, "default").strip()))
    assert _alive(child)
    assert kubelet.oom_kill("default", name)
    wait_until(lambda: not _alive(child), timeout=5)
    conds, st = wait_until(lambda: (lambda c: c if "Failed" in c[0] else None)(conditions(batch, "tree")))
    term = core.read_namespaced_pod(name, "default").status.container_statuses[0].state.terminated
    assert (term.reason, term.exit_code) == ("OOMKilled", 137)


SERVER = """
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == '/crash':
            os._exit(1)
        self.send_response(200); self.end_headers(); self.wfile.write(b'ok ' + os.environ['MSG'].encode())
    def log_message(self, *a): pass
port = int(sys.argv[1].split('=')[1])
http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()
"""


def test_deployment_ready_via_probe_and_restart(kube_api, kube_client, kubelet):
    apps, core = client.AppsV1Api(kube_client), client.CoreV1Api(kube_client)
    core.create_namespaced_config_map("default", {"metadata": {"name": "cfg"}, "data": {"msg": "hi"}})
    apps.create_namespaced_deployment("default", {"metadata": {"name": "web"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{
            "name": "srv", "image": "python", "command": ["python", "-c", SERVER], "args": ["--port=8080"],
            "env": [{"name": "MSG", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "msg"}}}],
            "ports": [{"containerPort": 8080, "name": "http"}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1}}]}}}})
    core.create_namespaced_service("default", {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}})
    wait_until(lambda: (apps.read_namespaced_deployment_status("web", "default").status
                        or client.V1DeploymentStatus()).ready_replicas == 1)
    dep = apps.read_namespaced_deployment_status("web", "default").status
    assert dep.available_replicas == 1 and {c.type: c.status for c in dep.conditions}["Available"] == "True"
    url = wait_until(lambda: kubelet.service_url("default", "web", 80))
    assert urllib.request.urlopen(url + "/").read() == b"ok hi"
    # service_url reads the pods directly; the kubelet writes the Service's ports annotation on its next pass
    ports = wait_until(lambda: (core.read_namespaced_service("web", "default").metadata.annotations or {}).get("kubelet.internvl.test/ports"))
    assert json.loads(ports) == {"80": int(url.rsplit(":", 1)[1])}
    # The API server's service proxy (the URLs `kubectl proxy` serves) reaches the same backend.
    proxy = f"{kube_api.url}/api/v1/namespaces/default/services"
    assert urllib.request.urlopen(f"{proxy}/web:80/proxy/any/path?x=1").read() == b"ok hi"
    assert urllib.request.urlopen(f"{proxy}/web/proxy/").read() == b"ok hi"
    core.create_namespaced_service("default", {"metadata": {"name": "nobody"}, "spec": {
        "selector": {"app": "none"}, "ports": [{"port": 80}]}})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{proxy}/nobody/proxy/")
    assert info.value.code == 503 and b"no endpoints available" in info.value.read()
    try:
        urllib.request.urlopen(url + "/crash", timeout=2)
    except Exception:
        pass
    pod = wait_until(lambda: next((p for p in core.list_namespaced_pod("default", label_selector="app=web").items
                                   if p.status.container_statuses
                                   and p.status.container_statuses[0].restart_count >= 1
                                   and p.status.container_statuses[0].ready), None))
    assert pod.status.container_statuses[0].last_state.terminated.exit_code == 1
    assert pod.metadata.owner_references[0].kind == "ReplicaSet"
    # deleting the Deployment takes ReplicaSet, pod and process with it
    apps.delete_namespaced_deployment("web", "default")
    wait_until(lambda: not core.list_namespaced_pod("default", label_selector="app=web").items)
