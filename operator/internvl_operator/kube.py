"""The few Kubernetes API calls the handlers make, on the official `kubernetes` client, with dicts in and out.

Generic over kinds (path from apiVersion + kind), so builders' manifests go out exactly as built and
tests can point the same code at an in-process API (kmock) or a real cluster.
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import urlencode

import urllib3
from kubernetes import client as k8s

from . import constants as c
from .status import now_iso

PLURALS = {
    "Job": "jobs",
    "Pod": "pods",
    "Service": "services",
    "Deployment": "deployments",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Secret": "secrets",
    "ConfigMap": "configmaps",
    "Event": "events",
    c.FINETUNE_KIND: c.FINETUNE_PLURAL,
    c.SERVICE_KIND: c.SERVICE_PLURAL,
}


class ApiError(Exception):
    """A non-2xx answer; `status` is the HTTP code (0 = no answer at all)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message

    @property
    def transient(self) -> bool:
        # 409/422 are answers about the object; 429, 5xx and no answer are the API's state and pass.
        return self.status in (0, 408, 429) or self.status >= 500


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"


class Kube:
    def __init__(self, api_client: k8s.ApiClient, *, timeout: float = 30.0) -> None:
        self.api = api_client
        self.timeout = timeout

    # -- raw
    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: dict[str, Any] | None = None,
        content_type: str = "application/json",
        raw: bool = False,
    ) -> Any:
        if query:
            path = f"{path}?{urlencode(query)}"
        headers = {"Accept": "application/json, */*", "Content-Type": content_type}
        url = self.api.configuration.host + path
        headers.update(self.api.default_headers)
        self.api.update_params_for_auth(headers, None, ["BearerToken"], path, method, body)
        try:
            response = self.api.call_api(method, url, header_params=headers, body=body, _request_timeout=self.timeout)
            data = response.read()
        except k8s.ApiException as exc:  # raised for connection errors
            raise ApiError(exc.status or 0, str(exc.reason)) from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            # No answer: refused, reset, or read timed out (urllib3's errors are not OSErrors). Like a 5xx: retry.
            raise ApiError(0, str(exc)) from exc
        text = data.decode() if isinstance(data, bytes) else (data or "")
        if not 200 <= response.status < 300:
            try:
                message = json.loads(text).get("message", text)
            except ValueError:
                message = text
            raise ApiError(response.status, message)
        if raw:
            return text
        return json.loads(text) if text else {}

    # -- objects
    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", f"{collection_path(api_version, kind, namespace)}/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str, *, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        result = self._call("GET", collection_path(api_version, kind, namespace), query={"labelSelector": selector})
        items = result.get("items") or []
        # Some API emulators ignore labelSelector; filtering again costs nothing.
        return [i for i in items if all(((i.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in labels.items())]

    def create(self, manifest: dict[str, Any]) -> bool:
        """Create; False if it already exists (409): children have fixed names, so that means done."""
        meta = manifest["metadata"]
        path = collection_path(manifest["apiVersion"], manifest["kind"], meta["namespace"])
        try:
            self._call("POST", path, body=manifest)
            return True
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise

    def apply(self, manifest: dict[str, Any]) -> bool:
        """Create, or merge-patch an existing object to the manifest (lists are replaced whole). True if created."""
        if self.create(manifest):
            return True
        meta = manifest["metadata"]
        path = f"{collection_path(manifest['apiVersion'], manifest['kind'], meta['namespace'])}/{meta['name']}"
        body = {k: v for k, v in manifest.items() if k not in ("status",)}
        self._call("PATCH", path, body=body, content_type="application/merge-patch+json")
        return False

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete with its pods (Background propagation); False if it was not there."""
        path = f"{collection_path(api_version, kind, namespace)}/{name}"
        try:
            self._call("DELETE", path, body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        path = f"{collection_path(api_version, kind, namespace)}/{name}/status"
        self._call("PATCH", path, body={"status": status}, content_type="application/merge-patch+json")

    def pod_log(self, namespace: str, pod: str, *, tail_lines: int) -> str:
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/log"
        try:
            return self._call("GET", path, query={"tailLines": tail_lines}, raw=True)
        except ApiError as exc:
            if exc.status in (400, 404):  # container not started yet, or pod gone
                return ""
            raise

    def post_event(self, obj: dict[str, Any], *, event_type: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        now = now_iso()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            # A client-chosen unique name (as client-go's recorder does) rather than generateName.
            "metadata": {"name": f"{meta['name'][:200]}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": c.MANAGED_BY},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": c.MANAGED_BY,
        }
        self.create(event)
