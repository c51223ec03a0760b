"""The chart's RBAC grants exactly the API calls the operator makes.

OPERATOR_CALLS is read off the operator's code (operator/internvl_operator/handlers.py, kube.py) and Kopf's
needs; the rendered roles must equal it in both modes. Then the real operator runs (as a process, with the
environment the chart's Deployment gives it) against the API emulator, after the rendered chart was applied with
the real kubectl, and every request it makes must be allowed by the rendered roles.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest
import yaml

from conftest import REPO, RELEASE_NS, by_kind, one, render
from tests.kube.apiserver import parse_path

# (apiGroup, resource, verb): the call(s) behind it.
OPERATOR_CALLS = {
    ("internvl.ai", "internvlfinetunes", "list"): "Kopf: initial listing of watched CRs",
    ("internvl.ai", "internvlfinetunes", "watch"): "Kopf: watch stream",
    ("internvl.ai", "internvlfinetunes", "patch"): "Kopf: finalizer (timers need one) and last-handled annotation",
    ("internvl.ai", "internvlfinetunes", "get"): "handlers.resolve_fine_tune_output: fromFineTune",
    ("internvl.ai", "internvlservices", "list"): "Kopf",
    ("internvl.ai", "internvlservices", "watch"): "Kopf",
    ("internvl.ai", "internvlservices", "patch"): "Kopf",
    ("internvl.ai", "internvlservices", "get"): "handlers.observe_finetune: the service a fine-tune created",
    ("internvl.ai", "internvlservices", "create"): "reconcile.plan_finetune: builders.build_service_cr (spec.serve)",
    ("internvl.ai", "internvlfinetunes/status", "patch"): "handlers.record -> Kube.patch_status",
    ("internvl.ai", "internvlservices/status", "patch"): "handlers.record -> Kube.patch_status",
    # No request: the OwnerReferencesPermissionEnforcement admission plugin checks it when a child with
    # blockOwnerDeletion (kopf.adopt) is created.
    ("internvl.ai", "internvlfinetunes/finalizers", "update"): "admission: blockOwnerDeletion on children",
    ("internvl.ai", "internvlservices/finalizers", "update"): "admission: blockOwnerDeletion on children",
    ("batch", "jobs", "get"): "handlers._observe_stage",
    ("batch", "jobs", "create"): "apply_plan creates: datacheck, train, merge Jobs",
    ("batch", "jobs", "delete"): "apply_plan deletes: suspend, re-run a failed stage",
    ("", "pods", "list"): "handlers._observe_stage / observe_service (label selector)",
    ("", "pods/log", "get"): "Kube.pod_log: rank 0's progress lines",
    ("", "services", "create"): "rendezvous Service (creates), serving Service (updates = create, then patch)",
    ("", "services", "patch"): "Kube.apply: merge patch of the serving Service",
    ("apps", "deployments", "get"): "handlers.observe_service",
    ("apps", "deployments", "create"): "Kube.apply",
    ("apps", "deployments", "patch"): "Kube.apply",
    ("autoscaling", "horizontalpodautoscalers", "get"): "handlers.observe_service",
    ("autoscaling", "horizontalpodautoscalers", "create"): "Kube.apply",
    ("autoscaling", "horizontalpodautoscalers", "patch"): "Kube.apply",
    ("autoscaling", "horizontalpodautoscalers", "delete"): "plan_service: autoscaling removed from the CR",
    ("policy", "poddisruptionbudgets", "get"): "handlers.observe_service",
    ("policy", "poddisruptionbudgets", "create"): "Kube.apply",
    ("policy", "poddisruptionbudgets", "patch"): "Kube.apply",
    ("policy", "poddisruptionbudgets", "delete"): "plan_service: disruptionBudget removed from the CR",
    ("", "persistentvolumeclaims", "get"): "handlers.require_claims",
    ("", "configmaps", "get"): "handlers.reconcile_finetune: dataset.configMap",
    ("", "events", "create"): "Kube.post_event; Kopf's own warnings",
}
# Kopf, cluster-scoped (kopf/_core/reactor/observation.py): CRD scanning always; namespaces only
# when given a namespace list.
KOPF_CLUSTER_CRDS = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
KOPF_CLUSTER_NAMESPACES = {("", "namespaces", v) for v in ("list", "watch")}
KOPF_PEERING = {"kopfpeerings", "clusterkopfpeerings"}


def _tuples(rules: list[dict]) -> set[tuple[str, str, str]]:
    out = set()
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
        out.update((g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"])
    return out


def test_cluster_wide_rules_are_exactly_the_operator_calls():
    objs = render()
    role = one(objs, "ClusterRole")
    assert _tuples(role["rules"]) == set(OPERATOR_CALLS) | KOPF_CLUSTER_CRDS
    binding = one(objs, "ClusterRoleBinding")
    sa = one(objs, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": RELEASE_NS}]
    assert not by_kind(objs, "Role") and not by_kind(objs, "RoleBinding")


def test_namespaced_rules_are_exactly_the_operator_calls():
    objs = render({"watchNamespaces": ["ml", "ml-staging"]})
    roles = by_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "ml-staging"]
    for role in roles:
        assert _tuples(role["rules"]) == set(OPERATOR_CALLS)
    bindings = by_kind(objs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml", "ml-staging"]
    (cluster,) = by_kind(objs, "ClusterRole")
    assert _tuples(cluster["rules"]) == KOPF_CLUSTER_CRDS | KOPF_CLUSTER_NAMESPACES  # read-only, nothing namespaced
    assert all(v in ("list", "watch") for _, _, v in _tuples(cluster["rules"]))
    without = render({"watchNamespaces": ["ml"], "rbac": {"clusterReads": False}})
    assert not by_kind(without, "ClusterRole") and not by_kind(without, "ClusterRoleBinding")
    assert not by_kind(render({"rbac": {"create": False}}), "ClusterRole")


def test_peering_rules_only_with_peering():
    cluster = one(render({"replicaCount": 2, "peering": {"enabled": True}}), "ClusterRole")
    assert _tuples(cluster["rules"]) - set(OPERATOR_CALLS) - KOPF_CLUSTER_CRDS == {
        ("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    role = one(render({"watchNamespaces": ["ml"], "peering": {"enabled": True}}), "Role")
    assert _tuples(role["rules"]) - set(OPERATOR_CALLS) == {("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")}


def test_secrets_are_never_granted():
    for values in ({}, {"watchNamespaces": ["ml"]}):
        for obj in render(values):
            for rule in obj.get("rules", []):
                assert "secrets" not in rule["resources"], obj["metadata"]["name"]


def test_every_kind_the_operator_addresses_is_in_the_table():
    """kube.PLURALS lists every kind Kube can address; each one the operator uses must be granted."""
    from internvl_operator import kube

    granted = {resource for _, resource, _ in OPERATOR_CALLS}
    unused = {"secrets"}  # in PLURALS for completeness; no call reads Secrets (test above)
    assert set(kube.PLURALS.values()) - unused <= granted


# --------------------------------------------------------------------------- the real operator


@dataclass
class Grant:
    namespace: str | None  # None = ClusterRole (every namespace and cluster-scoped objects)
    tuples: set


def _grants(objs: list[dict], sa_name: str) -> list[Grant]:
    roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]): r for r in objs
             if r["kind"] in ("Role", "ClusterRole")}
    grants = []
    for b in objs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa_name and s["namespace"] == RELEASE_NS
                   for s in b["subjects"]):
            continue
        ns = b["metadata"].get("namespace")
        ref = b["roleRef"]
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        grants.append(Grant(ns if b["kind"] == "RoleBinding" else None, _tuples(role["rules"])))
    return grants


def _allowed(grants: list[Grant], group: str, resource: str, verb: str, namespace: str) -> bool:
    return any((group, resource, verb) in g.tuples and (g.namespace is None or g.namespace == namespace)
               for g in grants)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, what: str, proc: subprocess.Popen, timeout: float = 40.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _apply(kubectl, objs: list[dict]) -> None:
    kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(objs))


SERVICE = {
    "apiVersion": "internvl.ai/v1alpha1", "kind": "InternVLService",
    "metadata": {"name": "chat", "namespace": "ml"},
    "spec": {"model": {"modelType": "internvl3-1b", "pvc": {"claimName": "models", "path": "m"}},
             "gpus": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 2},
             "disruptionBudget": {"minAvailable": 1}},
}
FINETUNE = {
    "apiVersion": "internvl.ai/v1alpha1", "kind": "InternVLFineTune",
    "metadata": {"name": "tiny", "namespace": "ml"},
    "spec": {"model": {"modelType": "internvl3-1b", "pvc": {"claimName": "models", "path": "m"}},
             "dataset": {"configMap": {"name": "data"}, "files": ["train.jsonl"]},
             "output": {"claimName": "out"}},
}


@pytest.mark.skipif("os.environ.get('INTERNVL_E2E_REAL') == '1'", reason="records requests through the emulator")
def test_operator_requests_are_allowed_by_the_rendered_roles(kube_api, kubectl, tmp_path):
    """Namespaced mode (the stricter one): Role in `ml` + the read-only cluster reads."""
    values = {"watchNamespaces": ["ml"], "operator": {"pollIntervalSeconds": 1}}
    objs = render(values)
    # (`kubectl create namespace` sends protobuf, which the emulator does not read; apply sends JSON.)
    _apply(kubectl, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}} for ns in ("ml", RELEASE_NS)])
    # The whole rendered chart goes in through the real kubectl (server-side apply), CRDs first.
    crds = by_kind(objs, "CustomResourceDefinition")
    _apply(kubectl, crds)
    _apply(kubectl, [o for o in objs if o["kind"] != "CustomResourceDefinition"])
    listed = kubectl("get", "deploy,sa,svc,role,rolebinding", "-n", RELEASE_NS, "-o", "name").stdout
    assert "deployment.apps/ivl-internvl-operator" in listed
    assert "role.rbac.authorization.k8s.io/ivl-internvl-operator" in kubectl("get", "role", "-n", "ml", "-o", "name").stdout

    pvcs = [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": n, "namespace": "ml"},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
            for n in ("models", "out")]
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "data", "namespace": "ml"},
          "data": {"train.jsonl": '{"messages": []}\n'}}
    _apply(kubectl, pvcs + [cm, SERVICE, FINETUNE])

    # The operator process gets exactly the env the chart's Deployment gives it (ports moved off the defaults).
    dep = one(objs, "Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    health, metrics = _free_port(), _free_port()
    env.update(INTERNVL_OPERATOR_LIVENESS_PORT=str(health), INTERNVL_OPERATOR_METRICS_PORT=str(metrics))
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("INTERNVL_OPERATOR_")}
    proc_env.update(env, KUBECONFIG=kube_api.kubeconfig, PYTHONPATH=str(REPO / "operator"))
    log = open(tmp_path / "operator.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "internvl_operator", *container.get("args", [])], env=proc_env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = kube_api.server

    def exists(path):
        return any(r.status == 201 for r in server.requests_for(path, verb="create"))

    def get(kind, name):
        out = kubectl("get", kind, name, "-n", "ml", "-o", "yaml", check=False)
        return yaml.safe_load(out.stdout) if out.returncode == 0 else None

    try:
        # The chart's probe path answers on the chart's port.
        def healthz():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=1).status == 200
            except OSError:
                return False

        _wait(healthz, "GET /healthz", proc)
        _wait(lambda: exists(r"/namespaces/ml/deployments$") and exists(r"/horizontalpodautoscalers$")
              and exists(r"/poddisruptionbudgets$"), "serving children", proc)
        _wait(lambda: exists(r"/namespaces/ml/jobs$"), "data-check Job", proc)
        # A pod of the data-check stage: the operator lists it and reads its log.
        job = get("job", "tiny-datacheck")
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "tiny-datacheck-x1", "namespace": "ml", "labels": job["spec"]["template"]["metadata"]["labels"]},
               "spec": {"containers": [{"name": "datacheck", "image": "busybox"}]}}
        _apply(kubectl, [pod])
        _wait(lambda: server.requests_for(r"/pods/tiny-datacheck-x1/log$"), "pod log read", proc)
        # Dropping autoscaling and the budget makes the operator delete both.
        kubectl("patch", "internvlservice", "chat", "-n", "ml", "--type", "json", "-p",
                '[{"op": "remove", "path": "/spec/autoscaling"}, {"op": "remove", "path": "/spec/disruptionBudget"}]')
        _wait(lambda: server.requests_for(r"/poddisruptionbudgets/chat$", verb="delete")
              and server.requests_for(r"/horizontalpodautoscalers/chat$", verb="delete"), "HPA/PDB deletes", proc)
        _wait(lambda: (get("internvlservice", "chat") or {}).get("status", {}).get("phase"), "service status", proc)
        assert urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=2).status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    output = (tmp_path / "operator.log").read_text()

    sa_name = one(objs, "ServiceAccount")["metadata"]["name"]
    grants = _grants(objs, sa_name)
    used, denied = set(), []
    for rec in server.requests:
        if rec.user_agent.startswith("kubectl"):
            continue  # the test's own calls
        route = parse_path(rec.path)
        if route is None or not route.plural:
            continue  # discovery (/api, /apis, /version): allowed to every user by system:discovery
        resource = route.plural + (f"/{route.sub}" if route.sub else "")
        key = (route.group, resource, rec.verb)
        used.add(key)
        if not _allowed(grants, route.group, resource, rec.verb, route.namespace):
            denied.append(f"{rec.method} {rec.path} ({rec.verb} {resource}, {rec.user_agent})")
    assert not denied, "requests the rendered RBAC would forbid:\n" + "\n".join(denied) + "\n" + output[-3000:]
    # What this run exercised is part of the table; the rest of the table is explained there.
    assert used <= set(OPERATOR_CALLS) | KOPF_CLUSTER_CRDS | KOPF_CLUSTER_NAMESPACES, used
    assert {("", "pods/log", "get"), ("internvl.ai", "internvlservices/status", "patch"),
            ("autoscaling", "horizontalpodautoscalers", "delete"), ("batch", "jobs", "create"),
            ("", "events", "create")} <= used
    assert "Traceback" not in output, output[-3000:]
