"""Pure functions from a parsed CR to the Kubernetes manifests that run it.

No I/O here: each function takes the typed CR (api.py) and the operator settings and returns plain dicts,
so tests check them as data and the handlers only create what these return. Model sources of the form
`fromFineTune` must be resolved to a PVC path (resolve.py) before a builder sees them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from . import api, constants as c
from .settings import OperatorSettings

DEFAULT_SETTINGS = OperatorSettings()
GENERATION_LABEL = f"{c.GROUP}/generation"


# --------------------------------------------------------------------------- names and labels


# A worker that fails (a bad row, GPU out of memory, a refused flag) ends its log with one "internvl: error: ..."
# line; with this policy the log's tail becomes the container's termination message, which status.py copies
# onto the custom resource, so `kubectl describe` says why without `kubectl logs`.
WORKER_TERMINATION_MESSAGE = "FallbackToLogsOnError"


def child_name(parent: str, suffix: str = "", *, max_length: int = c.MAX_NAME_LENGTH) -> str:
    """`<parent>-<suffix>`, cut to max_length; a cut name gets a hash of the full one so two long parents differ."""
    full = f"{parent}-{suffix}" if suffix else parent
    if len(full) <= max_length:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    tail = f"-{suffix}" if suffix else ""
    keep = max_length - len(tail) - len(digest) - 1
    head = parent[:keep].rstrip("-.")
    return f"{head}-{digest}{tail}"


def dns_label(name: str) -> str:
    """A Service name must be a DNS-1035 label (start with a letter); CR names may start with a digit."""
    return name if name[:1].isalpha() else f"s-{name}"


def datacheck_job_name(ft_name: str) -> str:
    return child_name(ft_name, c.COMPONENT_DATACHECK, max_length=c.MAX_JOB_NAME_LENGTH)


def train_job_name(ft_name: str) -> str:
    return child_name(ft_name, c.COMPONENT_TRAIN, max_length=c.MAX_JOB_NAME_LENGTH)


def rendezvous_service_name(ft_name: str) -> str:
    # Same name as the Job: pods get hostname "<job>-<index>" and subdomain "<svc>".
    return dns_label(train_job_name(ft_name))


def merge_job_name(ft_name: str) -> str:
    return child_name(ft_name, c.COMPONENT_MERGE, max_length=c.MAX_JOB_NAME_LENGTH)


def serving_name(svc_name: str) -> str:
    """Name of the Deployment, Service, HPA and PDB of an InternVLService."""
    return dns_label(child_name(svc_name))


def service_cr_name(ft: api.InternVLFineTune) -> str:
    template = ft.spec.serve
    return template.name if template and template.name else ft.name


def run_directory(ft_name: str) -> str:
    """The fine-tune's directory on the output PVC, relative to its root (contract: /output/<ft-name>)."""
    return ft_name


def finetune_labels(ft_name: str, component: str) -> dict[str, str]:
    return {
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_NAME: "internvl",
        c.LABEL_COMPONENT: component,
        # Label values are capped at 63 characters; CR names are not.
        c.LABEL_FINETUNE: child_name(ft_name),
    }


def service_labels(svc_name: str) -> dict[str, str]:
    return {
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_NAME: "internvl",
        c.LABEL_COMPONENT: c.COMPONENT_SERVE,
        c.LABEL_SERVICE: child_name(svc_name),
    }


def service_selector(svc_name: str) -> dict[str, str]:
    return {c.LABEL_SERVICE: child_name(svc_name), c.LABEL_COMPONENT: c.COMPONENT_SERVE}


# --------------------------------------------------------------------------- pod pieces


@dataclass
class PodParts:
    """Volumes, mounts and env that several containers of one CR share."""

    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    env: list[dict[str, Any]] = field(default_factory=list)

    def add_pvc(self, name: str, claim: str, mount_path: str, *, read_only: bool) -> None:
        if any(v["name"] == name for v in self.volumes):
            return
        self.volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        self.mounts.append({"name": name, "mountPath": mount_path, "readOnly": read_only})

    def add_shm(self, size: str) -> None:
        # The container default of 64 MiB /dev/shm breaks NCCL and DataLoader workers.
        self.volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}})
        self.mounts.append({"name": "dshm", "mountPath": "/dev/shm"})

    def add_secret_env(self, env_name: str, ref: api.SecretKeyRef) -> None:
        self.env.append({"name": env_name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})


