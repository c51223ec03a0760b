"""Operator settings, read once from environment variables prefixed INTERNVL_OPERATOR_.

Example: INTERNVL_OPERATOR_NAMESPACES=ml,ml-staging INTERNVL_OPERATOR_WORKER_IMAGE=registry/worker:0.1.1
Lists are comma-separated; resource maps are JSON (INTERNVL_OPERATOR_DATACHECK_RESOURCES='{"requests": {...}}').
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INTERNVL_OPERATOR_", extra="ignore")

    #: Namespaces to watch; empty = the whole cluster (needs a ClusterRole).
    namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: The image with the `internvl` CLI that runs data check, training, merge and `engine: worker` serving.
    worker_image: str = "ghcr.io/internvl-operator/worker:0.1.0"
    #: The image for `engine: vllm` services (the vLLM OpenAI server; its entrypoint takes the args we pass).
    vllm_image: str = "vllm/vllm-openai:v0.11.0"
    #: imagePullPolicy of every container the operator creates.
    image_pull_policy: str = "IfNotPresent"
    #: Resources of the CPU data-check pod. It tokenizes every row, so memory grows with the tokenizer only.
    datacheck_resources: dict = Field(
        default_factory=lambda: {
            "requests": {"cpu": "1", "memory": "2Gi"},
            "limits": {"memory": "8Gi"},
        }
    )
    #: Resources of the merge pod. Merging LoRA into a 26B bf16 model holds ~52 GB of weights in RAM.
    merge_resources: dict = Field(
        default_factory=lambda: {
            "requests": {"cpu": "2", "memory": "16Gi"},
            "limits": {"memory": "96Gi"},
        }
    )
    #: CPU/memory added to training pods when the CR leaves `resources` empty (GPUs come from gpusPerNode).
    train_default_resources: dict = Field(
        default_factory=lambda: {"requests": {"cpu": "8", "memory": "64Gi"}}
    )
    #: The extended resource that GPU pods request (e.g. amd.com/gpu, or a MIG profile like nvidia.com/mig-3g.40gb).
    gpu_resource_name: str = "nvidia.com/gpu"
    #: /dev/shm size for training and serving pods: NCCL and DataLoader workers need more than the 64 MiB default.
    shm_size: str = "16Gi"
    #: Seconds between status polls of running fine-tunes and services (progress, pod failures).
    poll_interval_s: float = 15.0
    #: Reject model types that the worker registry does not list (constants.KNOWN_MODEL_TYPES).
    strict_model_types: bool = True
    #: Port of the liveness endpoint (kopf's /healthz); 0 turns it off.
    liveness_port: int = 8081
    #: Port of the Prometheus /metrics endpoint; 0 turns it off.
    metrics_port: int = 9090
    #: Use kopf peering (several operator replicas, one active). Off = `--standalone`.
    peering: str = ""
    #: Seconds the operator waits for one Kubernetes API answer before giving up on it (and retrying the reconcile).
    api_timeout_s: float = 30.0
    #: Cluster DNS suffix used in status.url.
    cluster_domain: str = "cluster.local"

    @field_validator("namespaces", mode="before")
    @classmethod
    def _namespaces_from_csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("image_pull_policy")
    @classmethod
    def _known_pull_policy(cls, value: str) -> str:
        if value not in ("Always", "IfNotPresent", "Never"):
            raise ValueError(f"image_pull_policy must be Always, IfNotPresent or Never, got {value!r}")
        return value


def load_settings() -> OperatorSettings:
    return OperatorSettings()
