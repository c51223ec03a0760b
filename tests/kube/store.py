"""The emulator's state: objects by resource type, one global resourceVersion counter, a bounded
event history for watches, and the server-side rules of writes (create, update, patch, apply,
delete with finalizers, garbage collection of dependents).

All methods are synchronous and run on the API server's event loop thread; watchers receive
events through asyncio queues.
"""
from __future__ import annotations

import copy
import datetime as dt
import random
import re
import uuid
from collections import deque
from dataclasses import dataclass, field

from . import admission, patches, schema
from .errors import ApiError, already_exists, bad_request, conflict, invalid, not_found
from .resources import ResourceType, builtin_types, from_crd
from .selectors import parse_field_selector, parse_label_selector

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what the real name generator draws from
CRD_CLEANUP_FINALIZER = "customresourcecleanup.apiextensions.k8s.io"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Event:
    rv: int
    key: tuple
    namespace: str
    type: str
    obj: dict
    old: dict | None = None


@dataclass
class Watcher:
    key: tuple
    namespace: str | None
    label_pred: object
    field_pred: object
    queue: object  # asyncio.Queue of (type, obj) or None to close
    closed: bool = False

    def offer(self, ev: Event) -> None:
        if self.closed or ev.key != self.key:
            return
        if self.namespace and ev.namespace != self.namespace:
            return
        new_ok = self._matches(ev.obj)
        old_ok = ev.old is not None and self._matches(ev.old)
        kind = ev.type
        if kind == "MODIFIED":
            if new_ok and not old_ok:
                kind = "ADDED"
            elif old_ok and not new_ok:
                kind = "DELETED"
            elif not new_ok:
                return
        elif not new_ok:
            return
        self.queue.put_nowait((kind, ev.obj))

    def _matches(self, obj: dict) -> bool:
        return self.label_pred(obj["metadata"].get("labels") or {}) and self.field_pred(obj)