def _join(root: str, path: str) -> str:
    return f"{root}/{path}" if path else root


def _base_model_parts(model: api.ModelSource, parts: PodParts, *, output_claim: str | None) -> str:
    """Mount or reference the base model; return the value for --model_id_or_path."""
    if model.from_fine_tune is not None:
        raise ValueError(f"model.fromFineTune={model.from_fine_tune!r} must be resolved to a PVC path first")
    if model.pvc is not None:
        if model.pvc.claim_name == output_claim:
            # The model lives on the output PVC (an earlier fine-tune): reuse that read-write mount.
            return _join(c.OUTPUT_MOUNT, model.pvc.path)
        parts.add_pvc("models", model.pvc.claim_name, c.MODELS_MOUNT, read_only=True)
        return _join(c.MODELS_MOUNT, model.pvc.path)
    assert model.hub_id is not None  # api.ModelSource guarantees exactly one source
    if model.hub_token_secret is not None:
        parts.add_secret_env("HF_TOKEN", model.hub_token_secret)
    return model.hub_id


def _finetune_parts(ft: api.InternVLFineTune, *, with_data: bool) -> tuple[PodParts, str]:
    parts = PodParts()
    output_claim = ft.spec.output.claim_name
    parts.add_pvc("output", output_claim, c.OUTPUT_MOUNT, read_only=False)
    model_arg = _base_model_parts(ft.spec.model, parts, output_claim=output_claim)
    parts.env += [
        {"name": "HF_HOME", "value": c.HF_HOME},
        # Progress lines must reach the pod log at once, not when a 4 KiB buffer fills.
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if with_data:
        dataset = ft.spec.dataset
        if dataset.pvc is not None:
            parts.add_pvc("data", dataset.pvc.claim_name, c.DATA_MOUNT, read_only=True)
        elif dataset.config_map is not None:
            parts.volumes.append({"name": "data", "configMap": {"name": dataset.config_map.name}})
            parts.mounts.append({"name": "data", "mountPath": c.DATA_MOUNT, "readOnly": True})
    return parts, model_arg


def train_files(ft: api.InternVLFineTune) -> list[str]:
    return [_join(c.DATA_MOUNT, f) for f in ft.spec.dataset.files]


def validation_files(ft: api.InternVLFineTune) -> list[str]:
    return [_join(c.DATA_MOUNT, f) for f in ft.spec.dataset.validation_files or []]


def _placement(placement: api.PodPlacement | None) -> dict[str, Any]:
    if placement is None:
        return {}
    dumped = placement.model_dump(by_alias=True, exclude_none=True)
    return {k: v for k, v in dumped.items() if v not in ({}, [])}


def _resources(
    requested: api.ResourceRequirements | None, default: dict[str, Any], *, gpus: int = 0, gpu_name: str = "nvidia.com/gpu"
) -> dict[str, Any]:
    resources = requested.model_dump(by_alias=True, exclude_none=True) if requested else {}
    if not resources:
        resources = {k: dict(v) for k, v in default.items()}
    if gpus:
        # Extended resources go in limits; requests default to the same value.
        resources.setdefault("limits", {})[gpu_name] = gpus
    return resources


def _fmt(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


# Every pod runs as the worker image's unprivileged user (uid 1000, images/worker/Dockerfile), with no
# privilege escalation, no Linux capabilities and the RuntimeDefault seccomp profile. Worker containers get
# a read-only root filesystem: what they write goes to the PVCs, /dev/shm, or the `scratch` emptyDir, which
# HOME, TMPDIR and XDG_CACHE_HOME point at (torch, triton and DeepSpeed caches, tempfile). vLLM writes
# caches in places of its own, so its root filesystem stays writable (still as uid 1000).
RUN_AS = 1000
SCRATCH_MOUNT = "/scratch"


def harden(pod_spec: dict[str, Any], *, read_only_root: bool = True) -> dict[str, Any]:
    pod_spec["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "fsGroupChangePolicy": "OnRootMismatch",  # no recursive chown of a 50 GB model volume on every start
        "seccompProfile": {"type": "RuntimeDefault"},
        **(pod_spec.get("securityContext") or {}),
    }
    pod_spec.setdefault("volumes", []).append({"name": "scratch", "emptyDir": {}})
    for container in pod_spec["containers"]:
        container["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": read_only_root,
        }
        container.setdefault("volumeMounts", []).append({"name": "scratch", "mountPath": SCRATCH_MOUNT})
        env = container.setdefault("env", [])
        named = {e["name"] for e in env}
        env += [{"name": k, "value": v} for k, v in (("HOME", SCRATCH_MOUNT), ("TMPDIR", f"{SCRATCH_MOUNT}/tmp"),
                                                      ("XDG_CACHE_HOME", f"{SCRATCH_MOUNT}/cache")) if k not in named]
    return pod_spec


def _job(
    *,
    name: str,
    namespace: str,
    labels: dict[str, str],
    pod_spec: dict[str, Any],
    backoff_limit: int,
    ttl: int | None,
    generation: int | None,
    extra_spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "template": {"metadata": {"labels": dict(labels)}, "spec": harden(pod_spec)},
    }
    if ttl is not None:
        spec["ttlSecondsAfterFinished"] = ttl
    spec.update(extra_spec or {})
    job_labels = dict(labels)
    if generation is not None:
        # Which spec generation made this Job: a failed Job of an older generation is replaced, not reported.
        job_labels[GENERATION_LABEL] = str(generation)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": job_labels},
        "spec": spec,
    }


# --------------------------------------------------------------------------- fine-tune children


def _cpu_worker_job(
    ft: api.InternVLFineTune,
    settings: OperatorSettings,
    *,
    step: str,
    job_name: str,
    component: str,
    args: list[str],
    parts,
    resources: dict[str, Any],
    backoff_limit: int,
) -> dict[str, Any]:
    """A CPU Job running one `internvl` command in the worker image (data check, merge)."""
    container = {
        "name": step,
        "image": ft.spec.image or settings.worker_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["internvl"],
        "args": args,
        "env": parts.env,
        "resources": _resources(None, resources),
        "volumeMounts": parts.mounts,
        "terminationMessagePolicy": WORKER_TERMINATION_MESSAGE,
    }
    pod_spec = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": parts.volumes,
        **_placement(_cpu_placement(ft.spec.placement)),
    }
    return _job(
        name=job_name,
        namespace=ft.namespace,
        labels=finetune_labels(ft.name, component),
        pod_spec=pod_spec,
        backoff_limit=backoff_limit,
        ttl=ft.spec.ttl_seconds_after_finished,
        generation=ft.metadata.generation,
    )


