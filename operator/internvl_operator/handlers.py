"""Kopf handlers: parse -> check -> observe -> plan (reconcile.py, pure) -> apply -> record status and Events.

Each CR kind has one reconcile function, registered for create, resume (operator restart), update and
a polling timer (progress lines, pod failures and Job completion arrive without a CR change).
Exceptions carry the retry meaning: an invalid spec raises kopf.PermanentError after writing a Failed
condition that names the field; anything the cluster may fix by itself raises kopf.TemporaryError.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf
import pydantic

from . import api, builders, constants as c, metrics, reconcile, status as st
from .kube import ApiError, Kube
from .settings import OperatorSettings, load_settings

SETTINGS: OperatorSettings = load_settings()
_kube: Kube | None = None
log = logging.getLogger(__name__)

def configure(*, kube: Kube | None = None, settings: OperatorSettings | None = None) -> None:
    """Inject the API client and settings (tests; __main__ leaves the defaults)."""
    global _kube, SETTINGS
    if kube is not None:
        _kube = kube
    if settings is not None:
        SETTINGS = settings


def get_kube() -> Kube:
    global _kube
    if _kube is None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        _kube = Kube(client.ApiClient(), timeout=SETTINGS.api_timeout_s)
    return _kube


class Invalid(Exception):
    """The spec cannot work as written; the user must change it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


class Waiting(Exception):
    """Something outside the CR is missing or not ready yet; retry after `delay` seconds."""

    def __init__(self, reason: str, message: str, *, phase: str = c.PHASE_PENDING, delay: float = 30) -> None:
        super().__init__(message)
        self.reason, self.message, self.phase, self.delay = reason, message, phase, delay


# --------------------------------------------------------------------------- parsing


def describe_validation_error(exc: pydantic.ValidationError, *, root: str | None = "spec") -> str:
    """'spec.training.learningRate: Input should be greater than 0' for each error (field names as in YAML)."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-after")]
        path = ".".join([root, *loc] if root else loc)
        message = err["msg"].removeprefix("Value error, ")
        rule = api.RULES_BY_MESSAGE.get(message)
        if rule is not None and rule.field_path:
            loc.append(rule.field_path.lstrip("."))
        path = ".".join([root, *loc] if root else loc)
        lines.append(f"{path}: {message}")
    return "; ".join(lines)


def parse(model: type[api.InternVLFineTune] | type[api.InternVLService], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(
            {"metadata": dict(body.get("metadata") or {}), "spec": dict(body.get("spec") or {}), "status": dict(body.get("status") or {})}
        )
    except pydantic.ValidationError as exc:
        raise Invalid("InvalidSpec", describe_validation_error(exc, root=None)) from exc


def check_model_type(model_type: str | None, settings: OperatorSettings) -> None:
    if model_type and settings.strict_model_types and model_type not in c.KNOWN_MODEL_TYPES:
        close = [t for t in c.KNOWN_MODEL_TYPES if t.split("-")[0] == model_type.split("-")[0]][:6]
        hint = f" (did you mean one of {', '.join(close)}?)" if close else ""
        raise Invalid("UnknownModelType", f"spec.model.modelType: unknown model type {model_type!r}{hint}")


def require_claims(kube: Kube, namespace: str, claims: list[tuple[str, str]]) -> None:
    for field_path, claim in claims:
        if kube.get("v1", "PersistentVolumeClaim", namespace, claim) is None:
            raise Waiting(
                "PVCNotFound",
                f"{field_path}: PersistentVolumeClaim {claim!r} not found in namespace {namespace}; create it or fix the field",
                phase=c.PHASE_FAILED,
                delay=60,
            )


def resolve_fine_tune_output(kube: Kube, namespace: str, name: str, *, want: str, field_path: str) -> api.ClaimPath:
    """The PVC path of another fine-tune's output (`want` = modelPath or adapterPath), once it is there."""
    other = kube.get(c.API_VERSION, c.FINETUNE_KIND, namespace, name)
    if other is None:
        raise Waiting("FineTuneNotFound", f"{field_path}: InternVLFineTune {name!r} not found", delay=30)
    status = other.get("status") or {}
    outputs = status.get("outputs") or {}
    if status.get("phase") == c.PHASE_FAILED:
        raise Waiting("UpstreamFailed", f"{field_path}: InternVLFineTune {name!r} failed", phase=c.PHASE_FAILED, delay=120)
    path = outputs.get(want)
    if not path or not st.condition_is_true(status.get("conditions"), c.COND_COMPLETE):
        raise Waiting("WaitingForFineTune", f"{field_path}: waiting for InternVLFineTune {name!r} to finish", delay=30)
    return api.ClaimPath(claim_name=outputs["claimName"], path=path)


