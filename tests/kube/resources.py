"""The resource types the emulator serves: built-in kinds plus those registered by CRDs.

A resource type is keyed by (group, plural); objects are stored once per type whatever version
they were written through (CRD versions share storage, conversion strategy None).
"""
from __future__ import annotations

from dataclasses import dataclass, field

ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
STATUS_VERBS = ["get", "patch", "update"]


@dataclass
class ResourceType:
    group: str  # "" for the core group
    versions: list[str]
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    has_status: bool = False  # a status subresource: main writes keep status, /status writes only status
    extra_subresources: list[str] = field(default_factory=list)  # e.g. ["log"] for pods
    # CRD-only facts, per version
    schemas: dict[str, dict] = field(default_factory=dict)
    printer_columns: dict[str, list[dict]] = field(default_factory=dict)
    storage_version: str = ""
    crd_name: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def is_custom(self) -> bool:
        return bool(self.crd_name)

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    def group_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def qualified_plural(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def discovery_entries(self) -> list[dict]:
        main = {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(ALL_VERBS),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        entries = [main]
        if self.has_status:
            entries.append({"name": f"{self.plural}/status", "singularName": "", "namespaced": self.namespaced,
                            "kind": self.kind, "verbs": list(STATUS_VERBS)})
        for sub in self.extra_subresources:
            entries.append({"name": f"{self.plural}/{sub}", "singularName": "", "namespaced": self.namespaced,
                            "kind": self.kind if sub != "binding" else "Binding",
                            "verbs": ["get"] if sub == "log" else ["create"]})
        return entries


def _rt(group, version, plural, kind, namespaced=True, short=(), cats=(), status=False, extra=()):
    singular = kind.lower()
    return ResourceType(group=group, versions=[version], plural=plural, singular=singular, kind=kind,
                        namespaced=namespaced, short_names=list(short), categories=list(cats),
                        has_status=status, extra_subresources=list(extra), storage_version=version)


def builtin_types() -> list[ResourceType]:
    """The built-in kinds the operator, Kopf and kubectl touch (a subset of a real cluster's)."""
    return [
        _rt("", "v1", "namespaces", "Namespace", namespaced=False, short=["ns"], status=True),
        _rt("", "v1", "pods", "Pod", short=["po"], cats=["all"], status=True, extra=["log", "binding"]),
        _rt("", "v1", "services", "Service", short=["svc"], cats=["all"], status=True),
        _rt("", "v1", "endpoints", "Endpoints", short=["ep"]),
        _rt("", "v1", "configmaps", "ConfigMap", short=["cm"]),
        _rt("", "v1", "secrets", "Secret"),
        _rt("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short=["pvc"], status=True),
        _rt("", "v1", "persistentvolumes", "PersistentVolume", namespaced=False, short=["pv"], status=True),
        _rt("", "v1", "events", "Event", short=["ev"]),
        _rt("", "v1", "serviceaccounts", "ServiceAccount", short=["sa"]),
        _rt("", "v1", "nodes", "Node", namespaced=False, short=["no"], status=True),
        _rt("batch", "v1", "jobs", "Job", cats=["all"], status=True),
        _rt("apps", "v1", "deployments", "Deployment", short=["deploy"], cats=["all"], status=True),
        _rt("apps", "v1", "replicasets", "ReplicaSet", short=["rs"], cats=["all"], status=True),
        _rt("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", short=["hpa"],
            cats=["all"], status=True),
        _rt("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", short=["pdb"], status=True),
        _rt("coordination.k8s.io", "v1", "leases", "Lease"),
        _rt("events.k8s.io", "v1", "events", "Event", short=["ev"]),
        _rt("rbac.authorization.k8s.io", "v1", "roles", "Role"),
        _rt("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
        _rt("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
        _rt("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False),
        _rt("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
            namespaced=False, short=["crd", "crds"], cats=["api-extensions"], status=True),
    ]


def from_crd(crd: dict) -> ResourceType:
    """The resource type a CRD object declares (served versions only)."""
    spec = crd["spec"]
    names = spec["names"]
    served = [v for v in spec["versions"] if v.get("served", True)]
    storage = next((v["name"] for v in spec["versions"] if v.get("storage")), served[0]["name"] if served else "")
    rt = ResourceType(
        group=spec["group"],
        versions=[v["name"] for v in served],
        plural=names["plural"],
        singular=names.get("singular") or names["kind"].lower(),
        kind=names["kind"],
        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        short_names=list(names.get("shortNames") or []),
        categories=list(names.get("categories") or []),
        has_status=any("status" in (v.get("subresources") or {}) for v in served),
        storage_version=storage,
        crd_name=crd["metadata"]["name"],
    )
    for v in served:
        rt.schemas[v["name"]] = (v.get("schema") or {}).get("openAPIV3Schema") or {}
        rt.printer_columns[v["name"]] = list(v.get("additionalPrinterColumns") or [])
    return rt