def build_datacheck_job(ft: api.InternVLFineTune, settings: OperatorSettings = DEFAULT_SETTINGS) -> dict[str, Any]:
    """CPU Job running `internvl data check`: bad rows fail here, before any GPU is held."""
    parts, model_arg = _finetune_parts(ft, with_data=True)
    run_dir = _join(c.OUTPUT_MOUNT, run_directory(ft.name))
    args = ["data", "check", *train_files(ft), *validation_files(ft)]
    args += [
        "--model_type", ft.spec.model.model_type,
        "--model_id_or_path", model_arg,
        "--max_length", str(ft.spec.training.max_length),
        "--report", f"{run_dir}/datacheck.json",
    ]  # fmt: skip
    return _cpu_worker_job(
        ft,
        settings,
        step="datacheck",
        job_name=datacheck_job_name(ft.name),
        component=c.COMPONENT_DATACHECK,
        args=args,
        parts=parts,
        resources=settings.datacheck_resources,
        backoff_limit=0,  # a bad row is bad on every retry
    )


def _cpu_placement(placement: api.PodPlacement | None) -> api.PodPlacement | None:
    """CPU pods keep the service account and tolerations but not GPU node selectors/affinity/priority."""
    if placement is None:
        return None
    return api.PodPlacement(service_account_name=placement.service_account_name, tolerations=placement.tolerations)


