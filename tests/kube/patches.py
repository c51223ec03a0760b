"""The PATCH flavours a Kubernetes API server accepts, on plain JSON data.

- JSON merge patch (RFC 7386): `application/merge-patch+json`.
- JSON patch (RFC 6902) with `test`: `application/json-patch+json`; a failed `test` is a 422.
- Strategic merge patch: `application/strategic-merge-patch+json`, for built-in kinds only. Lists
  named in MERGE_KEYS merge element-wise by their key; other lists are replaced. The directives
  kubectl sends (`$patch`, `$retainKeys`, `$setElementOrder/...`, `$deleteFromPrimitiveList/...`)
  are honoured.
"""
from __future__ import annotations

import copy

# list field name -> merge key (the patchMergeKey of the Go types we touch)
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath",
    "ports": "containerPort", "imagePullSecrets": "name", "hostAliases": "ip",
    "ownerReferences": "uid", "conditions": "type", "topologySpreadConstraints": "topologyKey",
}
# (kind, field) overrides: a Service's ports merge by `port`, not `containerPort`
KIND_MERGE_KEYS = {("Service", "ports"): "port"}
# primitive lists merged as sets
PRIMITIVE_MERGE = {"finalizers"}


class PatchError(Exception):
    """Malformed patch (422)."""


class PatchTestFailed(PatchError):
    """A json-patch `test` op did not match (422)."""


def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# ---- JSON patch -------------------------------------------------------------------------------

def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _walk(doc, pointer: str):
    """Return (parent, last_token) for a JSON pointer."""
    if pointer == "":
        return None, None
    if not pointer.startswith("/"):
        raise PatchError(f"invalid JSON pointer {pointer!r}")
    tokens = [_unescape(t) for t in pointer[1:].split("/")]
    cur = doc
    for tok in tokens[:-1]:
        if isinstance(cur, list):
            try:
                cur = cur[int(tok)]
            except (ValueError, IndexError):
                raise PatchError(f"path {pointer!r} not found")
        elif isinstance(cur, dict) and tok in cur:
            cur = cur[tok]
        else:
            raise PatchError(f"path {pointer!r} not found")
    return cur, tokens[-1]


def _get(doc, pointer):
    parent, tok = _walk(doc, pointer)
    if parent is None:
        return doc
    if isinstance(parent, list):
        try:
            return parent[int(tok)]
        except (ValueError, IndexError):
            raise PatchError(f"path {pointer!r} not found")
    if not isinstance(parent, dict) or tok not in parent:
        raise PatchError(f"path {pointer!r} not found")
    return parent[tok]


def _add(doc, pointer, value):
    parent, tok = _walk(doc, pointer)
    if parent is None:
        return value
    if isinstance(parent, list):
        idx = len(parent) if tok == "-" else int(tok)
        if idx > len(parent):
            raise PatchError(f"index out of range in {pointer!r}")
        parent.insert(idx, value)
    elif isinstance(parent, dict):
        parent[tok] = value
    else:
        raise PatchError(f"cannot add at {pointer!r}")
    return doc


def _remove(doc, pointer):
    parent, tok = _walk(doc, pointer)
    if isinstance(parent, list):
        try:
            return parent.pop(int(tok))
        except (ValueError, IndexError):
            raise PatchError(f"path {pointer!r} not found")
    if not isinstance(parent, dict) or tok not in parent:
        raise PatchError(f"unable to remove nonexistent key {pointer!r}")
    return parent.pop(tok)


def json_patch(doc, ops):
    if not isinstance(ops, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)  # must exist
            _remove(doc, path) if path else None
            doc = _add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "move":
            value = _remove(doc, op["from"])
            doc = _add(doc, path, value)
        elif kind == "copy":
            doc = _add(doc, path, copy.deepcopy(_get(doc, op["from"])))
        elif kind == "test":
            try:
                actual = _get(doc, path)
            except PatchError:
                raise PatchTestFailed(f"testing value {path} failed: path not found")
            if actual != op.get("value"):
                raise PatchTestFailed(f"testing value {path} failed: {actual!r} != {op.get('value')!r}")
        else:
            raise PatchError(f"unknown JSON patch operation {kind!r}")
    return doc


# ---- strategic merge patch ----------------------------------------------------------------------

def _merge_key(kind: str, field: str) -> str | None:
    return KIND_MERGE_KEYS.get((kind, field), MERGE_KEYS.get(field))


def strategic_merge(original, patch, kind: str = ""):
    if not isinstance(patch, dict) or not isinstance(original, dict):
        return _strip_directives(copy.deepcopy(patch))
    if patch.get("$patch") == "replace":
        return _strip_directives({k: v for k, v in patch.items() if k != "$patch"})
    if patch.get("$patch") == "delete":
        return None
    result = copy.deepcopy(original)
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [x for x in result.get(field) or [] if x not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = strategic_merge(result.get(key) if isinstance(result.get(key), dict) else {}, value, kind)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = _merge_list(result.get(key), value, key, kind)
        else:
            result[key] = value
    if retain is not None:
        result = {k: v for k, v in result.items() if k in retain}
    for key in [k for k in patch if k.startswith("$setElementOrder/")]:
        field = key.split("/", 1)[1]
        mk = _merge_key(kind, field)
        if mk and isinstance(result.get(field), list):
            wanted = [e.get(mk) for e in patch[key] if isinstance(e, dict)]
            rank = {v: i for i, v in enumerate(wanted)}
            result[field] = sorted(result[field], key=lambda e: rank.get(e.get(mk) if isinstance(e, dict) else None,
                                                                         len(rank)))
    return result


def _merge_list(original, patch_list, field, kind):
    original = original if isinstance(original, list) else []
    if field in PRIMITIVE_MERGE:
        out = list(original)
        out += [x for x in patch_list if x not in out]
        return out
    mk = _merge_key(kind, field)
    if not mk or not all(isinstance(e, dict) for e in patch_list):
        return _strip_directives(copy.deepcopy(patch_list))
    if any(e.get("$patch") == "replace" for e in patch_list):
        return _strip_directives([e for e in patch_list if e.get("$patch") != "replace"])
    out = copy.deepcopy(original)
    for item in patch_list:
        key = item.get(mk)
        idx = next((i for i, e in enumerate(out) if isinstance(e, dict) and e.get(mk) == key), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
            continue
        if idx is None:
            out.append(_strip_directives(copy.deepcopy(item)))
        else:
            out[idx] = strategic_merge(out[idx], item, kind)
    return out


def _strip_directives(value):
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


# ---- server-side apply ------------------------------------------------------------------------

def leaf_paths(value, prefix=()) -> set[tuple]:
    """The set of paths to leaves (dict keys; list elements with a merge key by that key)."""
    out = set()
    if isinstance(value, dict):
        for k, v in value.items():
            sub = leaf_paths(v, prefix + (k,))
            out |= sub or {prefix + (k,)}
    else:
        out.add(prefix)
    return out


def remove_path(obj: dict, path: tuple) -> None:
    cur = obj
    for part in path[:-1]:
        if not isinstance(cur, dict) or part not in cur:
            return
        cur = cur[part]
    if isinstance(cur, dict):
        cur.pop(path[-1], None)


def fields_v1(value) -> dict:
    """A FieldsV1-shaped summary of the fields an apply set (maps as `f:<name>`, lists atomic)."""
    if isinstance(value, dict):
        return {f"f:{k}": fields_v1(v) for k, v in value.items()}
    return {}
