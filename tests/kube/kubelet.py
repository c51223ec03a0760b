"""A "process kubelet": the Job, ReplicaSet and Deployment controllers plus a kubelet that runs
each Pod's first container as a local process. It talks to the API server over HTTP only (so it
works against the emulator run in-process or as `python -m tests.kube.apiserver`); never point it
at a real cluster.

    kubelet = ProcessKubelet(api_url, root_dir, log_dir=server.log_dir).start()
    ...
    kubelet.service_url("default", "my-svc")   # http://127.0.0.1:<host port of a ready backend>
    kubelet.oom_kill("default", "pod-name")     # the container ends OOMKilled, exit code 137
    kubelet.stop()                              # kills every process group it started

See podruntime.py for how paths, ports and env are mapped.
"""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import requests

from . import podruntime as rtm
from .selectors import parse_label_selector, selector_from_match

log = logging.getLogger(__name__)

INDEX_KEY = "batch.kubernetes.io/job-completion-index"
OOM_AFTER_ANNOTATION = "kubelet.internvl.test/oom-after-seconds"  # test hook on a pod (or Job template)
PORTS_ANNOTATION = "kubelet.internvl.test/ports"  # written on Services: {"servicePort": hostPort}
USER_AGENT = "process-kubelet"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_ts(ts: str) -> float:
    return dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()


def _owned_by(obj, uid) -> bool:
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])


