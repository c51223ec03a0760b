"""The e2e harness: a cluster (the API emulator + process kubelet, or a real one), the real
`internvl-operator` as a subprocess, and per-test namespaces with the PVCs, dataset and tiny model a
fine-tune needs.

    cluster = Cluster.start(root)             # emulator + kubelet + CRDs (or INTERNVL_E2E_REAL=1 + KUBECONFIG)
    ns = cluster.namespace("e2e-happy")       # namespace, PVCs, dataset ConfigMap, tiny model on PVC `models`
    ns.start_operator()                       # `internvl-operator -n e2e-happy` with KUBECONFIG in its env
    ns.kubectl("apply", "-f", "examples/finetune-lora-tiny-e2e.yaml")
    ns.wait_finetune("tiny-lora-e2e", phases={"Serving"}, timeout=240)

Everything goes through the API (the `kubernetes` client's ApiClient, or the real kubectl binary), so the
same calls work against a real cluster. Failures raise AssertionError with `ns.diagnose()`: the CRs'
status, Jobs, pods with their last log lines, and the operator's log tail.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

import yaml

from tests.kube.binaries import kubectl_path, write_kubeconfig
from tests.kube.fixtures import real_cluster

from . import data

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
EXAMPLE = REPO / "examples" / "finetune-lora-tiny-e2e.yaml"
EXAMPLE_DATASET = REPO / "examples" / "data" / "tiny-colors.jsonl"
VENV_BIN = Path(sys.executable).parent

# What the example CR names (the tests keep these fixed so the example applies unchanged).
MODELS_CLAIM = "models"
OUTPUT_CLAIM = "internvl-output"
DATASET_CONFIGMAP = "tiny-dataset"
TINY_MODEL_PATH = "tiny"  # inside the models PVC

DEFAULT_WORKER_IMAGE = "ghcr.io/internvl-operator/worker:0.1.0"

# kind -> (API prefix, plural)
RESOURCES = {
    "Namespace": ("/api/v1", "namespaces"),
    "Pod": ("/api/v1", "pods"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Event": ("/api/v1", "events"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "ReplicaSet": ("/apis/apps/v1", "replicasets"),
    "InternVLFineTune": ("/apis/internvl.ai/v1alpha1", "internvlfinetunes"),
    "InternVLService": ("/apis/internvl.ai/v1alpha1", "internvlservices"),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Kube:
    """JSON in, JSON out, over the `kubernetes` package's ApiClient (auth from the kubeconfig)."""

    def __init__(self, kubeconfig: str):
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        self.api = client.ApiClient(cfg)
        # Not the operator's `OpenAPI-Generator/...`: fault injection can aim at the operator and spare the test.
        self.api.user_agent = "internvl-e2e-tests"

    def close(self) -> None:
        self.api.close()

    def call(self, method: str, path: str, body: Any = None, *, query: dict | None = None,
             content_type: str = "application/json", raw: bool = False) -> Any:
        from kubernetes import client

        if query:
            path = f"{path}?{urlencode(query)}"
        headers = {"Accept": "application/json, */*", "Content-Type": content_type, **self.api.default_headers}
        self.api.update_params_for_auth(headers, None, ["BearerToken"], path, method, body)
        try:
            resp = self.api.call_api(method, self.api.configuration.host + path, header_params=headers, body=body,
                                     _request_timeout=30)
            text = resp.read().decode()
        except client.ApiException as exc:
            raise ApiError(exc.status or 0, str(exc.reason)) from exc
        if not 200 <= resp.status < 300:
            try:
                message = json.loads(text).get("message", text)
            except ValueError:
                message = text
            raise ApiError(resp.status, message)
        if raw:
            return text
        return json.loads(text) if text else {}

    @staticmethod
    def path(kind: str, namespace: str | None, name: str = "") -> str:
        prefix, plural = RESOURCES[kind]
        base = f"{prefix}/namespaces/{namespace}/{plural}" if namespace and kind != "Namespace" else f"{prefix}/{plural}"
        return f"{base}/{name}" if name else base

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self.call("GET", self.path(kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str | None = None, *, selector: str | None = None) -> list[dict]:
        query = {"labelSelector": selector} if selector else None
        return self.call("GET", self.path(kind, namespace), query=query).get("items") or []

    def create(self, obj: dict) -> dict:
        return self.call("POST", self.path(obj["kind"], obj["metadata"].get("namespace")), obj)

    def ensure(self, obj: dict) -> None:
        try:
            self.create(obj)
        except ApiError as exc:
            if exc.status != 409:
                raise

    def patch(self, kind: str, name: str, namespace: str, body: dict) -> dict:
        return self.call("PATCH", self.path(kind, namespace, name), body, content_type="application/merge-patch+json")

    def delete(self, kind: str, name: str, namespace: str | None = None, *, policy: str = "Background") -> bool:
        try:
            self.call("DELETE", self.path(kind, namespace, name),
                      {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": policy})
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    def log(self, namespace: str, pod: str, *, previous: bool = False, tail: int | None = None) -> str:
        query: dict[str, Any] = {}
        if previous:
            query["previous"] = "true"
        if tail:
            query["tailLines"] = tail
        try:
            return self.call("GET", self.path("Pod", namespace, pod) + "/log", query=query or None, raw=True)
        except ApiError:
            return ""


def wait_for(fn: Callable[[], Any], *, timeout: float, what: str, diagnose: Callable[[], str] | None = None,
             interval: float = 0.3) -> Any:
    """Poll fn until it returns something truthy; fn may raise AssertionError to fail at once."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}\n{diagnose() if diagnose else ''}") from None
        except ApiError as exc:  # an API hiccup is not a verdict; keep polling until the deadline
            last_error = exc
        if time.monotonic() > deadline:
            extra = f" (last API error: {last_error})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}\n"
                                 f"{diagnose() if diagnose else ''}")
        time.sleep(interval)


def condition(obj: dict | None, cond_type: str) -> dict:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == cond_type:
            return cond
    return {}


# --------------------------------------------------------------------------------------- operator


class OperatorProcess:
    """`internvl-operator -n <namespace>` as a subprocess: KUBECONFIG in its env, log to a file."""

    def __init__(self, kubeconfig: str, namespace: str, log_path: Path, env: dict[str, str] | None = None):
        self.kubeconfig, self.namespace, self.log_path = kubeconfig, namespace, log_path
        self.env = env or {}
        self.popen: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "OperatorProcess":
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "INTERNVL_OPERATOR_POLL_INTERVAL_S": "1",  # progress and Job completion within a second
            "INTERNVL_OPERATOR_LIVENESS_PORT": "0",
            "INTERNVL_OPERATOR_METRICS_PORT": "0",
            "INTERNVL_OPERATOR_WORKER_IMAGE": os.environ.get("INTERNVL_E2E_WORKER_IMAGE", DEFAULT_WORKER_IMAGE),
            "INTERNVL_OPERATOR_IMAGE_PULL_POLICY": os.environ.get("INTERNVL_E2E_IMAGE_PULL_POLICY", "IfNotPresent"),
            # Small requests, so a kind/minikube node can schedule every stage of the tiny run.
            "INTERNVL_OPERATOR_DATACHECK_RESOURCES": '{"requests": {"cpu": "100m", "memory": "512Mi"}}',
            "INTERNVL_OPERATOR_MERGE_RESOURCES": '{"requests": {"cpu": "100m", "memory": "512Mi"}}',
            "INTERNVL_OPERATOR_TRAIN_DEFAULT_RESOURCES": '{"requests": {"cpu": "500m", "memory": "1Gi"}}',
            "INTERNVL_OPERATOR_SHM_SIZE": "256Mi",
            **self.env,
        }
        env.pop("INTERNVL_OPERATOR_NAMESPACES", None)
        binary = shutil.which("internvl-operator", path=str(VENV_BIN)) or shutil.which("internvl-operator")
        argv = [binary] if binary else [sys.executable, "-m", "internvl_operator"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"---- operator start #{self.starts + 1}\n".encode())
            log.flush()
            self.popen = subprocess.Popen([*argv, "--namespace", self.namespace], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, *, kill: bool = False, timeout: float = 10) -> None:
        """SIGTERM (Kopf's graceful stop), or SIGKILL for a crash; then wait for the process."""
        if not self.alive:
            return
        assert self.popen is not None
        try:
            os.killpg(self.popen.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no operator log)"
        return "\n".join(text.splitlines()[-lines:])

    def errors(self) -> list[str]:
        """Tracebacks and handler errors in the log (Kopf logs `Handler ... failed with an exception`)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if "Traceback" in line or "failed with an exception" in line]


# --------------------------------------------------------------------------------------- cluster


class Cluster:
    """The API emulator + process kubelet in this process, or a real cluster from $KUBECONFIG."""

    def __init__(self, root: Path):
        self.root = root
        self.server = None
        self.kubelet = None
        self.kubeconfig = ""
        self.kube: Kube | None = None
        self.models_dir: Path | None = None  # emulator: the shared `models` PVC, tiny model prebuilt

    @property
    def real(self) -> bool:
        return self.server is None

    @classmethod
    def start(cls, root: Path, *, models_dir: Path | None = None, api_port: int = 0) -> "Cluster":
        """models_dir (emulator only): a host dir already holding `tiny/` that every namespace's
        `models` PVC maps to (the model is built once instead of by a Job per test)."""
        self = cls(root)
        root.mkdir(parents=True, exist_ok=True)
        if real_cluster():
            self.kubeconfig = os.environ["KUBECONFIG"]
        else:
            from tests.kube.apiserver import ApiServer
            from tests.kube.kubelet import ProcessKubelet

            log_dir = root / "pod-logs"
            self.server = ApiServer(port=api_port, log_dir=str(log_dir), bookmark_interval=1.0).start()
            self.kubeconfig = write_kubeconfig(self.server.url, root / "kubeconfig")
            pvc_dirs = {}
            if models_dir is not None:
                self.models_dir = models_dir
                pvc_dirs[MODELS_CLAIM] = str(models_dir)
            env = {
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                # 2-core CI machines: one thread per worker process keeps the operator and API responsive.
                "OMP_NUM_THREADS": os.environ.get("INTERNVL_E2E_OMP_THREADS", "1"),
            }
            self.kubelet = ProcessKubelet(self.server.url, str(root / "kubelet"), log_dir=str(log_dir),
                                          pvc_dirs=pvc_dirs, extra_env=env).start()
        self.kube = Kube(self.kubeconfig)
        self.kubectl("apply", "--server-side", "-f", str(CRD_DIR))
        for crd in ("internvlfinetunes.internvl.ai", "internvlservices.internvl.ai"):
            self.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        return self

    def stop(self) -> None:
        if self.kube is not None:
            self.kube.close()
        if self.kubelet is not None:
            self.kubelet.stop()
        if self.server is not None:
            self.server.stop()

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60,
                namespace: str | None = None) -> subprocess.CompletedProcess:
        argv = [kubectl_path(), "--kubeconfig", self.kubeconfig]
        if namespace:
            argv += ["--namespace", namespace]
        proc = subprocess.run([*argv, *args], input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def namespace(self, prefix: str, *, exact: bool = False) -> "Namespace":
        """A Namespace helper named `<prefix>-<5 random chars>` (or exactly `prefix`); not created yet."""
        name = prefix if exact else f"{prefix[:57].rstrip('-')}-{uuid.uuid4().hex[:5]}"
        return Namespace(self, name)


# --------------------------------------------------------------------------------------- namespace


class Namespace:
    """One test's namespace: its PVCs, dataset, tiny model, operator, and helpers to wait and diagnose."""

    def __init__(self, cluster: Cluster, name: str):
        self.cluster, self.name = cluster, name
        self.kube = cluster.kube
        assert self.kube is not None
        self.dir = cluster.root / "namespaces" / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.operator = OperatorProcess(cluster.kubeconfig, name, self.dir / "operator.log")
        self._proxies: list[subprocess.Popen] = []

    # ---- setup / teardown
    def create(self, *, dataset: str | None = None) -> "Namespace":
        kube = self.kube
        kube.ensure({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.name,
                                                                          "labels": {"internvl.ai/e2e": "true"}}})
        for claim in (MODELS_CLAIM, OUTPUT_CLAIM):
            kube.ensure(pvc_manifest(claim, self.name))
        self.put_dataset(DATASET_CONFIGMAP, dataset if dataset is not None else EXAMPLE_DATASET.read_text())
        self.ensure_tiny_model()
        return self

    def put_dataset(self, name: str, jsonl: str, key: str = "train.jsonl") -> None:
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": self.name},
              "data": {key: jsonl}}
        if self.kube.get("ConfigMap", name, self.name) is None:
            self.kube.create(cm)
        else:
            self.kube.patch("ConfigMap", name, self.name, {"data": {key: jsonl}})

    def ensure_tiny_model(self, timeout: float = 300) -> None:
        """The tiny random InternVL at <models PVC>/tiny: prebuilt on the emulator, else a Job in the worker image."""
        models_dir = self.cluster.models_dir
        if models_dir is not None and (models_dir / TINY_MODEL_PATH / "config.json").exists():
            return
        job = {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "tiny-model", "namespace": self.name},
            "spec": {"backoffLimit": 1, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "tiny", "image": os.environ.get("INTERNVL_E2E_WORKER_IMAGE", DEFAULT_WORKER_IMAGE),
                    "imagePullPolicy": os.environ.get("INTERNVL_E2E_IMAGE_PULL_POLICY", "IfNotPresent"),
                    "command": ["internvl", "tiny", "--output_dir", f"/models/{TINY_MODEL_PATH}"],
                    "volumeMounts": [{"name": "models", "mountPath": "/models"}],
                }],
                "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": MODELS_CLAIM}}],
            }}},
        }
        self.kube.ensure(job)

        def done():
            status = (self.kube.get("Job", "tiny-model", self.name) or {}).get("status") or {}
            assert not status.get("failed"), "the tiny-model Job failed"
            return status.get("succeeded")

        wait_for(done, timeout=timeout, what="the tiny model on PVC models (Job tiny-model)", diagnose=self.diagnose)

    def start_operator(self) -> OperatorProcess:
        return self.operator.start()

    def close(self) -> None:
        self.operator.stop()
        for pf in self._proxies:
            pf.kill()
            pf.wait(5)
        # Deleting the namespace deletes everything in it (and the kubelet stops its processes).
        try:
            self.kube.delete("Namespace", self.name)
        except ApiError:
            pass

    # ---- convenience
    def kubectl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.cluster.kubectl(*args, namespace=self.name, **kw)

    def apply(self, manifest: dict) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def get(self, kind: str, name: str) -> dict | None:
        return self.kube.get(kind, name, self.name)

    def list(self, kind: str, selector: str | None = None) -> list[dict]:
        return self.kube.list(kind, self.name, selector=selector)

    def finetune(self, name: str) -> dict:
        return self.get("InternVLFineTune", name) or {}

    def pods(self, selector: str) -> list[dict]:
        return sorted(self.list("Pod", selector), key=lambda p: p["metadata"].get("creationTimestamp") or "")

    def log(self, pod: str, **kw) -> str:
        return self.kube.log(self.name, pod, **kw)

    def wait(self, fn: Callable[[], Any], *, timeout: float, what: str) -> Any:
        return wait_for(fn, timeout=timeout, what=what, diagnose=self.diagnose)

    def wait_finetune(self, name: str, *, phases: set[str], timeout: float,
                      check: Callable[[dict], bool] | None = None, fail_on: set[str] = frozenset({"Failed"})) -> dict:
        """Wait until the fine-tune's phase is in `phases` (and `check(cr)` holds); a phase in `fail_on` fails at once."""
        def ready():
            assert self.operator.popen is None or self.operator.alive, \
                f"the operator exited with code {self.operator.popen.returncode}"
            cr = self.finetune(name)
            status = cr.get("status") or {}
            phase = status.get("phase")
            assert phase not in fail_on or phase in phases, f"InternVLFineTune {name} is {phase}: {status.get('message')}"
            if phase in phases and (check is None or check(cr)):
                return cr
            return None

        return self.wait(ready, timeout=timeout, what=f"InternVLFineTune {name} to reach {sorted(phases)}")

    def service_url(self, service: str, port: int = 80, timeout: float = 60) -> str:
        """A URL on this machine for a Service: the process kubelet's loopback port of a ready backend, or
        on a real cluster the API server's service proxy through `kubectl proxy` (plain HTTP on loopback)."""
        if not self.cluster.real:
            kubelet = self.cluster.kubelet
            return self.wait(lambda: kubelet.service_url(self.name, service, port), timeout=timeout,
                             what=f"a ready backend behind Service {service}")
        base = self._kubectl_proxy(timeout)
        url = f"{base}/api/v1/namespaces/{self.name}/services/{service}:{port}/proxy/"

        def answers():
            import urllib.request

            try:
                with urllib.request.urlopen(url + "health", timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        self.wait(answers, timeout=timeout, what=f"GET {url}health through kubectl proxy")
        return url

    def _kubectl_proxy(self, timeout: float) -> str:
        argv = [kubectl_path(), "--kubeconfig", self.cluster.kubeconfig, "proxy", "--port=0"]
        proxy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._proxies.append(proxy)
        assert proxy.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proxy.stdout.readline()
            match = re.search(r"Starting to serve on 127\.0\.0\.1:(\d+)", line or "")
            if match:
                return f"http://127.0.0.1:{match.group(1)}"
            if not line and proxy.poll() is not None:
                break
        raise AssertionError(f"kubectl proxy did not start\n{self.diagnose()}")

    # ---- diagnostics
    def diagnose(self) -> str:
        """What a person would look at: CR status, Jobs, pods and their logs, the operator's log."""
        out = [f"===== diagnostics for namespace {self.name}"]
        try:
            for kind in ("InternVLFineTune", "InternVLService"):
                for obj in self.list(kind):
                    out.append(f"--- {kind} {obj['metadata']['name']} (generation {obj['metadata'].get('generation')})")
                    out.append(yaml.safe_dump({"spec.suspend": obj.get("spec", {}).get("suspend"),
                                               "status": obj.get("status")}, sort_keys=False).rstrip())
            for job in self.list("Job"):
                st = job.get("status") or {}
                conds = ",".join(f"{c['type']}={c['status']}" for c in st.get("conditions") or [])
                out.append(f"--- Job {job['metadata']['name']}: active={st.get('active', 0)} "
                           f"succeeded={st.get('succeeded', 0)} failed={st.get('failed', 0)} [{conds}]")
            for dep in self.list("Deployment"):
                st = dep.get("status") or {}
                out.append(f"--- Deployment {dep['metadata']['name']}: replicas={st.get('replicas')} "
                           f"ready={st.get('readyReplicas')}")
            for pod in self.pods(""):
                name = pod["metadata"]["name"]
                st = pod.get("status") or {}
                states = [cs.get("state") for cs in st.get("containerStatuses") or []]
                out.append(f"--- Pod {name}: {st.get('phase')} {json.dumps(states)}")
                out.append("    " + self.log(name, tail=15).rstrip().replace("\n", "\n    "))
        except Exception as exc:  # diagnostics must never hide the original failure
            out.append(f"(could not read the cluster: {exc!r})")
        out.append(f"--- operator log (last lines; full log: {self.operator.log_path})")
        out.append(self.operator.log_tail())
        return "\n".join(out)


def pvc_manifest(claim: str, namespace: str) -> dict:
    spec: dict[str, Any] = {"accessModes": [os.environ.get("INTERNVL_E2E_ACCESS_MODE", "ReadWriteOnce")],
                            "resources": {"requests": {"storage": "1Gi"}}}
    if os.environ.get("INTERNVL_E2E_STORAGE_CLASS"):
        spec["storageClassName"] = os.environ["INTERNVL_E2E_STORAGE_CLASS"]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": namespace},
            "spec": spec}


def example_finetune() -> dict:
    """The example CR as a dict (tests vary it: name, dataset, steps ...)."""
    return yaml.safe_load(EXAMPLE.read_text())


def bad_dataset(bad_line: int = 7) -> str:
    return data.bad_jsonl(32, bad_lines={bad_line: json.dumps({"query": "What is the dominant color?"})})
