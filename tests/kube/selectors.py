"""Label and field selectors, parsed the way the API server reads the `labelSelector` and
`fieldSelector` query parameters."""
from __future__ import annotations

import re

from .errors import bad_request

# key op value | key in (a,b) | key notin (a,b) | key | !key
_SET_RE = re.compile(r"^\s*([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_CMP_RE = re.compile(r"^\s*([^\s!=(),]+)\s*(==|!=|=)\s*([^\s!=(),]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(!?)\s*([^\s!=(),]+)\s*$")


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    terms, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        terms.append(cur)
    return [t for t in terms if t.strip()]


def parse_label_selector(text: str | None):
    """Return a predicate over a labels dict."""
    if not text:
        return lambda labels: True
    preds = []
    for term in _split_terms(text):
        if m := _SET_RE.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                preds.append(lambda l, k=key, vs=values: k in l and l[k] in vs)
            else:
                preds.append(lambda l, k=key, vs=values: k not in l or l[k] not in vs)
        elif m := _CMP_RE.match(term):
            key, op, value = m.groups()
            if op == "!=":
                preds.append(lambda l, k=key, v=value: l.get(k) != v)
            else:
                preds.append(lambda l, k=key, v=value: k in l and l[k] == v)
        elif m := _EXISTS_RE.match(term):
            neg, key = m.groups()
            preds.append((lambda l, k=key: k not in l) if neg else (lambda l, k=key: k in l))
        else:
            raise bad_request(f"unable to parse requirement: {term!r}")
    return lambda labels: all(p(labels or {}) for p in preds)


def selector_from_match(sel: dict | None) -> str:
    """A metav1.LabelSelector (matchLabels/matchExpressions) as selector text."""
    if not sel:
        return ""
    terms = [f"{k}={v}" for k, v in (sel.get("matchLabels") or {}).items()]
    for expr in sel.get("matchExpressions") or []:
        op, key, vals = expr["operator"], expr["key"], expr.get("values") or []
        if op == "In":
            terms.append(f"{key} in ({','.join(vals)})")
        elif op == "NotIn":
            terms.append(f"{key} notin ({','.join(vals)})")
        elif op == "Exists":
            terms.append(key)
        elif op == "DoesNotExist":
            terms.append(f"!{key}")
    return ",".join(terms)


def _field_value(obj: dict, path: str):
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return None if cur is None else str(cur)


def parse_field_selector(text: str | None):
    """Return a predicate over an object. Any dotted path is accepted (a real server allows only
    metadata.name, metadata.namespace and a few per-kind fields)."""
    if not text:
        return lambda obj: True
    preds = []
    for term in _split_terms(text):
        m = _CMP_RE.match(term)
        if not m:
            raise bad_request(f"invalid field selector: {term!r}")
        path, op, value = m.groups()
        if op == "!=":
            preds.append(lambda o, p=path, v=value: (_field_value(o, p) or "") != v)
        else:
            preds.append(lambda o, p=path, v=value: (_field_value(o, p) or "") == v)
    return lambda obj: all(p(obj) for p in preds)
