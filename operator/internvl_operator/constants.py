"""Names shared by the CRDs, the builders and the handlers: one place, so they cannot drift apart."""

GROUP = "internvl.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

FINETUNE_KIND = "InternVLFineTune"
FINETUNE_PLURAL = "internvlfinetunes"
SERVICE_KIND = "InternVLService"
SERVICE_PLURAL = "internvlservices"

# kubectl get internvl -> both kinds; `kubectl get all` is deliberately not joined (GPU jobs are not "all").
CATEGORY = "internvl"

# Labels on every child so `kubectl get jobs,pods -l internvl.ai/finetune=<name>` finds a run's pieces.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "internvl-operator"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_FINETUNE = f"{GROUP}/finetune"
LABEL_SERVICE = f"{GROUP}/service"
# Kueue admits a Job when this label names a LocalQueue (kueue.sigs.k8s.io/docs/tasks/run/jobs).
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"

# The Job controller writes the completion index here; NODE_RANK reads it through the downward API.
ANNOTATION_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

# Component names, also the suffixes of the children's names.
COMPONENT_DATACHECK = "datacheck"
COMPONENT_TRAIN = "train"
COMPONENT_MERGE = "merge"
COMPONENT_SERVE = "serve"

# Fixed mount points: the worker CLI contract names these paths.
MODELS_MOUNT = "/models"
DATA_MOUNT = "/data"
OUTPUT_MOUNT = "/output"
SECRETS_MOUNT = "/secrets"
ADAPTERS_MOUNT = "/adapters"
# Hub downloads are cached on the output PVC, so datacheck, train and merge pods fetch the base model once.
HF_HOME = f"{OUTPUT_MOUNT}/.cache/huggingface"

WORKER_PORT = 8080  # `internvl serve --port 8080` and vLLM's --port
SERVICE_PORT = 80  # the ClusterIP Service port users call
RENDEZVOUS_PORT = 29500  # torchrun's default master port

# Kubernetes name limits: DNS-1123 labels (Services, pod hostnames, label values) are 63 characters.
MAX_NAME_LENGTH = 63
# An Indexed Job's pod hostname is "<job>-<index>", which must itself fit 63 characters, and the
# Job controller also puts the name into a label value; 56 leaves room for "-" + a 6-digit index.
MAX_JOB_NAME_LENGTH = 56

# Model types of the worker's registry (worker/internvl_worker/registry.py; a test keeps the two equal).
# Copied, not imported: the operator image does not ship the worker. An unknown type fails the CR before any pod.
KNOWN_MODEL_TYPES = (
    "internvl-chat-v1_5",
    "internvl-chat-v1_5-int8",
    "internvl-tiny",
    "internvl2-1b",
    "internvl2-26b",
    "internvl2-2b",
    "internvl2-40b",
    "internvl2-4b",
    "internvl2-8b",
    "internvl2-llama3-76b",
    "internvl2_5-1b",
    "internvl2_5-26b",
    "internvl2_5-2b",
    "internvl2_5-38b",
    "internvl2_5-4b",
    "internvl2_5-78b",
    "internvl2_5-8b",
    "internvl3-14b",
    "internvl3-1b",
    "internvl3-2b",
    "internvl3-38b",
    "internvl3-78b",
    "internvl3-8b",
    "internvl3-9b",
    "internvl3_5-14b",
    "internvl3_5-1b",
    "internvl3_5-2b",
    "internvl3_5-38b",
    "internvl3_5-4b",
    "internvl3_5-8b",
    "mini-internvl-chat-2b-v1_5",
    "mini-internvl-chat-4b-v1_5",
)

# Phases (status.phase) and condition types, as printed by `kubectl get`.
PHASE_PENDING = "Pending"
PHASE_VALIDATING = "Validating"
PHASE_TRAINING = "Training"
PHASE_MERGING = "Merging"
PHASE_SERVING = "Serving"
PHASE_SUCCEEDED = "Succeeded"
PHASE_FAILED = "Failed"
PHASE_SUSPENDED = "Suspended"
PHASES = (
    PHASE_PENDING,
    PHASE_VALIDATING,
    PHASE_TRAINING,
    PHASE_MERGING,
    PHASE_SERVING,
    PHASE_SUCCEEDED,
    PHASE_FAILED,
    PHASE_SUSPENDED,
)

COND_SPEC_VALID = "SpecValid"
COND_DATASET_VALIDATED = "DatasetValidated"
COND_TRAINING = "TrainingSucceeded"
COND_MERGE = "MergeSucceeded"
COND_SERVICE_CREATED = "ServiceCreated"
COND_SUSPENDED = "Suspended"
COND_COMPLETE = "Complete"
COND_FAILED = "Failed"
COND_READY = "Ready"

# Labels and status are printed; keep the recent-log excerpt on a CR small (etcd objects are <= 1.5 MB).
LOG_TAIL_LINES = 20
MAX_STATUS_LOG_CHARS = 2000