def _owner_ref(api_version, kind, obj) -> dict:
    return {"apiVersion": api_version, "kind": kind, "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _cond(ctype, status, reason="", message="") -> dict:
    t = now_iso()
    c = {"type": ctype, "status": status, "lastProbeTime": t, "lastTransitionTime": t}
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


@dataclass
class Proc:
    """One running (or finished) pod container."""
    namespace: str
    name: str
    uid: str
    container: str
    image: str
    restart_policy: str
    spec: dict  # the pod as it was when started
    mapping: rtm.Mapping
    argv: list
    env: dict
    cwd: str
    log_path: str
    popen: subprocess.Popen | None = None
    started_at: str = ""
    restart_count: int = 0
    last_terminated: dict | None = None
    terminated: dict | None = None
    ready: bool = False
    next_probe: float = 0.0
    restart_at: float = 0.0
    oom: bool = False
    oom_at: float | None = None
    killing_deadline: float | None = None
    log_scan_offset: int = 0  # how far kill_on_log hooks have read the log
    log_scan_tail: str = ""  # the last bytes read, so a match may span two reads


@dataclass
class LogKillHook:
    """See ProcessKubelet.kill_on_log. `killed` lists the pods signalled so far."""
    namespace: str
    pod_prefix: str
    pattern: re.Pattern
    sig: int = signal.SIGKILL
    times: int = 1
    killed: list = field(default_factory=list)


@dataclass
class ProcessKubelet:
    api_url: str
    root_dir: str
    log_dir: str | None = None
    pvc_dirs: dict = field(default_factory=dict)  # claimName -> host dir (default: <root>/pvc/<ns>/<claim>)
    extra_env: dict = field(default_factory=dict)  # added to every process's env
    image_commands: dict = field(default_factory=dict)  # image -> entrypoint argv, for pods without command
    allocatable: dict | None = None  # e.g. {"nvidia.com/gpu": 0}: bigger requests stay Pending Unschedulable
    node_name: str = "process-kubelet"
    resync_seconds: float = 1.0
    tick_seconds: float = 0.05
    max_probe_period: float = 0.5  # probe periods and initial delays are capped to keep tests fast

    def __post_init__(self):
        self.log_dir = self.log_dir or os.path.join(self.root_dir, "logs")
        self.http = requests.Session()
        self.http.headers["User-Agent"] = USER_AGENT
        self.procs: dict[str, Proc] = {}  # pod uid -> process
        self.oom_requests: set[tuple[str, str]] = set()
        self.log_hooks: list[LogKillHook] = []
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.RLock()
        self._watch_responses: list = []
        self.errors: list[str] = []

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "ProcessKubelet":
        os.makedirs(self.log_dir, exist_ok=True)
        t = threading.Thread(target=self._run, name="process-kubelet", daemon=True)
        t.start()
        self._threads.append(t)
        for path in ("/api/v1/pods", "/apis/batch/v1/jobs", "/apis/apps/v1/deployments",
                     "/apis/apps/v1/replicasets", "/api/v1/services"):
            w = threading.Thread(target=self._watch, args=(path,), name=f"kubelet-watch{path}", daemon=True)
            w.start()
            self._threads.append(w)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        self._threads[0].join(5)  # the reconcile loop; watch threads are daemons blocked in a read

        with self._lock:
            for p in self.procs.values():
                self._kill(p, signal.SIGKILL)

    def _watch(self, path: str) -> None:
        """Any change wakes the reconcile loop (the loop itself always lists: simple and safe)."""
        session = requests.Session()
        session.headers["User-Agent"] = USER_AGENT
        while not self._stop.is_set():
            try:
                r = session.get(self.api_url + path, params={"watch": "true", "timeoutSeconds": "10"},
                                stream=True, timeout=(2, 15))
                self._watch_responses.append(r)
                for line in r.iter_lines():
                    if self._stop.is_set():
                        break
                    if line:
                        self._dirty.set()
                self._watch_responses.remove(r)
            except Exception:
                if self._stop.wait(0.5):
                    break

    def _run(self) -> None:
        last_sync = 0.0
        while not self._stop.is_set():
            self._dirty.wait(self.tick_seconds)
            try:
                changed = self._poll_processes()
                if changed or self._dirty.is_set() or time.monotonic() - last_sync > self.resync_seconds:
                    self._dirty.clear()
                    last_sync = time.monotonic()
                    self._reconcile()
            except Exception as exc:  # keep going: a test asserts on the state, not on this thread
                log.exception("process kubelet reconcile failed")
                self.errors.append(repr(exc))
                time.sleep(0.2)

    # ---- HTTP helpers -------------------------------------------------------------------------
    def _req(self, method, path, body=None, ctype="application/json", params=None, ok=(200, 201)):
        r = self.http.request(method, self.api_url + path, data=json.dumps(body) if body is not None else None,
                              headers={"Content-Type": ctype}, params=params, timeout=10)
        if r.status_code not in ok:
            return None
        return r.json() if r.content else {}

    def _list(self, path) -> list[dict]:
        out = self._req("GET", path)
        return (out or {}).get("items", [])

    @staticmethod
    def _obj_path(api, plural, ns, name=""):
        return f"{api}/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")

    def _patch_status(self, api, plural, obj, status) -> None:
        m = obj["metadata"]
        self._req("PATCH", self._obj_path(api, plural, m["namespace"], m["name"]) + "/status",
                  {"status": status}, "application/merge-patch+json")

    def _lookup(self, ns):
        def get(plural, name):
            return self._req("GET", self._obj_path("/api/v1", plural, ns, name))
        return get

    # ---- the reconcile loop -------------------------------------------------------------------
    def _reconcile(self) -> None:
        deployments = self._list("/apis/apps/v1/deployments")
        replicasets = self._list("/apis/apps/v1/replicasets")
        jobs = self._list("/apis/batch/v1/jobs")
        pods = self._list("/api/v1/pods")
        for d in deployments:
            self._sync_deployment(d, replicasets, pods)
        if deployments:
            replicasets = self._list("/apis/apps/v1/replicasets")
        for rs in replicasets:
            self._sync_replicaset(rs, pods)
        for job in jobs:
            self._sync_job(job, pods)
        pods = self._list("/api/v1/pods")
        live = {p["metadata"]["uid"] for p in pods}
        with self._lock:
            for uid, proc in list(self.procs.items()):
                if uid not in live:  # deleted behind our back: stop it
                    self._kill(proc, signal.SIGKILL)
                    del self.procs[uid]
        for pod in pods:
            self._sync_pod(pod)
        self._sync_services(pods)

    # ---- Deployments and ReplicaSets -------------------------------------------------------------
    def _sync_deployment(self, d, replicasets, pods) -> None:
        m, spec = d["metadata"], d.get("spec") or {}
        if m.get("deletionTimestamp"):
            return
        template = spec.get("template") or {}
        h = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        owned = [rs for rs in replicasets if _owned_by(rs, m["uid"])]
        new = next((rs for rs in owned if rs["metadata"].get("labels", {}).get("pod-template-hash") == h), None)
        replicas = spec.get("replicas", 1)
        if new is None:
            tmpl = copy.deepcopy(template)
            tmpl.setdefault("metadata", {}).setdefault("labels", {})["pod-template-hash"] = h
            sel = copy.deepcopy(spec.get("selector") or {})
            sel.setdefault("matchLabels", {})["pod-template-hash"] = h
            body = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "metadata": {"name": f"{m['name']}-{h}", "namespace": m["namespace"],
                                 "labels": dict(tmpl["metadata"]["labels"]),
                                 "ownerReferences": [_owner_ref("apps/v1", "Deployment", d)]},
                    "spec": {"replicas": replicas, "selector": sel, "template": tmpl}}
            new = self._req("POST", self._obj_path("/apis/apps/v1", "replicasets", m["namespace"]), body)
            if new is None:
                return
        elif new["spec"].get("replicas") != replicas:
            self._req("PATCH", self._obj_path("/apis/apps/v1", "replicasets", m["namespace"], new["metadata"]["name"]),
                      {"spec": {"replicas": replicas}}, "application/merge-patch+json")
        for rs in owned:  # a Recreate-like rollout: old ReplicaSets go to zero at once
            if rs["metadata"]["uid"] != new["metadata"]["uid"] and rs["spec"].get("replicas", 0) != 0:
                self._req("PATCH", self._obj_path("/apis/apps/v1", "replicasets", m["namespace"],
                                                  rs["metadata"]["name"]),
                          {"spec": {"replicas": 0}}, "application/merge-patch+json")
        rs_uids = {rs["metadata"]["uid"] for rs in owned} | {new["metadata"]["uid"]}
        mine = [p for p in pods if any(_owned_by(p, u) for u in rs_uids) and not p["metadata"].get("deletionTimestamp")]
        updated = [p for p in mine if _owned_by(p, new["metadata"]["uid"])]
        ready = [p for p in mine if _pod_ready(p)]
        available = len([p for p in updated if _pod_ready(p)])
        status = {
            "observedGeneration": m.get("generation", 1),
            "replicas": len(mine), "updatedReplicas": len(updated), "readyReplicas": len(ready),
            "availableReplicas": len(ready), "unavailableReplicas": max(0, replicas - len(ready)),
        }
        old_conds = {c["type"]: c for c in (d.get("status") or {}).get("conditions") or []}
        avail = _keep_time(old_conds.get("Available"), _cond(
            "Available", "True" if len(ready) >= replicas else "False",
            "MinimumReplicasAvailable" if len(ready) >= replicas else "MinimumReplicasUnavailable",
            "Deployment has minimum availability." if len(ready) >= replicas
            else "Deployment does not have minimum availability."))
        done = available >= replicas and len(mine) == len(updated)
        prog = _keep_time(old_conds.get("Progressing"), _cond(
            "Progressing", "True", "NewReplicaSetAvailable" if done else "ReplicaSetUpdated",
            f'ReplicaSet "{new["metadata"]["name"]}" ' + ("has successfully progressed." if done
                                                          else "is progressing.")))
        status["conditions"] = [avail, prog]
        if _status_differs(d.get("status"), status):
            self._patch_status("/apis/apps/v1", "deployments", d, status)

    def _sync_replicaset(self, rs, pods) -> None:
        m, spec = rs["metadata"], rs.get("spec") or {}
        if m.get("deletionTimestamp"):
            return
        mine = [p for p in pods if _owned_by(p, m["uid"]) and not p["metadata"].get("deletionTimestamp")
                and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        want = spec.get("replicas", 1)
        for _ in range(want - len(mine)):
            tmpl = copy.deepcopy(spec.get("template") or {})
            body = {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"generateName": f"{m['name']}-", "namespace": m["namespace"],
                                 "labels": (tmpl.get("metadata") or {}).get("labels") or {},
                                 "annotations": (tmpl.get("metadata") or {}).get("annotations") or {},
                                 "ownerReferences": [_owner_ref("apps/v1", "ReplicaSet", rs)]},
                    "spec": tmpl.get("spec") or {}}
            self._req("POST", self._obj_path("/api/v1", "pods", m["namespace"]), body)
        for p in sorted(mine, key=lambda p: p["metadata"]["creationTimestamp"], reverse=True)[:max(0, len(mine) - want)]:
            self._req("DELETE", self._obj_path("/api/v1", "pods", m["namespace"], p["metadata"]["name"]))
        ready = len([p for p in mine if _pod_ready(p)])
        status = {"replicas": min(len(mine), want) if len(mine) > want else len(mine), "readyReplicas": ready,
                  "availableReplicas": ready, "fullyLabeledReplicas": len(mine),
                  "observedGeneration": m.get("generation", 1)}
        if _status_differs(rs.get("status"), status):
            self._patch_status("/apis/apps/v1", "replicasets", rs, status)

    # ---- Jobs -------------------------------------------------------------------------------
    def _sync_job(self, job, pods) -> None:
        m, spec = job["metadata"], job.get("spec") or {}
        st = copy.deepcopy(job.get("status") or {})
        conds = st.get("conditions") or []
        finished = any(c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in conds)
        mine = [p for p in pods if _owned_by(p, m["uid"])]
        active = [p for p in mine if (p.get("status") or {}).get("phase") in (None, "Pending", "Running")
                  and not p["metadata"].get("deletionTimestamp")]
        terminating = [p for p in mine if p["metadata"].get("deletionTimestamp")]
        succeeded = [p for p in mine if (p.get("status") or {}).get("phase") == "Succeeded"]
        failed = [p for p in mine if (p.get("status") or {}).get("phase") == "Failed"]
        if m.get("deletionTimestamp"):
            return
        if finished:
            for p in active:  # a finished Job keeps no running pods
                self._req("DELETE", self._obj_path("/api/v1", "pods", m["namespace"], p["metadata"]["name"]))
            return
        indexed = spec.get("completionMode") == "Indexed"
        completions = spec.get("completions", 1)
        parallelism = spec.get("parallelism", 1)
        backoff = spec.get("backoffLimit", 6)
        restarts = sum(c.get("restartCount", 0) for p in mine for c in (p.get("status") or {}).get("containerStatuses") or [])
        n_failed = max(st.get("failed", 0), len(failed))
        if indexed:
            done_idx = sorted({int(p["metadata"]["annotations"][INDEX_KEY]) for p in succeeded
                               if INDEX_KEY in (p["metadata"].get("annotations") or {})})
            n_succeeded = len(done_idx)
            st["completedIndexes"] = _ranges(done_idx) if done_idx else ""
        else:
            done_idx = []
            n_succeeded = max(st.get("succeeded", 0), len(succeeded))
        new_conds = [c for c in conds if c["type"] not in ("Suspended",)]
        suspended_cond = next((c for c in conds if c["type"] == "Suspended"), None)
        if spec.get("suspend"):
            for p in active:
                self._req("DELETE", self._obj_path("/api/v1", "pods", m["namespace"], p["metadata"]["name"]))
            if not suspended_cond or suspended_cond["status"] != "True":
                suspended_cond = _cond("Suspended", "True", "JobSuspended", "Job suspended")
                st["startTime"] = None  # merge-patch null: resuming starts the deadline clock anew
            st.update({"active": 0, "ready": 0})
            new_conds.append(suspended_cond)
            st["conditions"] = new_conds
            st["terminating"] = len(terminating)
            if _status_differs(job.get("status"), st):
                self._patch_status("/apis/batch/v1", "jobs", job, st)
            return
        if suspended_cond:
            new_conds.append(_keep_time(suspended_cond, _cond("Suspended", "False", "JobResumed", "Job resumed"))
                             if suspended_cond["status"] == "True" else suspended_cond)
        if not st.get("startTime"):
            st["startTime"] = now_iso()
        fail_reason = None
        if n_failed + (restarts if (spec.get("template", {}).get("spec", {}).get("restartPolicy") == "OnFailure") else 0) > backoff:
            fail_reason = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        deadline = spec.get("activeDeadlineSeconds")
        if deadline is not None and time.time() - _parse_ts(st["startTime"]) > deadline:
            fail_reason = ("DeadlineExceeded", "Job was active longer than specified deadline")
        if fail_reason:
            for p in active:
                self._req("DELETE", self._obj_path("/api/v1", "pods", m["namespace"], p["metadata"]["name"]))
            new_conds += [_cond("FailureTarget", "True", *fail_reason), _cond("Failed", "True", *fail_reason)]
            st.update({"conditions": new_conds, "active": 0, "failed": n_failed, "succeeded": n_succeeded,
                       "ready": 0, "terminating": len(terminating)})
            self._patch_status("/apis/batch/v1", "jobs", job, st)
            return
        if n_succeeded >= completions:
            reason = ("CompletionsReached", "Reached expected number of succeeded pods")
            new_conds += [_cond("SuccessCriteriaMet", "True", *reason), _cond("Complete", "True", *reason)]
            st.update({"conditions": new_conds, "active": 0, "failed": n_failed, "succeeded": n_succeeded,
                       "ready": 0, "completionTime": now_iso(), "terminating": len(terminating)})
            self._patch_status("/apis/batch/v1", "jobs", job, st)
            return
        # start pods up to parallelism
        if indexed:
            busy = {int((p["metadata"].get("annotations") or {}).get(INDEX_KEY, -1)) for p in active + terminating}
            todo = [i for i in range(completions) if i not in done_idx and i not in busy]
            for i in todo[:max(0, parallelism - len(active))]:
                self._create_job_pod(job, i)
                active.append({"metadata": {}})
        else:
            want = min(parallelism, completions - n_succeeded) - len(active)
            for _ in range(max(0, want)):
                self._create_job_pod(job, None)
                active.append({"metadata": {}})
        st.update({"active": len(active), "failed": n_failed, "succeeded": n_succeeded,
                   "ready": len([p for p in active if p.get("status") and _pod_ready(p)]),
                   "terminating": len(terminating)})
        if new_conds:
            st["conditions"] = new_conds
        if _status_differs(job.get("status"), st):
            self._patch_status("/apis/batch/v1", "jobs", job, st)

    def _create_job_pod(self, job, index) -> None:
        m, spec = job["metadata"], job["spec"]
        tmpl = copy.deepcopy(spec.get("template") or {})
        tmeta = tmpl.get("metadata") or {}
        labels = dict(tmeta.get("labels") or {})
        annotations = dict(tmeta.get("annotations") or {})
        pspec = tmpl.get("spec") or {}
        gen = f"{m['name']}-"
        if index is not None:
            labels[INDEX_KEY] = str(index)
            annotations[INDEX_KEY] = str(index)
            gen = f"{m['name']}-{index}-"
            pspec.setdefault("hostname", f"{m['name']}-{index}")
            for c in pspec.get("containers") or []:
                env = c.setdefault("env", [])
                if not any(e["name"] == "JOB_COMPLETION_INDEX" for e in env):
                    env.insert(0, {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                        "fieldPath": f"metadata.annotations['{INDEX_KEY}']"}}})
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": gen, "namespace": m["namespace"], "labels": labels,
                             "annotations": annotations, "ownerReferences": [_owner_ref("batch/v1", "Job", job)]},
                "spec": pspec}
        self._req("POST", self._obj_path("/api/v1", "pods", m["namespace"]), body)

    # ---- Pods -------------------------------------------------------------------------------
    def _pvc_dir(self, ns):
        def get(claim):
            if claim in self.pvc_dirs:
                path = self.pvc_dirs[claim]
            else:
                if self._req("GET", self._obj_path("/api/v1", "persistentvolumeclaims", ns, claim)) is None:
                    raise rtm.PodConfigError("Unschedulable", f'persistentvolumeclaim "{claim}" not found')
                path = os.path.join(self.root_dir, "pvc", ns, claim)
            os.makedirs(path, exist_ok=True)
            return path
        return get

    def pod_dir(self, ns, name) -> str:
        return os.path.join(self.root_dir, "pods", ns, name)

    def _sync_pod(self, pod) -> None:
        m, spec = pod["metadata"], pod.get("spec") or {}
        st = pod.get("status") or {}
        ns, name, uid = m["namespace"], m["name"], m["uid"]
        proc = self.procs.get(uid)
        if m.get("deletionTimestamp"):
            if proc and proc.popen and proc.popen.poll() is None:
                if proc.killing_deadline is None:
                    grace = min(float(m.get("deletionGracePeriodSeconds") or 0), 2.0)
                    proc.killing_deadline = time.monotonic() + grace
                    self._kill(proc, signal.SIGTERM)
                    return
                if time.monotonic() < proc.killing_deadline:
                    return
                self._kill(proc, signal.SIGKILL)
            if spec.get("nodeName") == self.node_name and not m.get("finalizers"):
                self._req("DELETE", self._obj_path("/api/v1", "pods", ns, name), params={"gracePeriodSeconds": "0"},
                          ok=(200, 201, 404))
            self.procs.pop(uid, None)
            return
        if st.get("phase") in ("Succeeded", "Failed"):
            return
        if not spec.get("nodeName"):
            why = self._unschedulable(pod)
            if why:
                conds = [_cond("PodScheduled", "False", "Unschedulable", why)]
                if _status_differs(st, {"phase": "Pending", "conditions": conds}, ignore_times=True):
                    self._patch_status("/api/v1", "pods", pod, {"phase": "Pending", "conditions": conds})
                return
            self._req("POST", self._obj_path("/api/v1", "pods", ns, name) + "/binding",
                      {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                       "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}})
            return
        if spec["nodeName"] != self.node_name:
            return
        if proc is None:
            self._start(pod)

    def _unschedulable(self, pod) -> str | None:
        if self.allocatable is None:
            return None
        for c in pod["spec"].get("containers") or []:
            res = c.get("resources") or {}
            for k, v in {**(res.get("requests") or {}), **(res.get("limits") or {})}.items():
                if k in self.allocatable and float(v) > float(self.allocatable[k]):
                    return f"0/1 nodes are available: 1 Insufficient {k}."
        return None

    def _start(self, pod) -> None:
        m, spec = pod["metadata"], pod["spec"]
        ns, name = m["namespace"], m["name"]
        container = (spec.get("containers") or [{}])[0]
        pdir = self.pod_dir(ns, name)
        os.makedirs(pdir, exist_ok=True)
        lookup = self._lookup(ns)
        try:
            mapping = rtm.Mapping()
            vols = rtm.prepare_volumes(pod, pdir, self._pvc_dir(ns), lookup, mapping.rewrite)
            mapping = rtm.build_mapping(container, vols)
            rtm.rewrite_config_files(vols, pod, mapping)
            env = rtm.resolve_env(pod, container, lookup)
            penv = rtm.process_env(pod, container, env, mapping, pdir, self.extra_env)
            argv = rtm.argv_for(container, env, mapping, self.image_commands)
        except rtm.PodConfigError as exc:
            if exc.reason == "Unschedulable":
                status = {"phase": "Pending", "conditions": [_cond("PodScheduled", "False", "Unschedulable",
                                                                   exc.message)]}
            else:
                status = {"phase": "Pending", "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
                          "containerStatuses": [{"name": container.get("name", ""), "image": container.get("image", ""),
                                                 "imageID": "", "ready": False, "started": False, "restartCount": 0,
                                                 "state": {"waiting": {"reason": exc.reason, "message": exc.message}}}]}
            if _status_differs(pod.get("status"), status, ignore_times=True):
                self._patch_status("/api/v1", "pods", pod, status)
            return
        cwd = mapping.rewrite(container["workingDir"]) if container.get("workingDir") else os.path.join(pdir, "workdir")
        os.makedirs(cwd, exist_ok=True)
        log_path = os.path.join(self.log_dir, ns, name, f"{container.get('name', 'main')}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        proc = Proc(ns, name, m["uid"], container.get("name", "main"), container.get("image", ""),
                    spec.get("restartPolicy", "Always"), pod, mapping, argv, penv, cwd, log_path)
        oom_after = (m.get("annotations") or {}).get(OOM_AFTER_ANNOTATION)
        if oom_after is not None:
            proc.oom_at = float(oom_after)
        with self._lock:
            self.procs[m["uid"]] = proc
            self._launch(proc)
        self._write_pod_status(proc)

    def _launch(self, proc: Proc) -> None:
        proc.terminated = None
        proc.ready = False
        proc.oom = False
        proc.started_at = now_iso()
        probe = (proc.spec["spec"]["containers"][0]).get("readinessProbe") or {}
        proc.next_probe = time.monotonic() + min(probe.get("initialDelaySeconds", 0), self.max_probe_period)
        with open(proc.log_path, "ab") as fh:
            try:
                proc.popen = subprocess.Popen(proc.argv, env=proc.env, cwd=proc.cwd, stdout=fh,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True)  # own process group: kill takes children
            except OSError as exc:
                fh.write(f"process kubelet: cannot start {proc.argv!r}: {exc}\n".encode())
                proc.popen = None
                proc.terminated = {"exitCode": 128, "reason": "StartError", "message": str(exc),
                                   "startedAt": proc.started_at, "finishedAt": now_iso()}
        if proc.oom_at is not None:
            proc.oom_at_abs = time.monotonic() + proc.oom_at

    def _kill(self, proc: Proc, sig) -> None:
        if proc.popen and proc.popen.poll() is None:
            # SIGKILL/SIGSTOP/SIGCONT act on the whole container, as a cgroup kill or freeze does: every
            # descendant, also those that left the process group (torchrun starts its workers with
            # start_new_session=True; killing only the group would orphan a trainer that keeps writing).
            tree = _descendants(proc.popen.pid) if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT) else []
            try:
                os.killpg(proc.popen.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            for pid in tree:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def oom_kill(self, namespace: str, pod_name: str) -> bool:
        """Simulate the kernel OOM killer on a pod's container: SIGKILL, reason OOMKilled, exit 137."""
        with self._lock:
            for p in self.procs.values():
                if p.namespace == namespace and p.name == pod_name and p.popen and p.popen.poll() is None:
                    p.oom = True
                    self._kill(p, signal.SIGKILL)
                    self._dirty.set()
                    return True
        return False

    def kill_on_log(self, namespace: str, pod_prefix: str, pattern: str, *, sig: int = signal.SIGKILL,
                    times: int = 1) -> LogKillHook:
        """Test hook: send `sig` to the process group of a running pod whose name starts with `pod_prefix`
        the moment its log matches the regex `pattern` (checked every tick, ~50 ms), `times` times in all.
        E.g. kill a trainer right after its first checkpoint line; the container ends with exit code
        128 + sig (137 for SIGKILL), reason Error, like a process killed on a node."""
        hook = LogKillHook(namespace, pod_prefix, re.compile(pattern), sig, times)
        with self._lock:
            self.log_hooks.append(hook)
            if not any(t.name == "kubelet-log-hooks" for t in self._threads):
                # Its own thread: the reconcile loop may be busy (starting processes, probing) for longer
                # than a tiny training run takes between two log lines.
                t = threading.Thread(target=self._run_log_hooks, name="kubelet-log-hooks", daemon=True)
                t.start()
                self._threads.append(t)
        return hook

    def _run_log_hooks(self) -> None:
        while not self._stop.wait(0.02):
            with self._lock:
                procs = list(self.procs.values()) if any(h.times > 0 for h in self.log_hooks) else []
            for p in procs:
                if p.terminated is None and p.popen is not None and p.popen.poll() is None:
                    self._check_log_hooks(p)

    def _check_log_hooks(self, p: Proc) -> None:
        hooks = [h for h in self.log_hooks if h.times > 0 and h.namespace == p.namespace
                 and p.name.startswith(h.pod_prefix)]
        if not hooks:
            return
        try:
            with open(p.log_path, "rb") as fh:
                fh.seek(p.log_scan_offset)
                chunk = fh.read()
        except OSError:
            return
        if not chunk:
            return
        p.log_scan_offset += len(chunk)
        text = p.log_scan_tail + chunk.decode(errors="replace")
        p.log_scan_tail = text[-4096:]
        for h in hooks:
            if h.pattern.search(text):
                h.times -= 1
                h.killed.append(p.name)
                p.log_scan_tail = ""
                self._kill(p, h.sig)
                return

    def _poll_processes(self) -> bool:
        changed = False
        with self._lock:
            procs = list(self.procs.values())
        for p in procs:
            if p.oom_at is not None and getattr(p, "oom_at_abs", None) and time.monotonic() >= p.oom_at_abs \
                    and p.popen and p.popen.poll() is None:
                p.oom = True
                p.oom_at_abs = None
                self._kill(p, signal.SIGKILL)
            if p.terminated is None and p.popen is not None and p.popen.poll() is not None:
                rc = p.popen.returncode
                code = rc if rc >= 0 else 128 - rc
                reason = "OOMKilled" if p.oom else ("Completed" if code == 0 else "Error")
                if p.oom:
                    code = 137
                p.terminated = {"exitCode": code, "reason": reason, "startedAt": p.started_at,
                                "finishedAt": now_iso(), "containerID": f"process://{p.popen.pid}"}
                p.ready = False
                if p.killing_deadline is None and self._should_restart(p):
                    p.restart_at = time.monotonic() + min(0.2 * (2 ** p.restart_count), 2.0)
                self._write_pod_status(p)
                changed = True
            elif p.terminated is not None and p.restart_at and time.monotonic() >= p.restart_at \
                    and p.killing_deadline is None:
                p.restart_at = 0.0
                p.last_terminated = p.terminated
                p.restart_count += 1
                prev = p.log_path[:-4] + ".previous.log"
                if os.path.exists(p.log_path):
                    shutil.move(p.log_path, prev)
                p.log_scan_offset, p.log_scan_tail = 0, ""
                with self._lock:
                    self._launch(p)
                self._write_pod_status(p)
                changed = True
            elif p.terminated is None and p.popen is not None and time.monotonic() >= p.next_probe \
                    and p.killing_deadline is None:
                ready = self._probe(p)
                if ready != p.ready:
                    p.ready = ready
                    self._write_pod_status(p)
                    changed = True
        return changed

    @staticmethod
    def _should_restart(p: Proc) -> bool:
        if p.restart_policy == "Always":
            return True
        return p.restart_policy == "OnFailure" and p.terminated["exitCode"] != 0

    def _probe(self, p: Proc) -> bool:
        probe = (p.spec["spec"]["containers"][0]).get("readinessProbe")
        if not probe:
            return True
        p.next_probe = time.monotonic() + min(probe.get("periodSeconds", 10), self.max_probe_period)
        timeout = min(probe.get("timeoutSeconds", 1), 1.0)
        try:
            if "httpGet" in probe:
                port = self._host_port(p, probe["httpGet"].get("port"))
                url = f"http://127.0.0.1:{port}{probe['httpGet'].get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return 200 <= r.status < 400
            if "tcpSocket" in probe:
                with socket.create_connection(("127.0.0.1", self._host_port(p, probe["tcpSocket"].get("port"))),
                                              timeout=timeout):
                    return True
            if "exec" in probe:
                cmd = [p.mapping.rewrite(a) for a in probe["exec"]["command"]]
                return subprocess.run(cmd, env=p.env, cwd=p.cwd, timeout=timeout * 5,
                                      capture_output=True).returncode == 0
        except Exception:
            return False
        return True

    def _host_port(self, p: Proc, port) -> int:
        container = p.spec["spec"]["containers"][0]
        if isinstance(port, str) and not port.isdigit():
            port = next(int(cp["containerPort"]) for cp in container.get("ports") or [] if cp.get("name") == port)
        port = int(port)
        return p.mapping.ports.get(port, port)

    def _write_pod_status(self, p: Proc) -> None:
        running = p.terminated is None and p.popen is not None
        cs = {"name": p.container, "image": p.image, "imageID": f"process://{p.image}",
              "containerID": f"process://{p.popen.pid if p.popen else 0}", "ready": p.ready,
              "started": running, "restartCount": p.restart_count}
        if running:
            cs["state"] = {"running": {"startedAt": p.started_at}}
        elif p.restart_at:
            cs["state"] = {"waiting": {"reason": "CrashLoopBackOff",
                                       "message": f"back-off restarting failed container {p.container}"}}
            cs["lastState"] = {"terminated": p.terminated}
        else:
            cs["state"] = {"terminated": p.terminated}
        if p.last_terminated and "lastState" not in cs:
            cs["lastState"] = {"terminated": p.last_terminated}
        phase = "Running"
        if p.terminated is not None and not p.restart_at:
            phase = "Succeeded" if p.terminated["exitCode"] == 0 else "Failed"
        ready = "True" if p.ready else "False"
        status = {"phase": phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
                  "startTime": p.spec["metadata"].get("creationTimestamp"),
                  "conditions": [_cond("PodScheduled", "True"), _cond("Initialized", "True"),
                                 _cond("ContainersReady", ready), _cond("Ready", ready)],
                  "containerStatuses": [cs]}
        if phase == "Failed" and p.terminated.get("reason") == "OOMKilled":
            status["reason"] = "OOMKilled"
        self._req("PATCH", self._obj_path("/api/v1", "pods", p.namespace, p.name) + "/status",
                  {"status": status}, "application/merge-patch+json")

    # ---- Services ---------------------------------------------------------------------------
    def _service_ports(self, svc, pods) -> dict:
        sel = (svc.get("spec") or {}).get("selector")
        if not sel:
            return {}
        ns = svc["metadata"]["namespace"]
        ready = [p for p in pods if p["metadata"]["namespace"] == ns and _pod_ready(p)
                 and all((p["metadata"].get("labels") or {}).get(k) == v for k, v in sel.items())]
        out = {}
        with self._lock:
            for pod in ready:
                proc = self.procs.get(pod["metadata"]["uid"])
                if not proc:
                    continue
                for sp in svc["spec"].get("ports") or []:
                    try:
                        out.setdefault(str(sp["port"]), self._host_port(proc, sp.get("targetPort", sp["port"])))
                    except StopIteration:
                        continue
        return out

    def _sync_services(self, pods) -> None:
        for svc in self._list("/api/v1/services"):
            ports = self._service_ports(svc, pods)
            current = (svc["metadata"].get("annotations") or {}).get(PORTS_ANNOTATION)
            text = json.dumps(ports, sort_keys=True) if ports else None
            if text != current:
                self._req("PATCH", self._obj_path("/api/v1", "services", svc["metadata"]["namespace"],
                                                  svc["metadata"]["name"]),
                          {"metadata": {"annotations": {PORTS_ANNOTATION: text}}}, "application/merge-patch+json")

    def service_url(self, namespace: str, name: str, port: int | None = None) -> str | None:
        """http://127.0.0.1:<host port> of a ready pod behind the Service (None if none is ready)."""
        svc = self._req("GET", self._obj_path("/api/v1", "services", namespace, name))
        if not svc:
            return None
        ports = self._service_ports(svc, self._list(self._obj_path("/api/v1", "pods", namespace)))
        if not ports:
            return None
        key = str(port) if port is not None else next(iter(ports))
        return f"http://127.0.0.1:{ports[key]}" if key in ports else None

    def host_port(self, namespace: str, pod_name: str, container_port: int) -> int | None:
        with self._lock:
            for p in self.procs.values():
                if p.namespace == namespace and p.name == pod_name:
                    return p.mapping.ports.get(container_port)
        return None


def _descendants(pid: int) -> list[int]:
    """Every process below pid (children, grandchildren, ...), read from /proc; [] where there is no /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _pod_ready(pod) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _keep_time(old, new):
    """Keep lastTransitionTime when a condition's status did not change."""
    if old and old.get("status") == new["status"]:
        new["lastTransitionTime"] = old.get("lastTransitionTime", new["lastTransitionTime"])
        new["lastProbeTime"] = old.get("lastProbeTime", new.get("lastProbeTime"))
    return new


def _strip_times(v):
    if isinstance(v, dict):
        return {k: _strip_times(x) for k, x in v.items() if k not in ("lastProbeTime", "lastTransitionTime",
                                                                       "lastUpdateTime")}
    if isinstance(v, list):
        return [_strip_times(x) for x in v]
    return v


def _status_differs(old, new, ignore_times=True) -> bool:
    old = old or {}
    merged = {**old, **new}
    return _strip_times(merged) != _strip_times(old)


def _ranges(idx: list[int]) -> str:
    """[0,1,2,4] -> "0-2,4", the completedIndexes format."""
    out, start, prev = [], None, None
    for i in idx:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(out)
