"""Reading children into facts a user can act on: conditions, Job outcome, pod failure reasons, worker progress.

All functions are pure: they take the API objects (dicts, as the API server returns them) or log text.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from . import constants as c

# --------------------------------------------------------------------------- conditions


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def get_condition(conditions: list[dict[str, Any]] | None, cond_type: str) -> dict[str, Any] | None:
    return next((cond for cond in conditions or [] if cond.get("type") == cond_type), None)


def condition_is_true(conditions: list[dict[str, Any]] | None, cond_type: str) -> bool:
    cond = get_condition(conditions, cond_type)
    return bool(cond and cond.get("status") == "True")


def set_condition(
    conditions: list[dict[str, Any]] | None,
    cond_type: str,
    *,
    status: bool | str,
    reason: str,
    message: str = "",
    now: str,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """Return a new list with `cond_type` set; lastTransitionTime moves only when the status flips."""
    status_text = status if isinstance(status, str) else ("True" if status else "False")
    old = get_condition(conditions, cond_type)
    changed = old is None or old.get("status") != status_text
    new = {
        "type": cond_type,
        "status": status_text,
        "reason": reason,
        "message": message[:4096],
        "lastTransitionTime": now if changed else old.get("lastTransitionTime", now),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    out = [dict(cond) for cond in conditions or [] if cond.get("type") != cond_type]
    out.append(new)
    return out


def remove_condition(conditions: list[dict[str, Any]] | None, cond_type: str) -> list[dict[str, Any]]:
    return [dict(cond) for cond in conditions or [] if cond.get("type") != cond_type]


# --------------------------------------------------------------------------- Jobs


@dataclass(frozen=True)
class JobState:
    """What one child Job is doing. `exists=False` means it has not been created (or was deleted)."""

    name: str
    exists: bool = False
    active: int = 0
    succeeded: bool = False
    failed: bool = False
    reason: str = ""
    message: str = ""
    generation_label: int | None = None
    failed_pods: int = 0

    @property
    def running(self) -> bool:
        return self.exists and not self.succeeded and not self.failed


def observe_job(name: str, job: dict[str, Any] | None) -> JobState:
    if job is None:
        return JobState(name=name)
    status = job.get("status") or {}
    conditions = status.get("conditions") or []
    # Complete/Failed are final; SuccessCriteriaMet/FailureTarget (1.31+) come first, while pods terminate.
    succeeded = any(cd.get("status") == "True" and cd.get("type") in ("Complete", "SuccessCriteriaMet") for cd in conditions)
    failed_cond = next(
        (cd for cd in conditions if cd.get("status") == "True" and cd.get("type") in ("Failed", "FailureTarget")), None
    )
    labels = (job.get("metadata") or {}).get("labels") or {}
    generation = labels.get(f"{c.GROUP}/generation")
    return JobState(
        name=name,
        exists=True,
        active=int(status.get("active") or 0),
        succeeded=succeeded,
        failed=failed_cond is not None and not succeeded,
        reason=(failed_cond or {}).get("reason", ""),
        message=(failed_cond or {}).get("message", ""),
        generation_label=int(generation) if generation and generation.isdigit() else None,
        failed_pods=int(status.get("failed") or 0),
    )


# --------------------------------------------------------------------------- pods


@dataclass(frozen=True)
class PodFailure:
    reason: str
    message: str = ""
    exit_code: int | None = None
    pod: str | None = None
    container: str | None = None
    # Ranked so the most useful of several failures wins (OOMKilled says more than a generic Error).
    rank: int = field(default=0, compare=False)

    def to_status(self, log_tail: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason, "message": self.message[:4096]}
        if self.exit_code is not None:
            out["exitCode"] = self.exit_code
        if self.pod:
            out["pod"] = self.pod
        if self.container:
            out["container"] = self.container
        if log_tail:
            out["logTail"] = log_tail
        return out

    def summary(self) -> str:
        code = f" (exit code {self.exit_code})" if self.exit_code is not None else ""
        where = f" in pod {self.pod}" if self.pod else ""
        text = f"{self.reason}{code}{where}"
        return f"{text}: {self.message}" if self.message else text


# Waiting reasons that mean "this pod will not start without a fix".
_STUCK_WAITING = {
    "ImagePullBackOff": 90,
    "ErrImagePull": 90,
    "InvalidImageName": 90,
    "CreateContainerConfigError": 85,
    "CreateContainerError": 85,
    "CrashLoopBackOff": 60,
}


def _terminated_failure(pod: str, container: str, term: dict[str, Any]) -> PodFailure | None:
    exit_code = term.get("exitCode")
    reason = term.get("reason") or "Error"
    if reason == "Completed" or exit_code == 0:
        return None
    if reason == "OOMKilled":
        message = "the container ran out of memory (raise resources.limits.memory, or lower batchSize/maxLength)"
        return PodFailure("OOMKilled", message, exit_code, pod, container, rank=100)
    return PodFailure(reason, _worker_error(term.get("message") or ""), exit_code, pod, container, rank=50)


def _worker_error(message: str) -> str:
    """A termination message, or from a worker's log tail (FallbackToLogsOnError) its last `internvl: error:`
    line, the one that says what to change."""
    errors = [line for line in message.strip().splitlines() if line.startswith("internvl: error:")]
    return errors[-1] if errors else message.strip()


def pod_failure(pod: dict[str, Any]) -> PodFailure | None:
    """The reason one pod is failing or cannot start, or None if it looks healthy."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    name = meta.get("name")
    if status.get("reason") == "Evicted":
        return PodFailure("Evicted", status.get("message", ""), None, name, None, rank=70)
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            return PodFailure("Unschedulable", cond.get("message", ""), None, name, None, rank=80)
    best: PodFailure | None = None
    statuses = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
    for cs in statuses:
        state = cs.get("state") or {}
        candidates: list[PodFailure | None] = []
        waiting = state.get("waiting") or {}
        last = (cs.get("lastState") or {}).get("terminated")
        if waiting.get("reason") == "CrashLoopBackOff" and last:
            # CrashLoopBackOff hides why it crashed; the last termination says (OOMKilled, exit code, message).
            crashed = _terminated_failure(name, cs.get("name"), last)
            if crashed is not None and crashed.reason == "OOMKilled":
                candidates.append(crashed)
            else:
                detail = f"last exit: {last.get('reason') or 'Error'}" + (f": {last['message'].strip()}" if last.get("message") else "")
                candidates.append(
                    PodFailure("CrashLoopBackOff", detail, last.get("exitCode"), name, cs.get("name"), rank=_STUCK_WAITING["CrashLoopBackOff"])
                )
        elif "running" in state and last and cs.get("ready") is False:
            # Restarted after a crash and not ready yet (a server reloading its model): the backoff is over, so
            # the waiting reason is gone, but the replica is still down because of that crash. Say so.
            crashed = _terminated_failure(name, cs.get("name"), last)
            if crashed is not None:
                note = f"restarted {cs.get('restartCount', 0)} time(s), not ready yet; "
                candidates.append(replace(crashed, message=note + (crashed.message or f"last exit: {crashed.reason}")))
        elif waiting.get("reason") in _STUCK_WAITING:
            candidates.append(
                PodFailure(waiting["reason"], waiting.get("message", ""), None, name, cs.get("name"), rank=_STUCK_WAITING[waiting["reason"]])
            )
        if "terminated" in state:
            candidates.append(_terminated_failure(name, cs.get("name"), state["terminated"]))
        for cand in candidates:
            if cand is not None and (best is None or cand.rank > best.rank):
                best = cand
    return best


