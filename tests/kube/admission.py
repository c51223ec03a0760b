"""Per-kind server-side defaults and side effects, the few that clients observe:

- Job: a generated selector (`batch.kubernetes.io/controller-uid`) and template labels, plus the
  defaults kubectl and controllers read (completions, parallelism, backoffLimit, completionMode).
- Pod: phase Pending, restartPolicy Always. Service: a clusterIP (127.0.0.1, or None if headless).
- Namespace: phase Active. CRD: names and versions checked, status Established, served at once.
"""
from __future__ import annotations

import copy

from .errors import invalid

CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")


def on_create(store, rt, obj) -> None:
    spec = obj.get("spec")
    if rt.key == ("batch", "jobs"):
        _default_job(obj)
    elif rt.key == ("", "pods"):
        obj.setdefault("spec", {}).setdefault("restartPolicy", "Always")
        obj["spec"].setdefault("terminationGracePeriodSeconds", 30)
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
    elif rt.key == ("", "services"):
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        if spec.get("clusterIP") != "None":
            spec["clusterIP"] = "127.0.0.1"  # every Service answers on loopback; ports via the kubelet
        spec["clusterIPs"] = [spec["clusterIP"]]
        for p in spec.get("ports") or []:
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))
        obj["status"] = {"loadBalancer": {}}
    elif rt.key == ("", "namespaces"):
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj["status"] = {"phase": "Active"}
        obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
    elif rt.key in (("apps", "deployments"), ("apps", "replicasets")):
        spec = obj.setdefault("spec", {})
        spec.setdefault("replicas", 1)
        if rt.kind == "Deployment":
            spec.setdefault("strategy", {"type": "RollingUpdate",
                                         "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
            spec.setdefault("revisionHistoryLimit", 10)
            spec.setdefault("progressDeadlineSeconds", 600)
    elif rt.key == ("", "persistentvolumeclaims"):
        obj["status"] = {"phase": "Bound"}  # no provisioner: the kubelet maps claims to host dirs
    elif rt.key == CRD_KEY:
        _check_crd(store, obj)
        obj["status"] = _crd_status(obj)


def on_update(store, rt, new, old) -> None:
    if rt.key == CRD_KEY:
        _check_crd(store, new)
        same_names = (old.get("status") or {}).get("acceptedNames") == new["spec"]["names"]
        new["status"] = copy.deepcopy(old["status"]) if same_names else _crd_status(new)
    elif rt.key == ("batch", "jobs"):
        # the generated selector survives updates that omit it (kubectl apply never sends it)
        spec, old_spec = new.setdefault("spec", {}), old.get("spec") or {}
        for k in ("selector",):
            if k not in spec and k in old_spec:
                spec[k] = copy.deepcopy(old_spec[k])
        tmpl_labels = ((old_spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        labels = spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {})
        for k, v in tmpl_labels.items():
            labels.setdefault(k, v)
    elif rt.key == ("", "services"):
        spec, old_spec = new.setdefault("spec", {}), old.get("spec") or {}
        spec.setdefault("clusterIP", old_spec.get("clusterIP"))
        spec.setdefault("clusterIPs", old_spec.get("clusterIPs"))


def after_write(store, rt, obj, old) -> None:
    if rt.key == CRD_KEY and not obj["metadata"].get("deletionTimestamp"):
        store.crd_served(obj)


def after_delete(store, rt, obj) -> None:
    if rt.key == CRD_KEY:
        store.crd_removed(obj)


def _default_job(job) -> None:
    spec = job.setdefault("spec", {})
    spec.setdefault("parallelism", 1)
    if spec.get("completionMode") == "Indexed":
        spec.setdefault("completions", spec["parallelism"])
    spec.setdefault("completions", 1)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
    meta = job["metadata"]
    uid, name = meta["uid"], meta["name"]
    tmeta = spec.setdefault("template", {}).setdefault("metadata", {})
    labels = tmeta.setdefault("labels", {})
    if not spec.get("manualSelector"):
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        labels.update({"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                       "controller-uid": uid, "job-name": name})
    meta.setdefault("labels", {}).setdefault("batch.kubernetes.io/job-name", name)
    meta["labels"].setdefault("job-name", name)


def _check_crd(store, crd) -> None:
    from .resources import ResourceType  # noqa: F401  (kept local: avoids an import cycle)
    rt = store.types[CRD_KEY]
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    causes = []
    for f in ("group", "names", "versions"):
        if not spec.get(f):
            causes.append((f"spec.{f}", "Required value"))
    if names and not names.get("plural"):
        causes.append(("spec.names.plural", "Required value"))
    if names and not names.get("kind"):
        causes.append(("spec.names.kind", "Required value"))
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        causes.append(("spec.scope", f'Unsupported value: "{spec.get("scope")}": supported values: '
                                     '"Cluster", "Namespaced"'))
    if not causes and crd["metadata"]["name"] != f"{names['plural']}.{spec['group']}":
        causes.append(("metadata.name", f'Invalid value: "{crd["metadata"]["name"]}": must be spec.names.plural+"."'
                                        f'+spec.group'))
    versions = spec.get("versions") or []
    if versions and sum(1 for v in versions if v.get("storage")) != 1:
        causes.append(("spec.versions", "Invalid value: must have exactly one version marked as storage version"))
    for i, v in enumerate(versions):
        if not ((v.get("schema") or {}).get("openAPIV3Schema")):
            causes.append((f"spec.versions[{i}].schema.openAPIV3Schema", "Required value: schemas are required"))
    if causes:
        raise invalid(rt, crd["metadata"].get("name", ""), causes)


def _crd_status(crd) -> dict:
    from .store import now_iso
    t = now_iso()
    spec = crd["spec"]
    return {
        "acceptedNames": copy.deepcopy(spec["names"]),
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": t},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": t},
        ],
        "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
    }