def sft_args(ft: api.InternVLFineTune, *, model_arg: str) -> list[str]:
    """Arguments of `internvl_worker.cli sft` (the worker CLI contract)."""
    spec, tr = ft.spec, ft.spec.training
    args = [
        "--model_type", spec.model.model_type,
        "--model_id_or_path", model_arg,
        "--dataset", ",".join(train_files(ft)),
    ]  # fmt: skip
    if spec.dataset.validation_files:
        args += ["--val_dataset", ",".join(validation_files(ft))]
    args += [
        "--output_dir", _join(c.OUTPUT_MOUNT, run_directory(ft.name)),
        "--add_output_dir_suffix", "false",
        "--sft_type", spec.method,
    ]  # fmt: skip
    if spec.method == "lora":
        lora = spec.effective_lora
        args += [
            "--lora_rank", str(lora.rank),
            "--lora_alpha", str(lora.alpha),
            "--lora_dropout", _fmt(lora.dropout),
            "--lora_target_modules", lora.target_modules,
        ]  # fmt: skip
    args += [
        "--freeze_vit", _fmt(spec.freeze.vit),
        "--freeze_aligner", _fmt(spec.freeze.aligner),
        "--num_train_epochs", _fmt(tr.epochs),
        "--learning_rate", _fmt(tr.learning_rate),
        "--batch_size", str(tr.batch_size),
        "--gradient_accumulation_steps", str(tr.gradient_accumulation_steps),
        "--max_length", str(tr.max_length),
    ]  # fmt: skip
    if tr.gradient_checkpointing is not None:
        args += ["--gradient_checkpointing", _fmt(tr.gradient_checkpointing)]
    if tr.max_steps is not None:
        args += ["--max_steps", str(tr.max_steps)]
    if tr.logging_steps is not None:
        args += ["--logging_steps", str(tr.logging_steps)]
    if tr.dataloader_workers is not None:
        args += ["--dataloader_num_workers", str(tr.dataloader_workers)]
    if spec.deepspeed:
        args += ["--deepspeed", f"default-{spec.deepspeed}"]
    args += [
        "--save_steps", str(tr.save_steps),
        "--save_total_limit", str(tr.save_total_limit),
        # Always: a retried or resumed pod continues from <output_dir>/latest_checkpoint (none = fresh start).
        "--resume_from_checkpoint", "latest",
    ]  # fmt: skip
    return args


def master_address(ft: api.InternVLFineTune) -> str:
    if ft.spec.nodes == 1:
        return "127.0.0.1"
    # Index 0 of the Indexed Job: hostname "<job>-0" under the headless Service's subdomain.
    return f"{train_job_name(ft.name)}-0.{rendezvous_service_name(ft.name)}"


def build_train_job(ft: api.InternVLFineTune, settings: OperatorSettings = DEFAULT_SETTINGS) -> dict[str, Any]:
    """The GPU Job: one torchrun per node, nodes = an Indexed Job's completions (index = node rank)."""
    spec = ft.spec
    parts, model_arg = _finetune_parts(ft, with_data=True)
    parts.add_shm(settings.shm_size)
    parts.env += [
        {"name": "MASTER_ADDR", "value": master_address(ft)},
        {"name": "MASTER_PORT", "value": str(c.RENDEZVOUS_PORT)},
        {"name": "NNODES", "value": str(spec.nodes)},
        {"name": "NPROC_PER_NODE", "value": str(spec.procs_per_node)},
        # Same value as JOB_COMPLETION_INDEX, read through the downward API so it is defined before
        # the args below reference it ($(VAR) expands only variables declared in env).
        {
            "name": "NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{c.ANNOTATION_COMPLETION_INDEX}']"}},
        },
    ]
    args = [
        "--nproc_per_node", "$(NPROC_PER_NODE)",
        "--nnodes", "$(NNODES)",
        "--node_rank", "$(NODE_RANK)",
        "--master_addr", "$(MASTER_ADDR)",
        "--master_port", "$(MASTER_PORT)",
        "-m", "internvl_worker.cli", "sft",
        *sft_args(ft, model_arg=model_arg),
    ]  # fmt: skip
    container = {
        "name": "trainer",
        "image": spec.image or settings.worker_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["torchrun"],
        "args": args,
        "env": parts.env,
        "ports": [{"name": "rendezvous", "containerPort": c.RENDEZVOUS_PORT}],
        "resources": _resources(spec.resources, settings.train_default_resources, gpus=spec.gpus_per_node, gpu_name=settings.gpu_resource_name),
        "volumeMounts": parts.mounts,
        "terminationMessagePolicy": WORKER_TERMINATION_MESSAGE,
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # failed pods count against backoffLimit and keep their reason for status
        "containers": [container],
        "volumes": parts.volumes,
        **_placement(spec.placement),
    }
    if spec.nodes > 1:
        pod_spec["subdomain"] = rendezvous_service_name(ft.name)
    labels = finetune_labels(ft.name, c.COMPONENT_TRAIN)
    job_labels = dict(labels)
    if spec.queue_name:
        job_labels[c.LABEL_KUEUE_QUEUE] = spec.queue_name
    extra: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.nodes,
        "parallelism": spec.nodes,
        # A preempted or drained pod is not the run's fault: do not spend a retry on it.
        "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]},
    }
    if spec.active_deadline_seconds is not None:
        extra["activeDeadlineSeconds"] = spec.active_deadline_seconds
    job = _job(
        name=train_job_name(ft.name),
        namespace=ft.namespace,
        labels=labels,
        pod_spec=pod_spec,
        backoff_limit=spec.backoff_limit,
        ttl=spec.ttl_seconds_after_finished,
        generation=ft.metadata.generation,
        extra_spec=extra,
    )
    job["metadata"]["labels"].update(job_labels)
    return job