def resolve_finetune(kube: Kube, ft: api.InternVLFineTune) -> api.InternVLFineTune:
    model = ft.spec.model
    if model.from_fine_tune is None:
        return ft
    if model.from_fine_tune == ft.name:
        raise Invalid("InvalidSpec", "spec.model.fromFineTune: a fine-tune cannot start from its own output")
    pvc = resolve_fine_tune_output(kube, ft.namespace, model.from_fine_tune, want="modelPath", field_path="spec.model.fromFineTune")
    resolved = model.model_copy(update={"from_fine_tune": None, "pvc": pvc})
    return ft.model_copy(update={"spec": ft.spec.model_copy(update={"model": resolved})})


def resolve_service(kube: Kube, svc: api.InternVLService) -> api.InternVLService:
    spec = svc.spec
    model = spec.model
    if model.from_fine_tune is not None:
        pvc = resolve_fine_tune_output(kube, svc.namespace, model.from_fine_tune, want="modelPath", field_path="spec.model.fromFineTune")
        model = model.model_copy(update={"from_fine_tune": None, "pvc": pvc})
    adapters = []
    for i, adapter in enumerate(spec.adapters or []):
        if adapter.from_fine_tune is not None:
            pvc = resolve_fine_tune_output(
                kube, svc.namespace, adapter.from_fine_tune, want="adapterPath", field_path=f"spec.adapters[{i}].fromFineTune"
            )
            adapter = adapter.model_copy(update={"from_fine_tune": None, "pvc": pvc})
        adapters.append(adapter)
    new_spec = spec.model_copy(update={"model": model, "adapters": adapters or None})
    return svc.model_copy(update={"spec": new_spec})


def finetune_claims(ft: api.InternVLFineTune) -> list[tuple[str, str]]:
    claims = [("spec.output.claimName", ft.spec.output.claim_name)]
    if ft.spec.model.pvc is not None:
        claims.append(("spec.model.pvc.claimName", ft.spec.model.pvc.claim_name))
    if ft.spec.dataset.pvc is not None:
        claims.append(("spec.dataset.pvc.claimName", ft.spec.dataset.pvc.claim_name))
    return claims


def service_claims(svc: api.InternVLService) -> list[tuple[str, str]]:
    claims = []
    if svc.spec.model.pvc is not None:
        claims.append(("spec.model.pvc.claimName", svc.spec.model.pvc.claim_name))
    for i, adapter in enumerate(svc.spec.adapters or []):
        if adapter.pvc is not None:
            claims.append((f"spec.adapters[{i}].pvc.claimName", adapter.pvc.claim_name))
    return claims


# --------------------------------------------------------------------------- observing


def _observe_stage(kube: Kube, namespace: str, job_name: str, component: str, ft_name: str) -> reconcile.StageObservation:
    job = st.observe_job(job_name, kube.get("batch/v1", "Job", namespace, job_name))
    if not job.exists:
        return reconcile.StageObservation(job=job)
    pods = kube.list("v1", "Pod", namespace, labels={c.LABEL_FINETUNE: builders.child_name(ft_name), c.LABEL_COMPONENT: component})
    # Rank 0 prints the progress lines; after a retry the newest pod of index 0 is the live one.
    pod = st.newest_pod(pods, index=0)
    text = ""
    if pod is not None:
        text = kube.pod_log(namespace, pod["metadata"]["name"], tail_lines=c.LOG_TAIL_LINES * 5)
    return reconcile.StageObservation(job=job, pods=pods, log=text)


def observe_finetune(kube: Kube, ft: api.InternVLFineTune) -> reconcile.FineTuneObservation:
    ns, name = ft.namespace, ft.name
    service = None
    if ft.spec.serve is not None:
        service = kube.get(c.API_VERSION, c.SERVICE_KIND, ns, builders.service_cr_name(ft))
    return reconcile.FineTuneObservation(
        datacheck=_observe_stage(kube, ns, builders.datacheck_job_name(name), c.COMPONENT_DATACHECK, name),
        train=_observe_stage(kube, ns, builders.train_job_name(name), c.COMPONENT_TRAIN, name),
        merge=_observe_stage(kube, ns, builders.merge_job_name(name), c.COMPONENT_MERGE, name),
        service=service,
    )


