"""How the process kubelet turns one Pod into one local process.

Path mapping: every volumeMount's mountPath is mapped to a host directory (PVC claim -> a per-claim
dir, emptyDir -> a per-pod dir, configMap/secret -> files written to a per-pod dir, hostPath -> the
same path). Strings in command, args, env values and configMap/secret file contents are rewritten:
a mountPath (or a path under it) becomes the host path. The map is also given to the process as JSON
in `KUBELET_PATH_MAP` ({mountPath: hostDir}) for paths it builds itself.

Port mapping: each declared containerPort gets a free loopback port. The process sees it as `PORT`
(the first declared port) and `KUBELET_PORT_<containerPort>`; args/env tokens equal to the
containerPort number (`8080`, `--port=8080`, `0.0.0.0:8080`) are rewritten to the host port.
Hostnames ending in `.svc` or `.svc.cluster.local` are rewritten to 127.0.0.1.
`$(VAR)` references in command/args/env are expanded from the container's env, as Kubernetes does.
"""
from __future__ import annotations

import base64
import json
import os
import re
import socket
import sys
from dataclasses import dataclass, field


class PodConfigError(Exception):
    """The pod cannot start yet (missing ConfigMap/Secret/PVC key): the reason and message."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Mapping:
    paths: list[tuple[str, str]] = field(default_factory=list)  # (mountPath, hostDir), longest first
    ports: dict[int, int] = field(default_factory=dict)  # containerPort -> host port

    def rewrite(self, text: str) -> str:
        if not isinstance(text, str):
            return text
        for mount, host in self.paths:
            text = re.sub(r"(?<![\w.\-/])" + re.escape(mount.rstrip("/")) + r"(?=/|$|[^\w.\-])",
                          lambda m, h=host: h, text)
        text = re.sub(r"\b[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.svc(\.cluster\.local)?\b", "127.0.0.1", text)
        for cport, hport in self.ports.items():
            text = re.sub(rf"(^|[=:]){cport}$", lambda m, h=hport: m.group(1) + str(h), text)
        return text


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion; $$(VAR) escapes; unknown refs are left as they are."""
    if not isinstance(text, str):
        return text
    out = _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text.replace("$$(", "\x00"))
    return out.replace("\x00", "$(")


def field_ref(pod: dict, path: str) -> str:
    meta = pod["metadata"]
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path):
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta.get("namespace", ""),
              "metadata.uid": meta.get("uid", ""), "spec.nodeName": pod["spec"].get("nodeName", ""),
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
              "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1", "status.podIPs": "127.0.0.1"}
    if path not in simple:
        raise PodConfigError("CreateContainerConfigError", f"unsupported fieldRef {path!r}")
    return simple[path]


def resource_ref(container: dict, ref: dict) -> str:
    res = ref.get("resource", "")
    kind, _, name = res.partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(name)
    return str(value) if value is not None else ("0" if kind == "requests" else str(os.cpu_count() or 1))