def build_rendezvous_service(ft: api.InternVLFineTune) -> dict[str, Any]:
    """Headless Service giving the training pods DNS names, so node 0 is reachable as MASTER_ADDR."""
    labels = finetune_labels(ft.name, c.COMPONENT_TRAIN)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": rendezvous_service_name(ft.name), "namespace": ft.namespace, "labels": labels},
        "spec": {
            "clusterIP": "None",
            # Records must exist before pods are Ready: ranks > 0 look node 0 up while it starts.
            "publishNotReadyAddresses": True,
            "selector": {c.LABEL_FINETUNE: labels[c.LABEL_FINETUNE], c.LABEL_COMPONENT: c.COMPONENT_TRAIN},
            "ports": [{"name": "rendezvous", "port": c.RENDEZVOUS_PORT, "targetPort": c.RENDEZVOUS_PORT}],
        },
    }


def build_merge_job(ft: api.InternVLFineTune, settings: OperatorSettings = DEFAULT_SETTINGS) -> dict[str, Any]:
    """`internvl export --merge_lora true` on the latest checkpoint; writes <run dir>/merged."""
    parts, _ = _finetune_parts(ft, with_data=False)
    run_dir = _join(c.OUTPUT_MOUNT, run_directory(ft.name))
    return _cpu_worker_job(
        ft,
        settings,
        step="merge",
        job_name=merge_job_name(ft.name),
        component=c.COMPONENT_MERGE,
        # "latest" = the checkpoint named in <output_dir>/latest_checkpoint (the worker resolves it).
        args=["export", "--ckpt_dir", "latest", "--output_dir", run_dir, "--merge_lora", "true"],
        parts=parts,
        resources=settings.merge_resources,
        backoff_limit=1,
    )


def served_model_source(
    ft: api.InternVLFineTune, *, checkpoint_path: str | None
) -> tuple[api.ServiceModel, list[api.AdapterSpec]]:
    """What the fine-tune's InternVLService serves: merged model, base + adapter, or the full checkpoint."""
    claim = ft.spec.output.claim_name
    base = ft.spec.model
    if ft.spec.effective_merge:
        merged = _join(run_directory(ft.name), "merged")
        return api.ServiceModel(model_type=base.model_type, pvc=api.ClaimPath(claim_name=claim, path=merged)), []
    if checkpoint_path is None:
        raise ValueError("the training Job finished without reporting a checkpoint (no 'done' progress line)")
    if ft.spec.method == "full":
        return api.ServiceModel(model_type=base.model_type, pvc=api.ClaimPath(claim_name=claim, path=checkpoint_path)), []
    base_model = api.ServiceModel(
        model_type=base.model_type, pvc=base.pvc, hub_id=base.hub_id, hub_token_secret=base.hub_token_secret
    )
    adapter = api.AdapterSpec(name=ft.name[:100], pvc=api.ClaimPath(claim_name=claim, path=checkpoint_path))
    return base_model, [adapter]


def build_service_cr(ft: api.InternVLFineTune, *, checkpoint_path: str | None = None) -> dict[str, Any]:
    """The InternVLService a fine-tune's `serve` template asks for, pointing at the fine-tune's output."""
    template = ft.spec.serve
    if template is None:
        raise ValueError("spec.serve is not set")
    model, adapters = served_model_source(ft, checkpoint_path=checkpoint_path)
    options = template.model_dump(by_alias=True, exclude_none=True, exclude={"name"})
    spec = api.InternVLServiceSpec.model_validate(
        {**options, "model": model.model_dump(by_alias=True, exclude_none=True)}
    )
    if adapters:
        spec.adapters = adapters
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.SERVICE_KIND,
        "metadata": {
            "name": service_cr_name(ft),
            "namespace": ft.namespace,
            "labels": finetune_labels(ft.name, c.COMPONENT_SERVE),
        },
        "spec": spec.model_dump(by_alias=True, exclude_none=True),
    }