def observe_service(kube: Kube, svc: api.InternVLService) -> reconcile.ServiceObservation:
    ns, name = svc.namespace, builders.serving_name(svc.name)
    existing = set()
    for api_version, kind in (("autoscaling/v2", "HorizontalPodAutoscaler"), ("policy/v1", "PodDisruptionBudget")):
        if kube.get(api_version, kind, ns, name) is not None:
            existing.add(kind)
    deployment = kube.get("apps/v1", "Deployment", ns, name)
    pods = kube.list("v1", "Pod", ns, labels=builders.service_selector(svc.name)) if deployment else []
    return reconcile.ServiceObservation(deployment=deployment, pods=pods, existing=existing)


# --------------------------------------------------------------------------- applying


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Merge patch from old to new status: changed keys, and None for keys that went away."""
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new and k != "kopf"})
    return patch


def apply_plan(kube: Kube, body: dict[str, Any], plan: reconcile.Plan) -> None:
    meta = body["metadata"]
    namespace, name = meta.get("namespace") or "default", meta["name"]
    owner = {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": meta}
    for manifest in plan.creates + plan.updates:
        kopf.adopt(manifest, owner=owner)  # ownerReference: deleting the CR deletes its children
    for ref in plan.deletes:
        kube.delete(ref.api_version, ref.kind, namespace, ref.name)
    for manifest in plan.creates:
        try:
            kube.create(manifest)
        except ApiError as exc:
            if exc.status == 422:
                raise Invalid("Rejected", f"the API server refused {manifest['kind']} {manifest['metadata']['name']}: {exc.message}") from exc
            raise
    for manifest in plan.updates:
        kube.apply(manifest)
    record(kube, body, plan.status, plan.events)


def record(kube: Kube, body: dict[str, Any], new_status: dict[str, Any], events: list[tuple[str, str, str]]) -> None:
    meta = body["metadata"]
    patch = status_patch(dict(body.get("status") or {}), new_status)
    if patch:
        kube.patch_status(body["apiVersion"], body["kind"], meta.get("namespace") or "default", meta["name"], patch)
    for event_type, reason, message in events:
        try:
            kube.post_event(body, event_type=event_type, reason=reason, message=message)
        except ApiError as exc:  # an Event is a courtesy; never fail a reconcile over it
            log.warning("could not post event %s for %s: %s", reason, meta["name"], exc)
    if new_status.get("phase"):
        metrics.record_phase(body["kind"], meta.get("namespace") or "default", meta["name"], new_status["phase"])


def _record_problem(kube: Kube, body: dict[str, Any], *, phase: str, reason: str, message: str, cond_type: str) -> None:
    model = api.InternVLFineTuneStatus if body["kind"] == c.FINETUNE_KIND else api.InternVLServiceStatus
    current = model.model_validate(body.get("status") or {})
    generation = (body.get("metadata") or {}).get("generation")
    plan = reconcile.waiting_plan(
        current, generation=generation, phase=phase, cond_type=cond_type, reason=reason, message=message, now=st.now_iso()
    )
    if phase == c.PHASE_FAILED:
        plan.status["conditions"] = st.set_condition(
            plan.status["conditions"], c.COND_FAILED, status=True, reason=reason, message=message, now=st.now_iso(), generation=generation
        )
    record(kube, body, plan.status, plan.events)


def is_final(body: dict[str, Any]) -> bool:
    return reconcile.is_final(body.get("status") or {}, (body.get("metadata") or {}).get("generation"))


def _run(kind: str, body: dict[str, Any], step: Any, *, first_condition: str) -> None:
    """Shared error handling and metrics around one reconcile."""
    kube = get_kube()
    started = time.monotonic()
    metrics.RECONCILES.labels(kind=kind).inc()
    try:
        step(kube)
    except Invalid as exc:
        metrics.ERRORS.labels(kind=kind, error=exc.reason).inc()
        _record_problem(kube, body, phase=c.PHASE_FAILED, reason=exc.reason, message=exc.message, cond_type=first_condition)
        raise kopf.PermanentError(exc.message) from exc
    except Waiting as exc:
        metrics.ERRORS.labels(kind=kind, error=exc.reason).inc()
        _record_problem(kube, body, phase=exc.phase, reason=exc.reason, message=exc.message, cond_type=first_condition)
        raise kopf.TemporaryError(exc.message, delay=exc.delay) from exc
    except ApiError as exc:
        metrics.ERRORS.labels(kind=kind, error=f"HTTP{exc.status}").inc()
        # Forbidden usually means RBAC is being fixed; retry slower. Other answers (5xx, 429, timeouts): at the next
        # poll, at most 10 s away (a busy API server gets one call per CR per poll, as without the error).
        delay = 60 if exc.status == 403 else min(10.0, SETTINGS.poll_interval_s)
        raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=delay) from exc
    finally:
        metrics.LATENCY.labels(kind=kind).observe(time.monotonic() - started)


# --------------------------------------------------------------------------- entry points


def reconcile_finetune(body: dict[str, Any], **_: Any) -> None:
    body = _plain(body)
    if is_final(body):
        return

    def step(kube: Kube) -> None:
        ft = parse(api.InternVLFineTune, body)
        check_model_type(ft.spec.model.model_type, SETTINGS)
        ft = resolve_finetune(kube, ft)
        require_claims(kube, ft.namespace, finetune_claims(ft))
        if ft.spec.dataset.config_map is not None:
            if kube.get("v1", "ConfigMap", ft.namespace, ft.spec.dataset.config_map.name) is None:
                raise Waiting(
                    "ConfigMapNotFound",
                    f"spec.dataset.configMap.name: ConfigMap {ft.spec.dataset.config_map.name!r} not found",
                    phase=c.PHASE_FAILED,
                    delay=60,
                )
        observation = observe_finetune(kube, ft)
        plan = reconcile.plan_finetune(ft, observation, settings=SETTINGS, now=st.now_iso())
        apply_plan(kube, body, plan)

    _run(c.FINETUNE_KIND, body, step, first_condition=c.COND_SPEC_VALID)


def reconcile_service(body: dict[str, Any], **_: Any) -> None:
    body = _plain(body)
    if is_final(body) and (body.get("status") or {}).get("phase") != c.PHASE_FAILED:
        return

    def step(kube: Kube) -> None:
        svc = parse(api.InternVLService, body)
        check_model_type(svc.spec.model.model_type, SETTINGS)
        svc = resolve_service(kube, svc)
        require_claims(kube, svc.namespace, service_claims(svc))
        observation = observe_service(kube, svc)
        plan = reconcile.plan_service(svc, observation, settings=SETTINGS, now=st.now_iso())
        apply_plan(kube, body, plan)

    _run(c.SERVICE_KIND, body, step, first_condition=c.COND_READY)


def forget(body: dict[str, Any], **_: Any) -> None:
    meta = body.get("metadata") or {}
    metrics.forget(body.get("kind", ""), meta.get("namespace") or "default", meta.get("name", ""))


def _plain(body: Any) -> dict[str, Any]:
    """Kopf passes a read-only Body view; the rest of the code wants plain dicts."""
    return {
        "apiVersion": body.get("apiVersion", c.API_VERSION),
        "kind": body.get("kind"),
        "metadata": dict(body.get("metadata") or {}),
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def register(registry: kopf.OperatorRegistry | None = None, *, settings: OperatorSettings | None = None) -> None:
    """Register the handlers (on import by default; tests may pass their own registry)."""
    settings = settings or SETTINGS
    for plural, fn, kind in (
        (c.FINETUNE_PLURAL, reconcile_finetune, "finetune"),
        (c.SERVICE_PLURAL, reconcile_service, "service"),
    ):
        args = (c.GROUP, c.VERSION, plural)
        kopf.on.create(*args, id=f"{kind}-create", registry=registry)(fn)
        kopf.on.resume(*args, id=f"{kind}-resume", registry=registry)(fn)
        kopf.on.update(*args, id=f"{kind}-update", field="spec", registry=registry)(fn)
        kopf.timer(*args, id=f"{kind}-poll", interval=settings.poll_interval_s, initial_delay=settings.poll_interval_s,
                   registry=registry)(fn)  # fmt: skip
        # optional=True: no finalizer, so deleting a CR never waits for the operator.
        kopf.on.delete(*args, id=f"{kind}-forget", optional=True, registry=registry)(forget)
