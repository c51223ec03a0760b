"""The decision part of reconciling: observed state in, a plan (children to create/delete, new status, Events) out.

Pure functions, no API calls: handlers.py observes the cluster, calls `plan_finetune` / `plan_service`,
and applies the plan. The fine-tune pipeline is a chain of stages; each reconcile advances it by at
most one stage and is safe to repeat (children have fixed names, creates are idempotent).

    datacheck Job (CPU) -> training Job (+ headless Service for > 1 node) -> merge Job (LoRA) -> InternVLService

Phases: Validating -> Training -> Merging -> (Serving: the InternVLService is starting) -> Succeeded, once
the model is written and, with `serve`, a replica of its service is ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import api, builders, constants as c, status as st
from .settings import OperatorSettings


@dataclass(frozen=True)
class ChildRef:
    api_version: str
    kind: str
    name: str


@dataclass
class Plan:
    status: dict[str, Any]
    creates: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)  # create, or patch if it exists
    deletes: list[ChildRef] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


@dataclass
class StageObservation:
    job: st.JobState
    pods: list[dict[str, Any]] = field(default_factory=list)
    log: str = ""  # recent lines of the most relevant pod (index 0 for training)


@dataclass
class FineTuneObservation:
    datacheck: StageObservation
    train: StageObservation
    merge: StageObservation
    service: dict[str, Any] | None = None  # the InternVLService this fine-tune created


def job_ref(name: str) -> ChildRef:
    return ChildRef("batch/v1", "Job", name)


# --------------------------------------------------------------------------- fine-tune


class _Status:
    """Mutable working copy of a fine-tune's status while planning."""

    def __init__(self, ft: api.InternVLFineTune, now: str) -> None:
        self.data = ft.status.model_dump(by_alias=True, exclude_none=True)
        self.now = now
        self.generation = ft.metadata.generation

    def condition(self, cond_type: str, ok: bool | str, reason: str, message: str = "") -> None:
        self.data["conditions"] = st.set_condition(
            self.data.get("conditions"), cond_type, status=ok, reason=reason, message=message,
            now=self.now, generation=self.generation,
        )  # fmt: skip

    def is_true(self, cond_type: str) -> bool:
        return st.condition_is_true(self.data.get("conditions"), cond_type)

    def phase(self, phase: str, message: str) -> None:
        self.data["phase"] = phase
        self.data["message"] = message

    def failure(self, failure: st.PodFailure | None, log: str = "") -> None:
        if failure is None:
            self.data.pop("failure", None)
        else:
            self.data["failure"] = failure.to_status(st.log_tail(log) if log else None)

    def outputs(self, **values: str | None) -> None:
        outputs = self.data.setdefault("outputs", {})
        outputs.update({k: v for k, v in values.items() if v is not None})


# Failed for a reason the cluster can fix without a spec change (a PVC created later, an upstream
# fine-tune re-run): keep checking instead of treating the failure as final.
RECOVERABLE_REASONS = {"PVCNotFound", "ConfigMapNotFound", "UpstreamFailed"}


def is_final(status: dict[str, Any], generation: int | None) -> bool:
    """Failed or Succeeded for the current spec: nothing to do until the spec changes."""
    if status.get("phase") not in (c.PHASE_FAILED, c.PHASE_SUCCEEDED) or status.get("observedGeneration") != generation:
        return False
    failed = st.get_condition(status.get("conditions"), c.COND_FAILED) or {}
    return failed.get("reason") not in RECOVERABLE_REASONS


def _stale_failed(job: st.JobState, generation: int | None) -> bool:
    """A failed Job made from an older spec: the user changed the CR to fix it, so run that stage again."""
    return job.failed and generation is not None and job.generation_label is not None and job.generation_label < generation


def _fail_stage(s, stage: str, condition: str, observed, failure, *, default_reason: str) -> None:
    """A stage's Job failed for good: its condition, Failed, the phase, and the pod's reason and log tail."""
    message = _failure_message(stage, observed.job, failure)
    reason = failure.reason if failure else (observed.job.reason or default_reason)
    s.condition(condition, False, reason, message)
    s.condition(c.COND_FAILED, True, reason, message)
    s.phase(c.PHASE_FAILED, message)
    s.failure(failure or st.PodFailure(reason, message), observed.log)


def _failure_message(stage: str, job: st.JobState, failure: st.PodFailure | None) -> str:
    parts = [f"{stage} failed"]
    if job.reason:
        parts.append(f"Job {job.name}: {job.reason}" + (f" ({job.message})" if job.message else ""))
    if failure is not None:
        parts.append(failure.summary())
    return "; ".join(parts)