def worst_pod_failure(pods: list[dict[str, Any]]) -> PodFailure | None:
    failures = [f for f in (pod_failure(p) for p in pods) if f is not None]
    return max(failures, key=lambda f: f.rank) if failures else None


def completion_index(pod: dict[str, Any]) -> int | None:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(c.ANNOTATION_COMPLETION_INDEX)
    return int(value) if value is not None and str(value).isdigit() else None


def newest_pod(pods: list[dict[str, Any]], *, index: int | None = None) -> dict[str, Any] | None:
    """The latest pod (of one completion index): after a retry that is the one that matters."""
    chosen = [p for p in pods if index is None or completion_index(p) in (index, None)]
    if not chosen:
        return None
    return max(chosen, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")


# --------------------------------------------------------------------------- logs

_TOKEN_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{20,}"),  # Hugging Face tokens
    re.compile(r"(?i)(authorization:\s*bearer\s+)\S+"),
    re.compile(r"(?i)((?:api[_-]?key|token|password|secret)\s*[=:]\s*)\S+"),
]


def redact(text: str) -> str:
    """Hide anything that looks like a credential: log tails end up in status and Events."""
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "***", text)
    return text


def log_tail(text: str, *, lines: int = 10, max_chars: int = c.MAX_STATUS_LOG_CHARS) -> str:
    tail = "\n".join(text.rstrip("\n").splitlines()[-lines:])
    return redact(tail)[-max_chars:]


