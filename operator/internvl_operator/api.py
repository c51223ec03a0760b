"""Typed spec and status of InternVLFineTune and InternVLService (internvl.ai/v1alpha1).

These pydantic models are the single source of truth: `crdgen` turns them into the CRDs' structural
OpenAPI schemas (defaults, enums, ranges, CEL rules), and the operator parses every CR through them.
Cross-field rules exist twice on purpose: as CEL (`x-kubernetes-validations`, so `kubectl apply`
refuses a bad CR) and as a pydantic validator with the same message (so the operator refuses it too,
e.g. on clusters older than CEL, and so tests can check the rule without an API server).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasGenerator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from . import constants

# DNS-1123 subdomain (PVC, Secret, ConfigMap and CR names) and label values.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A relative path inside a volume: no leading "/", no ".." segment (it would escape the mount).
RELATIVE_PATH = r"^([^/.][^/]*|\.[^/.][^/]*)(/([^/.][^/]*|\.[^/.][^/]*))*$"
HUB_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"
LORA_TARGETS = r"^(DEFAULT|ALL|[A-Za-z0-9_.]+(,[A-Za-z0-9_.]+)*)$"


# message -> rule, so the operator can name the same field as the API server (pydantic only knows the model).
RULES_BY_MESSAGE: dict[str, "CelRule"] = {}


class CelRule:
    """One cross-field rule: the CEL text for the CRD and the message both the API server and pydantic give."""

    def __init__(self, rule: str, message: str, field_path: str | None = None) -> None:
        self.rule = rule
        self.message = message
        self.field_path = field_path
        RULES_BY_MESSAGE[message] = self

    def to_schema(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


def _validations(*rules: CelRule) -> dict[str, Any]:
    return {"x-kubernetes-validations": [rule.to_schema() for rule in rules]}


def _count_set(*fields: str) -> str:
    return " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields)


class Spec(BaseModel):
    """Base of every spec object: camelCase in YAML, unknown fields refused (kubectl's strict validation)."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(alias=to_camel),
        populate_by_name=True,
        extra="forbid",
    )


# --------------------------------------------------------------------------- shared pieces


class SecretKeyRef(Spec):
    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Secret in the CR's namespace.")
    key: str = Field(default="token", min_length=1, max_length=253, description="Key inside the Secret.")


class ClaimRef(Spec):
    claim_name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="PersistentVolumeClaim name.")


class ClaimPath(Spec):
    claim_name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="PersistentVolumeClaim name.")
    path: str = Field(
        default="",
        max_length=1024,
        pattern=r"^$|" + RELATIVE_PATH,
        description="Directory inside the volume (relative, no '..'); empty = the volume root.",
    )


class ConfigMapRef(Spec):
    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="ConfigMap whose keys are JSONL files.")


Quantity = int | str  # rendered as x-kubernetes-int-or-string


class ResourceRequirements(Spec):
    requests: dict[str, Quantity] | None = Field(default=None, description="e.g. {cpu: '8', memory: 64Gi}.")
    limits: dict[str, Quantity] | None = Field(default=None, description="GPUs are added by the operator.")


