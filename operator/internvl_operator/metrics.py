"""Prometheus metrics of the operator: reconciles, errors and latency per kind, custom resources by phase."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("internvl_operator_reconciles_total", "Reconcile runs.", ["kind"])
ERRORS = Counter("internvl_operator_reconcile_errors_total", "Reconciles that ended in an error, by reason.", ["kind", "error"])
LATENCY = Histogram(
    "internvl_operator_reconcile_seconds",
    "Time of one reconcile (API round trips included).",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RESOURCES = Gauge("internvl_operator_resources", "Custom resources by phase.", ["kind", "phase"])

_lock = threading.Lock()
_phases: dict[tuple[str, str, str], str] = {}


def _publish() -> None:
    counts: dict[tuple[str, str], int] = {}
    for (kind, _, _), phase in _phases.items():
        counts[(kind, phase)] = counts.get((kind, phase), 0) + 1
    RESOURCES.clear()
    for (kind, phase), count in counts.items():
        RESOURCES.labels(kind=kind, phase=phase).set(count)


def record_phase(kind: str, namespace: str, name: str, phase: str) -> None:
    with _lock:
        _phases[(kind, namespace, name)] = phase
        _publish()


def forget(kind: str, namespace: str, name: str) -> None:
    with _lock:
        _phases.pop((kind, namespace, name), None)
        _publish()


def serve(port: int) -> None:
    """Expose /metrics on `port` in a background thread (0 = off)."""
    if port:
        start_http_server(port)