@dataclass(frozen=True)
class WorkerProgress:
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    epoch: float | None = None
    learning_rate: float | None = None
    samples_per_second: float | None = None
    tokens_per_second: float | None = None
    checkpoint: str | None = None  # the newest {"event": "checkpoint"} path, or the {"event": "done"} one

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in (
            ("step", self.step),
            ("totalSteps", self.total_steps),
            ("loss", self.loss),
            ("epoch", self.epoch),
            ("learningRate", self.learning_rate),
            ("samplesPerSecond", self.samples_per_second),
            ("tokensPerSecond", self.tokens_per_second),
        ):
            if value is not None:
                out[key] = value
        if self.step is not None:
            out["summary"] = f"{self.step}/{self.total_steps}" if self.total_steps else str(self.step)
        return out


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if kind is float and value != value:  # NaN cannot be stored in JSON status
        return None
    return kind(value)


def parse_worker_log(text: str) -> WorkerProgress:
    """The last progress line and the done line of the worker's JSON stdout (other lines are ignored)."""
    progress: dict[str, Any] = {}
    checkpoint = None
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        if event.get("event") == "progress" and _number(event.get("step"), int) is not None:
            progress = event
        elif event.get("event") == "checkpoint" and isinstance(event.get("path"), str):
            checkpoint = event["path"]  # printed at every save: status shows the newest while training
        elif event.get("event") == "done" and isinstance(event.get("checkpoint"), str):
            checkpoint = event["checkpoint"]
    return WorkerProgress(
        step=_number(progress.get("step"), int),
        total_steps=_number(progress.get("total_steps"), int),
        loss=_number(progress.get("loss"), float),
        epoch=_number(progress.get("epoch"), float),
        learning_rate=_number(progress.get("lr"), float),
        samples_per_second=_number(progress.get("samples_per_s"), float),
        tokens_per_second=_number(progress.get("tokens_per_s"), float),
        checkpoint=checkpoint,
    )


_BAD_ROW = re.compile(r"^(?P<file>[^\s:]+):(?P<line>\d+): (?P<reason>.+)$")


def bad_rows(text: str, *, limit: int = 10) -> list[str]:
    """`FILE:LINE: reason` lines printed by `internvl data check` (the first `limit`)."""
    rows = [line.strip() for line in text.splitlines() if _BAD_ROW.match(line.strip())]
    return rows[:limit]


def relative_to_output(path: str) -> str:
    """/output/x/checkpoint-100 -> x/checkpoint-100 (paths in status are relative to the output PVC)."""
    prefix = c.OUTPUT_MOUNT.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")


def checkpoint_path(run_dir: str, printed: str) -> str:
    """The PVC-relative path of a checkpoint the worker printed.

    The worker writes checkpoints directly under its --output_dir (= /output/<run dir>), so the
    directory name is all that matters; the printed prefix depends on how the volume is mounted
    (/output/... in a pod, a host path under a process kubelet, a relative path if run by hand).
    """
    name = printed.rstrip("/").rsplit("/", 1)[-1]
    if _CHECKPOINT_DIR.match(name):
        return f"{run_dir}/{name}"
    return relative_to_output(printed)