class Toleration(Spec):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class PodPlacement(Spec):
    """Where pods may run; copied verbatim into every pod the CR creates."""

    node_selector: dict[str, str] | None = Field(default=None, description="Pod nodeSelector.")
    tolerations: list[Toleration] | None = Field(default=None, max_length=32, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="Pod affinity (core/v1 Affinity; not validated here, the API server checks it).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(default=None, max_length=253, description="PriorityClass of the pods.")
    service_account_name: str | None = Field(default=None, max_length=253, description="ServiceAccount of the pods.")


# --------------------------------------------------------------------------- model sources

RULE_MODEL_ONE_SOURCE = CelRule(
    _count_set("pvc", "hubId", "fromFineTune") + " == 1",
    "set exactly one model source: pvc, hubId or fromFineTune",
)
RULE_MODEL_TOKEN_NEEDS_HUB = CelRule(
    "!has(self.hubTokenSecret) || has(self.hubId)",
    "hubTokenSecret is only used with hubId",
    ".hubTokenSecret",
)


class ModelSource(Spec):
    model_config = ConfigDict(json_schema_extra=_validations(RULE_MODEL_ONE_SOURCE, RULE_MODEL_TOKEN_NEEDS_HUB))

    pvc: ClaimPath | None = Field(default=None, description="Model directory on a PVC (mounted at /models).")
    hub_id: str | None = Field(
        default=None, pattern=HUB_ID, max_length=200, description="Hugging Face hub id, e.g. OpenGVLab/InternVL3-1B-hf."
    )
    hub_token_secret: SecretKeyRef | None = Field(
        default=None, description="Secret holding an HF token; given to pods as env HF_TOKEN, never in args."
    )
    from_fine_tune: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        max_length=253,
        description="Name of an InternVLFineTune in this namespace; its output model is used once it succeeded.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSource":
        if sum(x is not None for x in (self.pvc, self.hub_id, self.from_fine_tune)) != 1:
            raise ValueError(RULE_MODEL_ONE_SOURCE.message)
        if self.hub_token_secret is not None and self.hub_id is None:
            raise ValueError(RULE_MODEL_TOKEN_NEEDS_HUB.message)
        return self


class FineTuneModel(ModelSource):
    model_type: str = Field(
        pattern=r"^[a-z0-9][a-z0-9._-]*$",
        max_length=100,
        description="Worker registry model type, e.g. internvl3-1b or mini-internvl-chat-2b-v1_5.",
    )


class ServiceModel(ModelSource):
    model_type: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9._-]*$",
        max_length=100,
        description="Worker registry model type; optional (the worker reads it from the model's config).",
    )


# --------------------------------------------------------------------------- fine-tune spec

RULE_DATA_ONE_SOURCE = CelRule(
    _count_set("pvc", "configMap") + " == 1",
    "set exactly one dataset source: pvc or configMap",
)


RelativeFile = Annotated[str, Field(pattern=RELATIVE_PATH, max_length=1024)]


class DatasetSpec(Spec):
    """Local JSONL files only: the worker's `data check` and `sft` read files, not URLs (copy remote data
    onto a PVC first, e.g. with a Job running `curl`, or into a ConfigMap if it is small)."""

    model_config = ConfigDict(json_schema_extra=_validations(RULE_DATA_ONE_SOURCE))

    pvc: ClaimRef | None = Field(default=None, description="PVC with the data, mounted read-only at /data.")
    config_map: ConfigMapRef | None = Field(
        default=None,
        description="ConfigMap mounted at /data (its keys are file names; < 1 MiB in total; images as data: URLs or keys).",
    )
    files: list[RelativeFile] = Field(
        min_length=1,
        max_length=16,
        description="Training JSONL files, relative to the volume root (become /data/<file>).",
    )
    validation_files: list[RelativeFile] | None = Field(
        default=None, max_length=16, description="Validation JSONL files, relative to the volume root."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "DatasetSpec":
        if sum(x is not None for x in (self.pvc, self.config_map)) != 1:
            raise ValueError(RULE_DATA_ONE_SOURCE.message)
        return self


class LoraSpec(Spec):
    rank: int = Field(default=8, ge=1, le=1024, description="LoRA rank r.")
    alpha: int = Field(default=32, ge=1, le=4096, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(default=0.05, ge=0, le=1, description="Dropout on the LoRA input.")
    target_modules: str = Field(
        default="DEFAULT",
        pattern=LORA_TARGETS,
        max_length=1024,
        description="DEFAULT (the model type's LLM attention), ALL (all LLM linear layers) or comma-separated names.",
    )


class FreezeSpec(Spec):
    vit: bool = Field(default=True, description="Keep the vision encoder frozen.")
    aligner: bool = Field(default=True, description="Keep the MLP projector frozen.")


class TrainingSpec(Spec):
    epochs: float = Field(default=1.0, gt=0, le=1000, description="num_train_epochs.")
    learning_rate: float = Field(default=1e-4, gt=0, le=1, description="Peak learning rate.")
    batch_size: int = Field(default=1, ge=1, le=1024, description="Per-GPU micro-batch size.")
    gradient_accumulation_steps: int = Field(default=16, ge=1, le=4096, description="Micro-batches per step.")
    max_length: int = Field(default=2048, ge=64, le=131072, description="Max tokens per row (image tokens included).")
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="Recompute decoder layers in backward. Unset: per batch, only as many layers as GPU memory needs "
        "(none when it fits); true: every layer (least memory, 1.15-1.28x slower steps); false: none.",
    )
    save_steps: int = Field(default=100, ge=1, le=1_000_000, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(default=2, ge=1, le=100, description="Checkpoints kept on the output PVC.")
    max_steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Stop after N optimizer steps (overrides epochs)."
    )
    logging_steps: int | None = Field(
        default=None, ge=1, le=1_000_000, description="A progress line (status.progress) every N steps; worker default 5."
    )
    dataloader_workers: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="Processes decoding and tiling images per rank; worker default 2; 0 = in the training process.",
    )