def plan_finetune(
    ft: api.InternVLFineTune,
    obs: FineTuneObservation,
    *,
    settings: OperatorSettings,
    now: str,
) -> Plan:
    s = _Status(ft, now)
    plan = Plan(status=s.data)
    spec = ft.spec
    old_phase = ft.status.phase
    if is_final(s.data, ft.metadata.generation):
        # Final for this spec: keep the recorded reason even after TTL removed the pods it came from.
        return plan
    s.data["observedGeneration"] = ft.metadata.generation
    s.data["gpus"] = spec.world_size
    s.data.setdefault("startTime", now)
    run_dir = builders.run_directory(ft.name)
    s.outputs(claimName=spec.output.claim_name, directory=run_dir)
    s.condition(c.COND_SPEC_VALID, True, "Valid", "spec passed validation")

    _advance(ft, obs, s, plan, settings=settings)

    new_phase = s.data.get("phase")
    if new_phase != old_phase:
        event_type = "Warning" if new_phase == c.PHASE_FAILED else "Normal"
        plan.events.append((event_type, new_phase or "Unknown", s.data.get("message", "")))
    return plan


def _advance(
    ft: api.InternVLFineTune, obs: FineTuneObservation, s: _Status, plan: Plan, *, settings: OperatorSettings
) -> None:
    spec, gen = ft.spec, ft.metadata.generation
    pipeline_done = s.is_true(c.COND_COMPLETE)

    # Suspend applies while GPUs may still be needed; a finished pipeline has nothing to stop.
    if spec.suspend and not pipeline_done:
        if obs.train.job.running:
            plan.deletes.append(job_ref(obs.train.job.name))
        s.condition(
            c.COND_SUSPENDED, True, "SuspendedByUser",
            f"training pods deleted; checkpoints stay on PVC {spec.output.claim_name} under {builders.run_directory(ft.name)}/; "
            "set suspend: false to resume from the latest checkpoint",
        )  # fmt: skip
        s.phase(c.PHASE_SUSPENDED, "suspended by spec.suspend")
        return
    if s.is_true(c.COND_SUSPENDED):
        s.condition(c.COND_SUSPENDED, False, "Resumed", "resumed; training continues from the latest checkpoint")

    # ---- stage 1: data check (CPU)
    if not s.is_true(c.COND_DATASET_VALIDATED):
        dc = obs.datacheck
        if not dc.job.exists:
            plan.creates.append(builders.build_datacheck_job(ft, settings))
            s.condition(c.COND_DATASET_VALIDATED, "Unknown", "Checking", "data-check Job created")
            s.phase(c.PHASE_VALIDATING, "checking the dataset before any GPU is requested")
            s.failure(None)
            return
        if _stale_failed(dc.job, gen):
            plan.deletes.append(job_ref(dc.job.name))
            s.condition(c.COND_FAILED, False, "Restarting", "spec changed")
            s.phase(c.PHASE_PENDING, "spec changed after a failed data check; checking again")
            s.failure(None)
            return
        if dc.job.failed:
            rows = st.bad_rows(dc.log)
            failure = st.worst_pod_failure(dc.pods)
            if rows:
                message = f"{len(rows)}{'+' if len(rows) >= 10 else ''} bad row(s); fix them and re-apply: " + "; ".join(rows)
                reason = "BadRows"
            else:
                message = _failure_message("data check", dc.job, failure)
                reason = failure.reason if failure else (dc.job.reason or "DataCheckFailed")
            s.condition(c.COND_DATASET_VALIDATED, False, reason, message)
            s.condition(c.COND_FAILED, True, reason, message)
            s.phase(c.PHASE_FAILED, message)
            s.failure(failure or st.PodFailure(reason, message), dc.log)
            return
        if not dc.job.succeeded:
            failure = st.worst_pod_failure(dc.pods)
            s.phase(c.PHASE_VALIDATING, f"data check running; {failure.summary()}" if failure else "data check running")
            s.failure(failure)
            return
        s.condition(c.COND_DATASET_VALIDATED, True, "Valid", "every row passed `internvl data check`")

    # ---- stage 2: training (GPUs)
    if not s.is_true(c.COND_TRAINING):
        tr = obs.train
        progress = st.parse_worker_log(tr.log)
        if progress.step is not None:
            s.data["progress"] = progress.to_status()
        if progress.checkpoint:
            s.outputs(checkpointPath=st.checkpoint_path(builders.run_directory(ft.name), progress.checkpoint))
        if not tr.job.exists:
            if spec.nodes > 1:
                plan.creates.append(builders.build_rendezvous_service(ft))
            plan.creates.append(builders.build_train_job(ft, settings))
            where = f"{spec.world_size} GPU(s)" if spec.world_size else "CPU (gpusPerNode: 0)"
            s.condition(c.COND_TRAINING, "Unknown", "Started", f"training on {where}")
            per_node = f"{spec.gpus_per_node} GPU(s)" if spec.gpus_per_node else "CPU"
            s.phase(c.PHASE_TRAINING, f"training Job created ({spec.nodes} node(s) x {per_node})")
            s.failure(None)
            return
        if _stale_failed(tr.job, gen):
            plan.deletes.append(job_ref(tr.job.name))
            s.condition(c.COND_FAILED, False, "Restarting", "spec changed")
            s.phase(c.PHASE_PENDING, "spec changed after failed training; restarting from the latest checkpoint")
            s.failure(None)
            return
        failure = st.worst_pod_failure(tr.pods)
        if tr.job.failed:
            _fail_stage(s, "training", c.COND_TRAINING, tr, failure, default_reason="TrainingFailed")
            return
        if not tr.job.succeeded:
            summary = s.data.get("progress", {}).get("summary")
            text = f"training, step {summary}" if summary else "training"
            if failure is not None:
                # A failed pod of a running Job is being retried (resuming from the latest checkpoint).
                text += f"; {failure.summary()}"
            s.phase(c.PHASE_TRAINING, text)
            s.failure(failure, tr.log if failure else "")
            return
        s.condition(c.COND_TRAINING, True, "Completed", "training Job succeeded")
        s.failure(None)

    checkpoint = (s.data.get("outputs") or {}).get("checkpointPath")

    # ---- stage 3: merge (LoRA)
    if spec.effective_merge and not s.is_true(c.COND_MERGE):
        mg = obs.merge
        if not mg.job.exists:
            plan.creates.append(builders.build_merge_job(ft, settings))
            s.condition(c.COND_MERGE, "Unknown", "Started", "merging the LoRA adapter into the base model")
            s.phase(c.PHASE_MERGING, "merge Job created")
            return
        if _stale_failed(mg.job, gen):
            plan.deletes.append(job_ref(mg.job.name))
            s.condition(c.COND_FAILED, False, "Restarting", "spec changed")
            s.phase(c.PHASE_PENDING, "spec changed after a failed merge; merging again")
            s.failure(None)
            return
        failure = st.worst_pod_failure(mg.pods)
        if mg.job.failed:
            _fail_stage(s, "merge", c.COND_MERGE, mg, failure, default_reason="MergeFailed")
            return
        if not mg.job.succeeded:
            s.phase(c.PHASE_MERGING, f"merging; {failure.summary()}" if failure else "merging")
            s.failure(failure)
            return
        s.condition(c.COND_MERGE, True, "Completed", "merged model written")
        s.failure(None)

    # ---- outputs
    run_dir = builders.run_directory(ft.name)
    if spec.effective_merge:
        merged = f"{run_dir}/merged"
        s.outputs(mergedModelPath=merged, modelPath=merged, adapterPath=checkpoint)
    elif spec.method == "full":
        s.outputs(modelPath=checkpoint)
    else:
        s.outputs(adapterPath=checkpoint)
    if not pipeline_done:
        s.condition(c.COND_FAILED, False, "Succeeded", "")
        s.condition(c.COND_COMPLETE, True, "Completed", "fine-tune finished")
        s.data.setdefault("completionTime", s.now)

    # ---- stage 4: serve
    if spec.serve is None:
        s.phase(c.PHASE_SUCCEEDED, f"done; model at {spec.output.claim_name}:{(s.data.get('outputs') or {}).get('modelPath') or checkpoint}")
        return
    name = builders.service_cr_name(ft)
    s.data["serviceName"] = name
    if obs.service is None:
        try:
            plan.creates.append(builders.build_service_cr(ft, checkpoint_path=checkpoint))
        except ValueError as exc:
            s.condition(c.COND_SERVICE_CREATED, False, "NoCheckpoint", str(exc))
            s.phase(c.PHASE_FAILED, f"cannot serve: {exc}")
            return
        s.condition(c.COND_SERVICE_CREATED, True, "Created", f"InternVLService {name} created")
        s.phase(c.PHASE_SERVING, f"InternVLService {name} created")
        return
    svc_status = obs.service.get("status") or {}
    s.condition(c.COND_SERVICE_CREATED, True, "Created", f"InternVLService {name}")
    if svc_status.get("url"):
        s.data["url"] = svc_status["url"]
    ready = svc_status.get("readyReplicas") or 0
    if ready > 0 and svc_status.get("url"):
        # The fine-tune's work is done once its model answers; the InternVLService keeps its own status
        # (replicas, failures) from here on, and this CR stays Succeeded.
        s.phase(c.PHASE_SUCCEEDED, f"done; served by InternVLService {name} at {svc_status['url']}")
        return
    detail = svc_status.get("message") or "waiting for a replica to load the model"
    s.phase(c.PHASE_SERVING, f"starting InternVLService {name}: {detail}")