@dataclass
class Store:
    history_size: int = 5000
    types: dict = field(default_factory=dict)
    objects: dict = field(default_factory=dict)
    rv: int = 0
    history: deque = field(default_factory=deque)
    history_floor: int = 0  # events with rv <= floor are no longer kept: watches from there get 410
    watchers: list = field(default_factory=list)
    applied: dict = field(default_factory=dict)  # (uid, manager) -> last applied config (server-side apply)
    on_change: object = None  # callback after deletes: the server schedules garbage collection

    def __post_init__(self):
        for rt in builtin_types():
            self.register(rt)
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create(self.types[("", "namespaces")], "", {"apiVersion": "v1", "kind": "Namespace",
                                                             "metadata": {"name": ns}})

    # ---- types ------------------------------------------------------------------------------
    def register(self, rt: ResourceType) -> None:
        self.types[rt.key] = rt
        self.objects.setdefault(rt.key, {})

    def find_type(self, group: str, version: str, plural: str) -> ResourceType:
        rt = self.types.get((group, plural))
        if rt is None or version not in rt.versions:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return rt

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for rt in self.types.values():
            for v in rt.versions:
                if v not in out.setdefault(rt.group, []):
                    out[rt.group].append(v)
        return out

    # ---- reads ------------------------------------------------------------------------------
    def view(self, rt: ResourceType, obj: dict, version: str | None) -> dict:
        out = copy.deepcopy(obj)
        out["apiVersion"] = rt.api_version(version or rt.storage_version)
        out["kind"] = rt.kind
        return out

    def get(self, rt: ResourceType, ns: str, name: str) -> dict:
        obj = self.objects[rt.key].get((ns if rt.namespaced else "", name))
        if obj is None:
            raise not_found(rt, name)
        return obj

    def list(self, rt, ns, label_selector=None, field_selector=None) -> list[dict]:
        lp, fp = parse_label_selector(label_selector), parse_field_selector(field_selector)
        items = [o for (ons, _), o in sorted(self.objects[rt.key].items())
                 if (not ns or ons == ns) and lp(o["metadata"].get("labels") or {}) and fp(o)]
        return items

    def by_uid(self, uid: str):
        for key, objs in self.objects.items():
            for obj in objs.values():
                if obj["metadata"].get("uid") == uid:
                    return self.types[key], obj
        return None, None

    # ---- events -----------------------------------------------------------------------------
    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def _emit(self, rt, ns, kind, obj, old=None) -> None:
        ev = Event(int(obj["metadata"]["resourceVersion"]), rt.key, ns, kind,
                   self.view(rt, obj, None), self.view(rt, old, None) if old else None)
        self.history.append(ev)
        while len(self.history) > self.history_size:
            self.history_floor = self.history.popleft().rv
        for w in list(self.watchers):
            w.offer(ev)

    def compact(self) -> None:
        """Forget the whole history, as etcd compaction does: older watches get 410 Gone."""
        self.history.clear()
        self.history_floor = self.rv

    def events_since(self, rv: int) -> list[Event]:
        return [e for e in self.history if e.rv > rv]

    # ---- writes -----------------------------------------------------------------------------
    def _check_namespace(self, rt, ns, creating_kind) -> None:
        if not rt.namespaced:
            return
        if not ns:
            raise bad_request("the namespace of the object must be set")
        nsobj = self.objects[("", "namespaces")].get(("", ns))
        if nsobj is None:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found',
                           {"name": ns, "kind": "namespaces"})
        if nsobj["metadata"].get("deletionTimestamp"):
            raise ApiError(403, "Forbidden", f'{rt.plural} "{creating_kind}" is forbidden: unable to create new '
                                             f"content in namespace {ns} because it is being terminated")

    def _check_schema(self, rt, obj, old, version, strict: bool) -> list[str]:
        """Default, prune and validate a custom object; returns the pruned paths (warnings)."""
        if not rt.is_custom:
            return []
        sch = rt.schemas.get(version or rt.storage_version) or {}
        res = schema.process(sch, obj, old)
        if strict and res.unknown:
            raise ApiError(400, "BadRequest", "strict decoding error: " +
                           ", ".join(f'unknown field "{p}"' for p in res.unknown))
        if res.errors:
            raise invalid(rt, obj["metadata"].get("name", ""), res.errors)
        return [f'unknown field "{p}"' for p in res.unknown]

    def create(self, rt, ns, body, version=None, dry_run=False, strict=False, manager=None,
               warnings=None, operation="Update") -> dict:
        if not isinstance(body, dict):
            raise bad_request("the body of the request was in an unknown format")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            if meta.get("namespace") and meta["namespace"] != ns:
                raise bad_request("the namespace of the provided object does not match the namespace sent on "
                                  "the request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
            ns = ""
        if body.get("kind") and body["kind"] != rt.kind:
            raise bad_request(f"the kind {body['kind']!r} does not match the resource {rt.plural!r}")
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choice(GENERATE_ALPHABET) for _ in range(5))
            else:
                raise invalid(rt, "", [("metadata.name", "Required value: name or generateName is required")])
        name = meta["name"]
        if not NAME_RE.match(name) or len(name) > 253:
            raise invalid(rt, name, [("metadata.name", f'Invalid value: "{name}": a lowercase RFC 1123 subdomain '
                                                       "must consist of lower case alphanumeric characters, '-' "
                                                       "or '.'")])
        self._check_namespace(rt, ns, name)
        if (ns, name) in self.objects[rt.key]:
            raise already_exists(rt, name)
        if rt.has_status:
            obj.pop("status", None)  # status is not writable through create
        for k in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "selfLink"):
            meta.pop(k, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_iso()
        meta["generation"] = 1
        admission.on_create(self, rt, obj)
        w = self._check_schema(rt, obj, None, version, strict)
        if warnings is not None:
            warnings.extend(w)
        if manager:
            meta["managedFields"] = [_managed_entry(manager, operation, obj, rt, version)]
        if dry_run:
            meta["resourceVersion"] = str(self.rv)
            return obj
        obj["apiVersion"], obj["kind"] = rt.api_version(rt.storage_version), rt.kind
        meta["resourceVersion"] = str(self._next_rv())
        self.objects[rt.key][(ns, name)] = obj
        self._emit(rt, ns, "ADDED", obj)
        admission.after_write(self, rt, obj, None)
        if meta.get("ownerReferences"):
            self._changed()
        return obj

    def update(self, rt, ns, name, body, version=None, subresource=None, dry_run=False, strict=False,
               require_rv=None, manager=None, warnings=None, operation="Update") -> dict:
        ns = ns if rt.namespaced else ""
        old = self.get(rt, ns, name)
        if not isinstance(body, dict):
            raise bad_request("the body of the request was in an unknown format")
        bmeta = body.get("metadata") or {}
        if bmeta.get("name") and bmeta["name"] != name:
            raise bad_request(f"the name of the object ({bmeta['name']}) does not match the name on the URL ({name})")
        rv = bmeta.get("resourceVersion")
        if rv and str(rv) != old["metadata"]["resourceVersion"]:
            raise conflict(rt, name)
        if not rv and (require_rv if require_rv is not None else rt.is_custom):
            raise invalid(rt, name, [("metadata.resourceVersion", "Invalid value: 0x0: must be specified for an "
                                                                  "update")])
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(body)
            if rt.has_status:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation",
                  "namespace", "name"):
            if k in old["metadata"]:
                meta[k] = old["metadata"][k]
            else:
                meta.pop(k, None)
        if subresource == "status":
            new["metadata"] = copy.deepcopy(old["metadata"])
        old_fin = set(old["metadata"].get("finalizers") or [])
        added = [f for f in meta.get("finalizers") or [] if f not in old_fin]
        if old["metadata"].get("deletionTimestamp") and added:
            raise invalid(rt, name, [("metadata.finalizers", f"Forbidden: no new finalizers can be added if the "
                                                             f"object is being deleted, found new finalizers "
                                                             f"{added!r}")])
        admission.on_update(self, rt, new, old)
        w = self._check_schema(rt, new, old, version, strict)
        if warnings is not None:
            warnings.extend(w)
        if _content(new) != _content(old):
            meta["generation"] = old["metadata"].get("generation", 1) + 1
        if manager:
            entries = [e for e in meta.get("managedFields") or old["metadata"].get("managedFields") or []
                       if not (e.get("manager") == manager and e.get("operation") == operation)]
            meta["managedFields"] = entries + [_managed_entry(manager, operation, new, rt, version,
                                                              subresource)]
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if _same(new, old):
            return old  # a no-op write keeps the resourceVersion and emits nothing, as the real server
        if dry_run:
            return new
        new["apiVersion"], new["kind"] = rt.api_version(rt.storage_version), rt.kind
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(rt, ns, name, new)
        meta["resourceVersion"] = str(self._next_rv())
        self.objects[rt.key][(ns, name)] = new
        self._emit(rt, ns, "MODIFIED", new, old)
        admission.after_write(self, rt, new, old)
        if (new["metadata"].get("ownerReferences") != old["metadata"].get("ownerReferences")
                or new["metadata"].get("finalizers") != old["metadata"].get("finalizers")):
            self._changed()
        return new

    def patch(self, rt, ns, name, patch_type, body, version=None, subresource=None, dry_run=False,
              strict=False, manager=None, force=False, warnings=None) -> dict:
        ns = ns if rt.namespaced else ""
        if patch_type == "apply":
            return self.apply(rt, ns, name, body, version, subresource, dry_run, strict, manager or "unknown",
                              warnings)
        old = self.get(rt, ns, name)
        current = self.view(rt, old, version)
        try:
            if patch_type == "merge":
                new = patches.merge_patch(current, body)
            elif patch_type == "json":
                new = patches.json_patch(current, body)
            elif patch_type == "strategic":
                if rt.is_custom:
                    raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format "
                                   "- accepted media types include: application/json-patch+json, "
                                   "application/merge-patch+json, application/apply-patch+yaml")
                new = patches.strategic_merge(current, body, rt.kind)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {patch_type!r}")
        except patches.PatchError as exc:
            raise ApiError(422, "Invalid", str(exc))
        if not isinstance(new, dict):
            raise ApiError(422, "Invalid", "the patch did not produce an object")
        new_rv = (new.get("metadata") or {}).get("resourceVersion")
        if new_rv and str(new_rv) != old["metadata"]["resourceVersion"]:
            raise conflict(rt, name)
        new.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self.update(rt, ns, name, new, version, subresource, dry_run, strict, require_rv=False,
                           manager=manager, warnings=warnings)

    def apply(self, rt, ns, name, body, version, subresource, dry_run, strict, manager, warnings) -> dict:
        """Server-side apply, simplified: the applied config is merged over the live object (strategic
        merge for built-ins, deep merge for custom objects), and fields this manager applied last
        time but dropped now are removed. Conflicts with other managers are not reported."""
        if not isinstance(body, dict):
            raise bad_request("the body of an apply must be an object")
        existing = self.objects[rt.key].get((ns, name))
        if existing is None:
            if subresource:
                raise not_found(rt, name)
            body = copy.deepcopy(body)
            body.setdefault("metadata", {})["name"] = name
            obj = self.create(rt, ns, body, version, dry_run, strict, manager, warnings, operation="Apply")
            if not dry_run:
                self.applied[(obj["metadata"]["uid"], manager)] = copy.deepcopy(body)
            return obj
        uid = existing["metadata"]["uid"]
        current = self.view(rt, existing, version)
        if rt.is_custom:
            merged = _deep_merge(current, body)
        else:
            merged = patches.strategic_merge(current, body, rt.kind)
        prev = self.applied.get((uid, manager))
        if prev is not None:
            now_paths = patches.leaf_paths(body)
            for path in patches.leaf_paths(prev) - now_paths:
                if path and path[0] != "metadata" or path[:2] in (("metadata", "labels"), ("metadata", "annotations")):
                    if not any(path[:i] in now_paths for i in range(1, len(path))):
                        patches.remove_path(merged, path)
        merged.setdefault("metadata", {})["resourceVersion"] = body.get("metadata", {}).get(
            "resourceVersion") or existing["metadata"]["resourceVersion"]
        obj = self.update(rt, ns, name, merged, version, subresource, dry_run, strict, require_rv=False,
                          manager=manager, warnings=warnings, operation="Apply")
        if not dry_run:
            self.applied[(uid, manager)] = copy.deepcopy(body)
        return obj

    def delete(self, rt, ns, name, propagation=None, grace=None, preconditions=None, dry_run=False) -> tuple[dict, bool]:
        """Returns (object, gone): gone is False while finalizers or graceful deletion hold it."""
        ns = ns if rt.namespaced else ""
        old = self.get(rt, ns, name)
        pre = preconditions or {}
        if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
            raise conflict(rt, name, f"Precondition failed: UID in precondition: {pre['uid']}, UID in object "
                                     f"meta: {old['metadata']['uid']}")
        if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise conflict(rt, name, "Precondition failed: resourceVersion mismatch")
        if dry_run:
            return old, False
        if propagation is None:
            # batch/v1 Jobs still default to orphaning their pods, a classic surprise kept on purpose
            propagation = "Orphan" if rt.key == ("batch", "jobs") else "Background"
        new = copy.deepcopy(old)
        meta = new["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if rt.key == ("", "namespaces"):
            new.setdefault("status", {})["phase"] = "Terminating"
            finalizers = finalizers or []
            meta.setdefault("finalizers", [])
            if "kubernetes" not in (new.get("spec") or {}).get("finalizers", []):
                new.setdefault("spec", {})["finalizers"] = ["kubernetes"]
        if rt.key == ("apiextensions.k8s.io", "customresourcedefinitions") and CRD_CLEANUP_FINALIZER not in finalizers:
            finalizers.append(CRD_CLEANUP_FINALIZER)
        if propagation == "Orphan":
            self._orphan_dependents(meta["uid"])
        elif propagation == "Foreground" and "foregroundDeletion" not in finalizers:
            finalizers.append("foregroundDeletion")
        graceful = (rt.key == ("", "pods") and (new.get("spec") or {}).get("nodeName") and grace != 0
                    and not old["metadata"].get("deletionTimestamp")
                    and (new.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))
        if grace == 0 and rt.key == ("", "pods") and not finalizers:
            graceful = False
        if finalizers or graceful or rt.key == ("", "namespaces"):
            meta["finalizers"] = finalizers
            if not meta["finalizers"]:
                meta.pop("finalizers")
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = now_iso()
                meta["deletionGracePeriodSeconds"] = (grace if grace is not None else
                                                      new.get("spec", {}).get("terminationGracePeriodSeconds", 30)
                                                      if graceful else 0)
                meta["generation"] = meta.get("generation", 1) + 1
            if _same(new, old):
                return old, False
            meta["resourceVersion"] = str(self._next_rv())
            self.objects[rt.key][(ns, name)] = new
            self._emit(rt, ns, "MODIFIED", new, old)
            self._changed()
            return new, False
        return self._remove(rt, ns, name, new), True

    def _remove(self, rt, ns, name, obj) -> dict:
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._next_rv())
        self.objects[rt.key].pop((ns, name), None)
        uid = obj["metadata"].get("uid")
        for k in [k for k in self.applied if k[0] == uid]:
            del self.applied[k]
        self._emit(rt, ns, "DELETED", obj)
        admission.after_delete(self, rt, obj)
        self._changed()
        return obj

    def _changed(self) -> None:
        if self.on_change:
            self.on_change()

    def _orphan_dependents(self, uid: str) -> None:
        for key, objs in self.objects.items():
            rt = self.types[key]
            for (ns, name), obj in list(objs.items()):
                refs = obj["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == uid for r in refs):
                    new = copy.deepcopy(obj)
                    new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                    if not new["metadata"]["ownerReferences"]:
                        del new["metadata"]["ownerReferences"]
                    self.update(rt, ns, name, new, require_rv=False)

    # ---- garbage collection -----------------------------------------------------------------
    def collect_garbage(self) -> int:
        """One pass of the garbage collector and the namespace/CRD cleanup; returns deletions made."""
        done = 0
        uids = {o["metadata"]["uid"] for objs in self.objects.values() for o in objs.values()}
        for key, objs in list(self.objects.items()):
            rt = self.types.get(key)
            if rt is None:
                continue
            for (ns, name), obj in list(objs.items()):
                meta = obj["metadata"]
                refs = meta.get("ownerReferences") or []
                if refs and not any(r.get("uid") in uids for r in refs) and not meta.get("deletionTimestamp"):
                    self.delete(rt, ns, name, propagation="Background")
                    done += 1
                elif meta.get("deletionTimestamp") and "foregroundDeletion" in (meta.get("finalizers") or []):
                    deps = self._dependents(meta["uid"])
                    for drt, dobj in deps:
                        if not dobj["metadata"].get("deletionTimestamp"):
                            self.delete(drt, dobj["metadata"].get("namespace", ""), dobj["metadata"]["name"],
                                        propagation="Foreground")
                            done += 1
                    if not deps:
                        self._drop_finalizer(rt, ns, name, "foregroundDeletion")
        for (_, nsname), nsobj in list(self.objects[("", "namespaces")].items()):
            if nsobj["metadata"].get("deletionTimestamp"):
                left = 0
                for key, objs in list(self.objects.items()):
                    rt = self.types[key]
                    if not rt.namespaced:
                        continue
                    for (ons, name), obj in list(objs.items()):
                        if ons == nsname:
                            left += 1
                            if not obj["metadata"].get("deletionTimestamp"):
                                self.delete(rt, ons, name, propagation="Background", grace=0)
                                done += 1
                if left == 0:
                    self._remove(self.types[("", "namespaces")], "", nsname, nsobj)
        crds = self.types[("apiextensions.k8s.io", "customresourcedefinitions")]
        for (_, crdname), crd in list(self.objects[crds.key].items()):
            if crd["metadata"].get("deletionTimestamp"):
                rt = from_crd(crd)
                objs = self.objects.get(rt.key, {})
                for (ons, name), obj in list(objs.items()):
                    if not obj["metadata"].get("deletionTimestamp"):
                        self.delete(self.types[rt.key], ons, name, propagation="Background")
                        done += 1
                if not self.objects.get(rt.key):
                    self._drop_finalizer(crds, "", crdname, CRD_CLEANUP_FINALIZER)
        return done

    def _dependents(self, uid: str):
        out = []
        for key, objs in self.objects.items():
            for obj in objs.values():
                if any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or []):
                    out.append((self.types[key], obj))
        return out

    def _drop_finalizer(self, rt, ns, name, finalizer) -> None:
        obj = self.objects[rt.key].get((ns, name))
        if obj and finalizer in (obj["metadata"].get("finalizers") or []):
            new = copy.deepcopy(obj)
            new["metadata"]["finalizers"] = [f for f in new["metadata"]["finalizers"] if f != finalizer]
            self.update(rt, ns, name, new, require_rv=False)

    # ---- CRDs ---------------------------------------------------------------------------------
    def crd_served(self, crd: dict) -> None:
        rt = from_crd(crd)
        self.register(rt)

    def crd_removed(self, crd: dict) -> None:
        rt = from_crd(crd)
        self.types.pop(rt.key, None)
        self.objects.pop(rt.key, None)


def _content(obj: dict) -> dict:
    """What the generation counts: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _same(a: dict, b: dict) -> bool:
    def strip(o):
        o = {k: v for k, v in o.items() if k not in ("apiVersion", "kind")}
        m = dict(o.get("metadata") or {})
        m.pop("managedFields", None)
        m.pop("resourceVersion", None)
        o["metadata"] = m
        return o
    return strip(a) == strip(b)


def _deep_merge(base, over):
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = _deep_merge(out.get(k), v)
        return out
    return copy.deepcopy(over)


def _managed_entry(manager, operation, obj, rt, version, subresource=None) -> dict:
    fields = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
    meta = fields.get("metadata") or {}
    fields["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
    entry = {"manager": manager, "operation": operation, "apiVersion": rt.api_version(version or rt.storage_version),
             "time": now_iso(), "fieldsType": "FieldsV1", "fieldsV1": patches.fields_v1(fields)}
    if subresource:
        entry["subresource"] = subresource
    return entry