class AutoscalingSpec(Spec):
    model_config = ConfigDict(
        json_schema_extra=_validations(
            CelRule("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas", ".minReplicas")
        )
    )

    min_replicas: int = Field(default=1, ge=1, le=1000, description="HPA minReplicas.")
    max_replicas: int = Field(default=4, ge=1, le=1000, description="HPA maxReplicas.")
    target_cpu_utilization: int | None = Field(
        default=None, ge=1, le=100, description="Scale on CPU (percent of requests); used when no metric is given."
    )
    metric_name: str | None = Field(
        default=None,
        max_length=253,
        description="A per-pod custom metric to scale on (needs a metrics adapter), e.g. internvl_queue_size.",
    )
    target_average_value: str | None = Field(
        default=None, max_length=64, description="Target per-pod average of metricName, e.g. '4'."
    )

    @model_validator(mode="after")
    def _range(self) -> "AutoscalingSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self


RULE_PDB_ONE = CelRule(
    _count_set("minAvailable", "maxUnavailable") + " == 1",
    "set exactly one of minAvailable or maxUnavailable",
)


class DisruptionBudgetSpec(Spec):
    model_config = ConfigDict(json_schema_extra=_validations(RULE_PDB_ONE))

    min_available: int | None = Field(default=None, ge=0, le=1000, description="PDB minAvailable.")
    max_unavailable: int | None = Field(default=None, ge=0, le=1000, description="PDB maxUnavailable.")

    @model_validator(mode="after")
    def _one(self) -> "DisruptionBudgetSpec":
        if (self.min_available is None) == (self.max_unavailable is None):
            raise ValueError(RULE_PDB_ONE.message)
        return self


class VllmSpec(Spec):
    max_model_len: int | None = Field(default=None, ge=64, le=1048576, description="vLLM --max-model-len.")
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, description="vLLM --gpu-memory-utilization.")
    extra_args: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        default=None, max_length=64, description="More vLLM flags, appended as given."
    )


RULE_VLLM_NEEDS_GPU = CelRule("self.engine != 'vllm' || self.gpus >= 1", "engine: vllm needs gpus >= 1", ".gpus")
RULE_VLLM_FIELDS = CelRule("!has(self.vllm) || self.engine == 'vllm'", "vllm settings need engine: vllm", ".vllm")