# --------------------------------------------------------------------------- service


@dataclass
class ServiceObservation:
    deployment: dict[str, Any] | None
    pods: list[dict[str, Any]] = field(default_factory=list)
    existing: set[str] = field(default_factory=set)  # kinds of children that exist: {"HorizontalPodAutoscaler", ...}


def describe_model(svc: api.InternVLService) -> str:
    model = svc.spec.model
    if model.pvc is not None:
        text = f"pvc://{model.pvc.claim_name}/{model.pvc.path}".rstrip("/")
    else:
        text = model.hub_id or ""
    if svc.spec.adapters:
        text += " + " + ",".join(a.name for a in svc.spec.adapters)
    return text


def plan_service(
    svc: api.InternVLService,
    obs: ServiceObservation,
    *,
    settings: OperatorSettings,
    now: str,
) -> Plan:
    data = svc.status.model_dump(by_alias=True, exclude_none=True)
    plan = Plan(status=data)
    old_phase = svc.status.phase
    gen = svc.metadata.generation
    name = builders.serving_name(svc.name)

    # Desired children are (re)applied on every reconcile: a model change updates the Deployment's
    # pod template and the Deployment rolls (maxUnavailable 0 keeps the old replica serving).
    plan.updates.extend(builders.build_serving_children(svc, settings))
    if svc.spec.autoscaling is None and "HorizontalPodAutoscaler" in obs.existing:
        plan.deletes.append(ChildRef("autoscaling/v2", "HorizontalPodAutoscaler", name))
    if svc.spec.disruption_budget is None and "PodDisruptionBudget" in obs.existing:
        plan.deletes.append(ChildRef("policy/v1", "PodDisruptionBudget", name))

    dep_status = (obs.deployment or {}).get("status") or {}
    ready = int(dep_status.get("readyReplicas") or 0)
    data.update(
        observedGeneration=gen,
        replicas=int(dep_status.get("replicas") or 0),
        readyReplicas=ready,
        url=builders.service_url(svc.name, svc.namespace, settings),
        model=describe_model(svc),
    )
    failure = st.worst_pod_failure(obs.pods)
    conditions = data.get("conditions")
    if ready > 0:
        phase, reason, message = c.PHASE_SERVING, "Ready", f"{ready} replica(s) ready"
        if failure is not None:
            message += f"; a replica is failing: {failure.summary()}"
    elif obs.deployment is not None and failure is not None:
        phase, reason, message = c.PHASE_FAILED, failure.reason, failure.summary()
    elif svc.spec.autoscaling is None and svc.spec.replicas == 0:
        phase, reason, message = c.PHASE_PENDING, "ScaledToZero", "replicas: 0"
    else:
        phase, reason, message = c.PHASE_PENDING, "Loading", "waiting for a replica to load the model and pass /ready"
    conditions = st.set_condition(conditions, c.COND_READY, status=ready > 0, reason=reason, message=message, now=now, generation=gen)
    data["conditions"] = conditions
    data["phase"] = phase
    data["message"] = message
    if failure is not None:
        data["failure"] = failure.to_status()
    else:
        data.pop("failure", None)
    if phase != old_phase:
        plan.events.append(("Warning" if phase == c.PHASE_FAILED else "Normal", phase, message))
    return plan


def waiting_plan(
    status: api.InternVLFineTuneStatus | api.InternVLServiceStatus,
    *,
    generation: int | None,
    phase: str,
    cond_type: str,
    reason: str,
    message: str,
    now: str,
) -> Plan:
    """A plan that only records why nothing can happen yet (missing PVC, fine-tune not finished, ...)."""
    data = status.model_dump(by_alias=True, exclude_none=True)
    data["conditions"] = st.set_condition(
        data.get("conditions"), cond_type, status=False, reason=reason, message=message, now=now, generation=generation
    )
    data.update(phase=phase, message=message, observedGeneration=generation)
    plan = Plan(status=data)
    if status.phase != phase:
        plan.events.append(("Warning" if phase == c.PHASE_FAILED else "Normal", reason, message))
    return plan