def resolve_env(pod: dict, container: dict, lookup) -> dict:
    """The container's env as Kubernetes builds it: envFrom first, then env in order."""
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            ref = src["configMapRef"]
            data = _source(lookup, "configmaps", ref.get("name"), ref.get("optional"), pod)
            env.update({prefix + k: v for k, v in (data or {}).items()})
        if "secretRef" in src:
            ref = src["secretRef"]
            data = _source(lookup, "secrets", ref.get("name"), ref.get("optional"), pod)
            env.update({prefix + k: v for k, v in (data or {}).items()})
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        vf = item.get("valueFrom") or {}
        if "fieldRef" in vf:
            env[name] = field_ref(pod, vf["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in vf:
            env[name] = resource_ref(container, vf["resourceFieldRef"])
        elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
            plural = "configmaps" if "configMapKeyRef" in vf else "secrets"
            ref = vf.get("configMapKeyRef") or vf.get("secretKeyRef")
            data = _source(lookup, plural, ref.get("name"), ref.get("optional"), pod)
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise PodConfigError("CreateContainerConfigError",
                                     f"couldn't find key {ref['key']} in {plural[:-1]} "
                                     f"{pod['metadata'].get('namespace')}/{ref.get('name')}")
            env[name] = data[ref["key"]]
        else:
            env[name] = ""
    return env


def _source(lookup, plural, name, optional, pod):
    """ConfigMap data or decoded Secret data; None when optional and absent."""
    obj = lookup(plural, name)
    if obj is None:
        if optional:
            return None
        raise PodConfigError("CreateContainerConfigError", f'{plural[:-1]} "{name}" not found')
    if plural == "secrets":
        data = {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        data.update(obj.get("stringData") or {})
        return data
    return dict(obj.get("data") or {})


def prepare_volumes(pod: dict, pod_dir: str, pvc_dir_for, lookup, rewrite) -> dict[str, str]:
    """volume name -> host dir, writing configMap/secret files (their text contents path-rewritten)."""
    out = {}
    for vol in pod["spec"].get("volumes") or []:
        name = vol["name"]
        if "persistentVolumeClaim" in vol:
            out[name] = pvc_dir_for(vol["persistentVolumeClaim"]["claimName"])
        elif "hostPath" in vol:
            out[name] = vol["hostPath"]["path"]
        elif "configMap" in vol or "secret" in vol:
            plural = "configmaps" if "configMap" in vol else "secrets"
            ref = vol.get("configMap") or vol.get("secret")
            ref_name = ref.get("name") or ref.get("secretName")
            data = _source(lookup, plural, ref_name, ref.get("optional"), pod) or {}
            target = os.path.join(pod_dir, "volumes", name)
            os.makedirs(target, exist_ok=True)
            items = ref.get("items") or [{"key": k, "path": k} for k in data]
            for it in items:
                if it["key"] not in data:
                    raise PodConfigError("CreateContainerConfigError",
                                         f'key "{it["key"]}" not found in {plural[:-1]} "{ref_name}"')
                path = os.path.join(target, it["path"])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as fh:
                    fh.write(data[it["key"]])
            out[name] = target
        else:  # emptyDir and everything else we do not model: a fresh per-pod directory
            target = os.path.join(pod_dir, "volumes", name)
            os.makedirs(target, exist_ok=True)
            out[name] = target
    return out


def rewrite_config_files(volume_dirs: dict, pod: dict, mapping: Mapping) -> None:
    """Rewrite mount paths inside configMap/secret files (e.g. a YAML config naming /data/x)."""
    for vol in pod["spec"].get("volumes") or []:
        if "configMap" in vol or "secret" in vol:
            root = volume_dirs[vol["name"]]
            for dirpath, _, files in os.walk(root):
                for f in files:
                    p = os.path.join(dirpath, f)
                    try:
                        text = open(p).read()
                    except UnicodeDecodeError:
                        continue
                    new = "\n".join(mapping.rewrite(line) for line in text.split("\n"))
                    if new != text:
                        open(p, "w").write(new)


def build_mapping(container: dict, volume_dirs: dict) -> Mapping:
    mapping = Mapping()
    for m in container.get("volumeMounts") or []:
        host = volume_dirs.get(m["name"])
        if host is None:
            raise PodConfigError("CreateContainerConfigError", f'volume "{m["name"]}" not found')
        if m.get("subPath"):
            host = os.path.join(host, m["subPath"])
            os.makedirs(host, exist_ok=True) if not os.path.splitext(host)[1] else None
        mapping.paths.append((m["mountPath"], host))
    mapping.paths.sort(key=lambda p: -len(p[0]))
    for p in container.get("ports") or []:
        mapping.ports[int(p["containerPort"])] = free_port()
    return mapping


def process_env(pod: dict, container: dict, env: dict, mapping: Mapping, pod_dir: str, extra_env: dict) -> dict:
    """The process environment: a small base (no host leakage beyond PATH and PYTHONPATH), the
    kubelet's extras, then the container's own env with paths and ports rewritten."""
    base = {
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.path.join(pod_dir, "home"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"],
        "TMPDIR": os.path.join(pod_dir, "tmp"),
        "KUBELET_PATH_MAP": json.dumps(dict(mapping.paths)),
    }
    if os.environ.get("PYTHONPATH"):
        base["PYTHONPATH"] = os.environ["PYTHONPATH"]
    os.makedirs(base["HOME"], exist_ok=True)
    os.makedirs(base["TMPDIR"], exist_ok=True)
    base.update(extra_env or {})
    ports = container.get("ports") or []
    if ports:
        base["PORT"] = str(mapping.ports[int(ports[0]["containerPort"])])
    for cport, hport in mapping.ports.items():
        base[f"KUBELET_PORT_{cport}"] = str(hport)
    for k, v in env.items():
        base[k] = mapping.rewrite(v)
    return base


def argv_for(container: dict, env: dict, mapping: Mapping, image_commands: dict) -> list[str]:
    command = container.get("command") or image_commands.get(container.get("image", "")) or []
    if not command:
        raise PodConfigError("CreateContainerError", "the process kubelet needs an explicit command (or the "
                             f"image {container.get('image')!r} in image_commands)")
    return [mapping.rewrite(expand(str(a), env)) for a in list(command) + list(container.get("args") or [])]