class ServingOptions(Spec):
    """How a model is served; shared by InternVLService.spec and InternVLFineTune.spec.serve."""

    model_config = ConfigDict(json_schema_extra=_validations(RULE_VLLM_NEEDS_GPU, RULE_VLLM_FIELDS))

    engine: Literal["worker", "vllm"] = Field(
        default="worker",
        description="worker = `internvl serve` (TGI + OpenAI API); vllm = the vLLM OpenAI server.",
    )
    image: str | None = Field(default=None, max_length=512, description="Overrides the operator's default image.")
    replicas: int = Field(default=1, ge=0, le=1000, description="Replicas when autoscaling is off.")
    gpus: int = Field(default=1, ge=0, le=16, description="nvidia.com/gpu per replica (vLLM: tensor parallel size).")
    resources: ResourceRequirements | None = Field(default=None, description="CPU/memory per replica.")
    api_key_secret: SecretKeyRef | None = Field(
        default=None, description="Secret with the API key clients must send; mounted as a file, never an arg."
    )
    max_concurrent_requests: int | None = Field(
        default=None, ge=1, le=100000, description="Requests served at once per replica (more get HTTP 429)."
    )
    startup_timeout_seconds: int = Field(
        default=1800, ge=60, le=86400, description="How long a replica may take to load the model before restart."
    )
    autoscaling: AutoscalingSpec | None = Field(default=None, description="Create a HorizontalPodAutoscaler.")
    disruption_budget: DisruptionBudgetSpec | None = Field(default=None, description="Create a PodDisruptionBudget.")
    placement: PodPlacement | None = Field(default=None, description="nodeSelector, tolerations, affinity, ...")
    vllm: VllmSpec | None = Field(default=None, description="vLLM-only settings.")

    @model_validator(mode="after")
    def _engine_rules(self) -> "ServingOptions":
        if self.engine == "vllm" and self.gpus < 1:
            raise ValueError(RULE_VLLM_NEEDS_GPU.message)
        if self.vllm is not None and self.engine != "vllm":
            raise ValueError(RULE_VLLM_FIELDS.message)
        return self


class ServeTemplate(ServingOptions):
    name: str | None = Field(
        default=None, pattern=DNS_LABEL, max_length=63, description="InternVLService name; default: the fine-tune's."
    )


RULE_DEEPSPEED_GPUS = CelRule(
    "!has(self.deepspeed) || self.gpusPerNode * self.nodes > 1",
    "deepspeed needs more than one GPU in total (gpusPerNode * nodes > 1)",
    ".deepspeed",
)
RULE_LORA_NEEDS_METHOD = CelRule(
    "!has(self.lora) || self.method == 'lora'", "lora settings need method: lora", ".lora"
)
RULE_MERGE_NEEDS_LORA = CelRule(
    "!has(self.merge) || !self.merge || self.method == 'lora'",
    "merge: true needs method: lora (a full fine-tune's checkpoint is already a whole model)",
    ".merge",
)
RULE_OUTPUT_IMMUTABLE = CelRule("self == oldSelf", "output is immutable (checkpoints live there)")