# --------------------------------------------------------------------------- service children


def _serving_parts(svc: api.InternVLService) -> tuple[PodParts, str, list[tuple[str, str]]]:
    """Volumes/env for the served model and adapters; returns (parts, model path or id, [(adapter, path)])."""
    parts = PodParts()
    model_arg = _base_model_parts(svc.spec.model, parts, output_claim=None)
    model_claim = svc.spec.model.pvc.claim_name if svc.spec.model.pvc else None
    adapters: list[tuple[str, str]] = []
    for adapter in svc.spec.adapters or []:
        if adapter.pvc is None:
            raise ValueError(f"adapter {adapter.name!r}: fromFineTune must be resolved to a PVC path first")
        claim = adapter.pvc.claim_name
        if claim == model_claim:
            root = c.MODELS_MOUNT
        else:
            # Volume names are DNS labels; one mount per distinct claim.
            claims = [a.pvc.claim_name for a in svc.spec.adapters or [] if a.pvc and a.pvc.claim_name != model_claim]
            index = sorted(set(claims)).index(claim)
            root = f"{c.ADAPTERS_MOUNT}/{index}"
            parts.add_pvc(f"adapters-{index}", claim, root, read_only=True)
        adapters.append((adapter.name, _join(root, adapter.pvc.path)))
    if svc.spec.model.hub_id is not None:
        parts.env.append({"name": "HF_HOME", "value": f"{SCRATCH_MOUNT}/huggingface"})  # the root filesystem is read-only
    return parts, model_arg, adapters


def _http_probe(path: str, *, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def worker_serve_args(svc: api.InternVLService, *, model_arg: str, adapters: list[tuple[str, str]]) -> list[str]:
    spec = svc.spec
    args = ["serve", "--model_id_or_path", model_arg]
    if spec.model.model_type:
        args += ["--model_type", spec.model.model_type]
    if adapters:
        args += ["--adapters", ",".join(f"{name}={path}" for name, path in adapters)]
    args += ["--host", "0.0.0.0", "--port", str(c.WORKER_PORT)]
    if spec.api_key_secret:
        args += ["--api-key-file", f"{c.SECRETS_MOUNT}/key"]
    if spec.max_concurrent_requests:
        args += ["--max-concurrent-requests", str(spec.max_concurrent_requests)]
    return args


def vllm_serve_args(svc: api.InternVLService, *, model_arg: str, adapters: list[tuple[str, str]]) -> list[str]:
    spec = svc.spec
    args = [
        "--model", model_arg,
        "--served-model-name", svc.name,
        "--host", "0.0.0.0",
        "--port", str(c.WORKER_PORT),
        "--tensor-parallel-size", str(spec.gpus),
        # No --trust-remote-code: models are served in transformers' native format (`internvl convert`
        # turns an original-format checkpoint into one); a user who trusts a repo's code can add it in vllm.extraArgs.
    ]  # fmt: skip
    vllm = spec.vllm or api.VllmSpec()
    if vllm.max_model_len:
        args += ["--max-model-len", str(vllm.max_model_len)]
    if vllm.gpu_memory_utilization:
        args += ["--gpu-memory-utilization", _fmt(vllm.gpu_memory_utilization)]
    if spec.max_concurrent_requests:
        args += ["--max-num-seqs", str(spec.max_concurrent_requests)]
    if adapters:
        args += ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path in adapters)]
    return args + list(vllm.extra_args or [])


