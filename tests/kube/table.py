"""Server-side printing: lists and objects as `meta.k8s.io/v1 Table`, which `kubectl get` asks for.

Custom resources get their CRD's additionalPrinterColumns (JSONPath, simple `.a.b[0].c` and
`.a[?(@.type=="X")].b` filters); built-ins get the columns kubectl users expect for the kinds the
operator creates, others Name and Age.
"""
from __future__ import annotations

import datetime as dt
import re


def human_age(ts: str | None, end: str | None = None) -> str:
    """The short age kubectl prints (`45s`, `3m12s`, `5h`, `2d`), from ts to now (or to `end`)."""
    if not ts:
        return "<unknown>"
    try:
        then = dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
        until = (dt.datetime.strptime(end, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc) if end
                 else dt.datetime.now(dt.timezone.utc))
    except ValueError:
        return ts
    s = int((until - then).total_seconds())
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    return f"{h // 24}d"


_FILTER_RE = re.compile(r'^\[\?\(@\.([\w.]+)\s*==\s*["\']([^"\']*)["\']\)\]')


def jsonpath(obj, path: str):
    """Evaluate the JSONPath subset printer columns use; None when absent."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    path = path.lstrip("$")
    cur = obj
    while path:
        if path.startswith("."):
            m = re.match(r"^\.([\w\-/]+|'[^']*'|\"[^\"]*\")", path)
            if not m:
                return None
            key = m.group(1).strip("'\"")
            path = path[m.end():]
            cur = cur.get(key) if isinstance(cur, dict) else None
        elif m := _FILTER_RE.match(path):
            field, want = m.groups()
            path = path[m.end():]
            if not isinstance(cur, list):
                return None
            cur = next((e for e in cur if isinstance(e, dict) and str(jsonpath(e, "." + field)) == want), None)
        elif m := re.match(r"^\[(\d+)\]", path):
            path = path[m.end():]
            idx = int(m.group(1))
            cur = cur[idx] if isinstance(cur, list) and idx < len(cur) else None
        elif m := re.match(r"^\['([^']*)'\]", path):
            path = path[m.end():]
            cur = cur.get(m.group(1)) if isinstance(cur, dict) else None
        else:
            return None
        if cur is None:
            return None
    return cur


def _col(name, type_="string", fmt="", priority=0, desc=""):
    return {"name": name, "type": type_, "format": fmt, "description": desc or name, "priority": priority}


def _job_cells(o):
    st = o.get("status") or {}
    conds = {c["type"]: c["status"] for c in st.get("conditions") or []}
    status = ("Complete" if conds.get("Complete") == "True" else "Failed" if conds.get("Failed") == "True"
              else "Suspended" if conds.get("Suspended") == "True" else "Running")
    return [status, f"{st.get('succeeded', 0)}/{(o.get('spec') or {}).get('completions', 1)}",
            # a finished Job's duration stops at its completionTime, as kubectl prints it
            human_age(st.get("startTime"), st.get("completionTime")) if st.get("startTime") else ""]


def _pod_cells(o):
    st = o.get("status") or {}
    cs = st.get("containerStatuses") or []
    n = len((o.get("spec") or {}).get("containers") or [])
    ready = sum(1 for c in cs if c.get("ready"))
    phase = st.get("phase", "Pending")
    for c in cs:
        state = c.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason"):
            phase = state["waiting"]["reason"]
        elif "terminated" in state and state["terminated"].get("reason") and phase not in ("Succeeded",):
            phase = state["terminated"]["reason"]
    if o["metadata"].get("deletionTimestamp"):
        phase = "Terminating"
    return [f"{ready}/{n}", phase, sum(c.get("restartCount", 0) for c in cs)]


def _deploy_cells(o):
    st, spec = o.get("status") or {}, o.get("spec") or {}
    return [f"{st.get('readyReplicas', 0)}/{spec.get('replicas', 1)}", st.get("updatedReplicas", 0),
            st.get("availableReplicas", 0)]


def _svc_cells(o):
    spec = o.get("spec") or {}
    ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or []) or "<none>"
    return [spec.get("type", "ClusterIP"), spec.get("clusterIP", ""), "<none>", ports]


BUILTIN_COLUMNS = {
    ("", "pods"): ([_col("Ready"), _col("Status"), _col("Restarts", "string")], _pod_cells),
    ("batch", "jobs"): ([_col("Status"), _col("Completions"), _col("Duration")], _job_cells),
    ("apps", "deployments"): ([_col("Ready"), _col("Up-to-date", "integer"), _col("Available", "integer")],
                              _deploy_cells),
    ("", "services"): ([_col("Type"), _col("Cluster-IP"), _col("External-IP"), _col("Port(s)")], _svc_cells),
    ("", "configmaps"): ([_col("Data", "integer")], lambda o: [len(o.get("data") or {}) + len(o.get("binaryData") or {})]),
    ("", "namespaces"): ([_col("Status")], lambda o: [(o.get("status") or {}).get("phase", "")]),
}


def _format_cell(value, type_):
    if value is None:
        return None
    if type_ == "date":
        return human_age(value) if isinstance(value, str) else value
    if isinstance(value, (dict, list)):
        import json
        return json.dumps(value, separators=(",", ":"))
    return value


def to_table(rt, version, objects, list_meta, include_object="Metadata") -> dict:
    name_col = _col("Name", fmt="name", desc="Name must be unique within a namespace.")
    age_col = _col("Age", desc="CreationTimestamp is a timestamp representing the server time when this "
                               "object was created.")
    rows_extra = None
    if rt.is_custom:
        cols = rt.printer_columns.get(version) or []
        if not cols:
            cols = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        defs = [name_col] + [_col(c["name"], c.get("type", "string"), c.get("format", ""), c.get("priority", 0),
                                  c.get("description", "")) for c in cols]

        def cells(o):
            return [o["metadata"]["name"]] + [_format_cell(jsonpath(o, c["jsonPath"]), c.get("type", "string"))
                                              for c in cols]
    else:
        extra_cols, rows_extra = BUILTIN_COLUMNS.get(rt.key, ([], None))
        defs = [name_col] + extra_cols + [age_col]

        def cells(o):
            mid = rows_extra(o) if rows_extra else []
            return [o["metadata"]["name"]] + mid + [human_age(o["metadata"].get("creationTimestamp"))]

    rows = []
    for o in objects:
        row = {"cells": cells(o)}
        if include_object == "Object":
            row["object"] = o
        elif include_object != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": o["metadata"]}
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta, "columnDefinitions": defs,
            "rows": rows}