class InternVLFineTuneSpec(Spec):
    model_config = ConfigDict(
        json_schema_extra=_validations(
            RULE_DEEPSPEED_GPUS, RULE_LORA_NEEDS_METHOD, RULE_MERGE_NEEDS_LORA
        )
    )

    model: FineTuneModel = Field(description="The base model to fine-tune.")
    dataset: DatasetSpec = Field(description="Training data (InternVL JSONL: one conversation per line).")
    output: ClaimRef = Field(
        description="PVC for checkpoints, merged model and reports (mounted at /output; files under <name>/).",
        json_schema_extra=_validations(RULE_OUTPUT_IMMUTABLE),
    )
    method: Literal["lora", "full"] = Field(default="lora", description="lora trains adapters; full trains all weights.")
    lora: LoraSpec | None = Field(default=None, description="LoRA settings (method: lora; defaults when absent).")
    # default {} so the API server fills in the nested defaults and `kubectl get -o yaml` shows them.
    freeze: FreezeSpec = Field(
        default_factory=FreezeSpec, description="Frozen parts of the model.", json_schema_extra={"default": {}}
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, description="Hyper-parameters.", json_schema_extra={"default": {}}
    )
    gpus_per_node: int = Field(
        default=1,
        ge=0,
        le=16,
        description="GPUs (torchrun processes) per node; 0 = CPU only (one process, no nvidia.com/gpu; tests, tiny models).",
    )
    nodes: int = Field(default=1, ge=1, le=64, description="Nodes; > 1 runs an Indexed Job with a headless Service.")
    deepspeed: Literal["zero2", "zero3"] | None = Field(
        default=None, description="ZeRO-2 shards grads + optimizer state; ZeRO-3 also the weights."
    )
    image: str | None = Field(default=None, max_length=512, description="Overrides the operator's worker image.")
    resources: ResourceRequirements | None = Field(default=None, description="CPU/memory per training pod.")
    placement: PodPlacement | None = Field(default=None, description="nodeSelector, tolerations, affinity, ...")
    queue_name: str | None = Field(
        default=None, pattern=DNS_LABEL, max_length=63, description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name)."
    )
    suspend: bool = Field(default=False, description="true deletes the training pods (checkpoints stay); false resumes.")
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Training Job deadline.")
    backoff_limit: int = Field(default=3, ge=0, le=100, description="Training pod retries (each resumes).")
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, description="Delete finished Jobs after N s.")
    merge: bool | None = Field(default=None, description="Merge LoRA into the base model; default true for lora.")
    serve: ServeTemplate | None = Field(default=None, description="Create an InternVLService for the result.")

    @model_validator(mode="after")
    def _cross_field(self) -> "InternVLFineTuneSpec":
        if self.deepspeed is not None and self.gpus_per_node * self.nodes <= 1:
            raise ValueError(RULE_DEEPSPEED_GPUS.message)
        if self.lora is not None and self.method != "lora":
            raise ValueError(RULE_LORA_NEEDS_METHOD.message)
        if self.merge and self.method != "lora":
            raise ValueError(RULE_MERGE_NEEDS_LORA.message)
        return self

    @property
    def effective_merge(self) -> bool:
        return self.method == "lora" and self.merge is not False

    @property
    def effective_lora(self) -> LoraSpec:
        return self.lora or LoraSpec()

    @property
    def world_size(self) -> int:
        """GPUs in total (0 for a CPU-only run)."""
        return self.gpus_per_node * self.nodes

    @property
    def procs_per_node(self) -> int:
        """torchrun processes per node: one per GPU, or one CPU process."""
        return max(1, self.gpus_per_node)


RULE_ADAPTER_ONE_SOURCE = CelRule(
    _count_set("pvc", "fromFineTune") + " == 1", "set exactly one adapter source: pvc or fromFineTune"
)


class AdapterSpec(Spec):
    model_config = ConfigDict(json_schema_extra=_validations(RULE_ADAPTER_ONE_SOURCE))

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100, description="Name clients request.")
    pvc: ClaimPath | None = Field(default=None, description="Adapter directory on a PVC.")
    from_fine_tune: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253, description="An InternVLFineTune's (unmerged) adapter."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "AdapterSpec":
        if (self.pvc is None) == (self.from_fine_tune is None):
            raise ValueError(RULE_ADAPTER_ONE_SOURCE.message)
        return self