def build_deployment(svc: api.InternVLService, settings: OperatorSettings = DEFAULT_SETTINGS) -> dict[str, Any]:
    """Deployment of the worker's `internvl serve` (engine: worker) or of the vLLM OpenAI server (engine: vllm)."""
    spec = svc.spec
    parts, model_arg, adapters = _serving_parts(svc)
    if spec.gpus:
        parts.add_shm(settings.shm_size)
    if spec.engine == "vllm":
        image = spec.image or settings.vllm_image
        command = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
        args = vllm_serve_args(svc, model_arg=model_arg, adapters=adapters)
        if spec.api_key_secret:
            parts.add_secret_env("VLLM_API_KEY", spec.api_key_secret)
        ready_path = "/health"  # vLLM listens only after the model loaded
    else:
        image = spec.image or settings.worker_image
        command = ["internvl"]
        args = worker_serve_args(svc, model_arg=model_arg, adapters=adapters)
        if spec.api_key_secret:
            parts.volumes.append(
                {
                    "name": "api-key",
                    "secret": {"secretName": spec.api_key_secret.name, "items": [{"key": spec.api_key_secret.key, "path": "key"}]},
                }
            )
            parts.mounts.append({"name": "api-key", "mountPath": c.SECRETS_MOUNT, "readOnly": True})
        ready_path = "/ready"  # 200 only after a warm-up request succeeded
    container = {
        "name": "server",
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "args": args,
        "env": parts.env,
        "ports": [{"name": "http", "containerPort": c.WORKER_PORT}],
        "resources": _resources(spec.resources, {}, gpus=spec.gpus, gpu_name=settings.gpu_resource_name),
        "volumeMounts": parts.mounts,
        # Loading 26B weights from a PVC takes minutes: the startup probe allows startupTimeoutSeconds
        # (checked every 10 s) before liveness may restart the pod.
        "startupProbe": _http_probe("/health", period=10, failures=math.ceil(spec.startup_timeout_seconds / 10)),
        "readinessProbe": _http_probe(ready_path, period=5, failures=3),
        "livenessProbe": _http_probe("/health", period=15, failures=4),
        "terminationMessagePolicy": WORKER_TERMINATION_MESSAGE,
    }
    labels = service_labels(svc.name)
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": service_selector(svc.name)},
        # Zero downtime: the new pod must be Ready before an old one goes. On a cluster without a
        # spare GPU the new pod stays Pending (status shows Unschedulable) and the old one keeps serving.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "revisionHistoryLimit": 3,
        "template": {
            "metadata": {
                "labels": labels,
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(c.WORKER_PORT),
                    "prometheus.io/path": "/metrics",
                },
            },
            "spec": harden(
                {
                    "containers": [container],
                    "volumes": parts.volumes,
                    # In-flight generations get a minute to finish after the pod leaves the Service.
                    "terminationGracePeriodSeconds": 60,
                    **_placement(spec.placement),
                },
                read_only_root=spec.engine != "vllm",
            ),
        },
    }
    if spec.autoscaling is None:
        deployment_spec["replicas"] = spec.replicas  # with an HPA, the HPA owns replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": serving_name(svc.name), "namespace": svc.namespace, "labels": labels},
        "spec": deployment_spec,
    }


def build_service(svc: api.InternVLService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": serving_name(svc.name), "namespace": svc.namespace, "labels": service_labels(svc.name)},
        "spec": {
            "type": "ClusterIP",
            "selector": service_selector(svc.name),
            "ports": [{"name": "http", "port": c.SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def service_url(svc_name: str, namespace: str, settings: OperatorSettings = DEFAULT_SETTINGS) -> str:
    return f"http://{serving_name(svc_name)}.{namespace}.svc.{settings.cluster_domain}"


def build_hpa(svc: api.InternVLService) -> dict[str, Any] | None:
    scaling = svc.spec.autoscaling
    if scaling is None:
        return None
    if scaling.metric_name:
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": scaling.metric_name},
                "target": {"type": "AverageValue", "averageValue": scaling.target_average_value or "4"},
            },
        }
    else:
        metric = {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_utilization or 80},
            },
        }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": serving_name(svc.name), "namespace": svc.namespace, "labels": service_labels(svc.name)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": serving_name(svc.name)},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [metric],
            # A replica takes minutes to load a model: scale down slowly so a lull does not drop warm GPUs.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}},
        },
    }


def build_pdb(svc: api.InternVLService) -> dict[str, Any] | None:
    budget = svc.spec.disruption_budget
    if budget is None:
        return None
    spec: dict[str, Any] = {"selector": {"matchLabels": service_selector(svc.name)}}
    if budget.min_available is not None:
        spec["minAvailable"] = budget.min_available
    else:
        spec["maxUnavailable"] = budget.max_unavailable
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": serving_name(svc.name), "namespace": svc.namespace, "labels": service_labels(svc.name)},
        "spec": spec,
    }


def build_serving_children(svc: api.InternVLService, settings: OperatorSettings = DEFAULT_SETTINGS) -> list[dict]:
    """Everything an InternVLService owns, in apply order."""
    children = [build_deployment(svc, settings), build_service(svc), build_hpa(svc), build_pdb(svc)]
    return [child for child in children if child is not None]