class InternVLServiceSpec(ServingOptions):
    model: ServiceModel = Field(description="The model to serve.")
    adapters: list[AdapterSpec] | None = Field(
        default=None,
        max_length=32,
        description="LoRA adapters served next to the base model; clients pick one by name.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


# --------------------------------------------------------------------------- status


class Condition(Spec):
    model_config = ConfigDict(extra="ignore")

    type: str = Field(max_length=64)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(default="", max_length=128)
    message: str = Field(default="", max_length=4096)
    last_transition_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    observed_generation: int | None = None


class FailureInfo(Spec):
    """The reason a pod failed, copied from the pod so nobody has to find it."""

    model_config = ConfigDict(extra="ignore")

    reason: str = Field(description="OOMKilled, ImagePullBackOff, Unschedulable, Error, DeadlineExceeded, ...")
    message: str = ""
    exit_code: int | None = None
    pod: str | None = None
    container: str | None = None
    log_tail: str | None = Field(default=None, description="The container's last log lines (tokens redacted).")


class ProgressInfo(Spec):
    model_config = ConfigDict(extra="ignore")

    step: int | None = None
    total_steps: int | None = None
    summary: str | None = Field(default=None, description="'step/total' for kubectl get.")
    loss: float | None = None
    epoch: float | None = None
    learning_rate: float | None = None
    samples_per_second: float | None = None
    tokens_per_second: float | None = None


class FineTuneOutputs(Spec):
    model_config = ConfigDict(extra="ignore")

    claim_name: str | None = Field(default=None, description="The output PVC.")
    directory: str | None = Field(default=None, description="The run's directory on that PVC.")
    checkpoint_path: str | None = Field(default=None, description="Last checkpoint, relative to the PVC root.")
    merged_model_path: str | None = Field(default=None, description="Merged model, relative to the PVC root.")
    model_path: str | None = Field(default=None, description="What to serve: merged model or full checkpoint.")
    adapter_path: str | None = Field(default=None, description="LoRA adapter (unmerged), relative to the PVC root.")


PHASE_ENUM = {"enum": list(constants.PHASES)}


class InternVLFineTuneStatus(Spec):
    model_config = ConfigDict(extra="ignore")

    phase: str | None = Field(default=None, description="Where the run is.", json_schema_extra=PHASE_ENUM)
    message: str | None = Field(default=None, max_length=4096, description="What is happening, or what to fix.")
    conditions: list[Condition] | None = Field(
        default=None,
        description="SpecValid, DatasetValidated, TrainingSucceeded, MergeSucceeded, ServiceCreated, Suspended, Complete, Failed.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, description="metadata.generation this status describes.")
    start_time: str | None = Field(default=None, description="First reconcile.", json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(
        default=None, description="Training (and merge) finished.", json_schema_extra={"format": "date-time"}
    )
    gpus: int | None = Field(default=None, description="gpusPerNode * nodes.")
    progress: ProgressInfo | None = Field(default=None, description="From the worker's JSON progress lines (rank 0).")
    outputs: FineTuneOutputs | None = Field(default=None, description="Where the results are on the output PVC.")
    service_name: str | None = Field(default=None, description="The InternVLService created from spec.serve.")
    url: str | None = Field(default=None, description="That service's URL.")
    failure: FailureInfo | None = Field(default=None, description="Why the current stage's pod failed.")


class InternVLServiceStatus(Spec):
    model_config = ConfigDict(extra="ignore")

    phase: str | None = Field(default=None, description="Pending, Serving or Failed.", json_schema_extra=PHASE_ENUM)
    message: str | None = Field(default=None, max_length=4096, description="What is happening, or what to fix.")
    conditions: list[Condition] | None = Field(
        default=None,
        description="Ready: True once a replica passes /ready; False with the pod's reason otherwise.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, description="metadata.generation this status describes.")
    replicas: int | None = Field(default=None, description="Pods of the Deployment.")
    ready_replicas: int | None = Field(default=None, description="Pods passing the readiness probe.")
    url: str | None = Field(default=None, description="In-cluster URL (TGI at /, OpenAI at /v1).")
    model: str | None = Field(default=None, description="What is served (path or hub id).")
    failure: FailureInfo | None = Field(default=None, description="Why a replica is failing.")


# --------------------------------------------------------------------------- whole objects


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] | None = None


class _CustomResource(BaseModel):
    """What both kinds share: metadata, and name/namespace as the handlers use them."""

    model_config = ConfigDict(extra="ignore")

    metadata: ObjectMeta

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"


class InternVLFineTune(_CustomResource):
    spec: InternVLFineTuneSpec
    status: InternVLFineTuneStatus = Field(default_factory=InternVLFineTuneStatus)


class InternVLService(_CustomResource):
    spec: InternVLServiceSpec
    status: InternVLServiceStatus = Field(default_factory=InternVLServiceStatus)
