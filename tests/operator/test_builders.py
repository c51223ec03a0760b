"""Builders as plain data: every manifest passes strict Kubernetes 1.30 validation and says what the contract says."""

from __future__ import annotations

import json

import pytest

from internvl_operator import api, builders, constants as c
from internvl_operator.settings import OperatorSettings

from operator_helpers import finetune_body, service_body, validate_manifest

SETTINGS = OperatorSettings(worker_image="reg.example/worker:9", vllm_image="reg.example/vllm:1")


def ft_of(**spec):
    return api.InternVLFineTune.model_validate(finetune_body(**spec))


def svc_of(**spec):
    return api.InternVLService.model_validate(service_body(**spec))


def container(manifest):
    return manifest["spec"]["template"]["spec"]["containers"][0]


def env_of(manifest):
    return {e["name"]: e for e in container(manifest)["env"]}


def arg(args, flag):
    return args[args.index(flag) + 1]


FINETUNES = {
    "lora-1gpu": {},
    "full-zero2-2x2": {"method": "full", "gpusPerNode": 2, "nodes": 2, "deepspeed": "zero2", "queueName": "gpu"},
    "hub-token": {"model": {"modelType": "internvl3-1b", "hubId": "OpenGVLab/InternVL3-1B-hf", "hubTokenSecret": {"name": "hf"}}},
    "configmap-data": {"dataset": {"configMap": {"name": "d"}, "files": ["a.jsonl"], "validationFiles": ["v.jsonl"]}},
    "cpu-only-short-run": {"gpusPerNode": 0, "training": {"maxSteps": 8, "loggingSteps": 1, "dataloaderWorkers": 0}},
    "placement": {
        "placement": {
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
            "priorityClassName": "high",
        },
        "resources": {"requests": {"cpu": 8, "memory": "64Gi"}},
        "activeDeadlineSeconds": 3600,
        "ttlSecondsAfterFinished": 60,
    },
}


@pytest.mark.parametrize("spec", FINETUNES.values(), ids=FINETUNES.keys())
def test_every_finetune_manifest_is_valid_kubernetes(spec):
    ft = ft_of(**spec)
    manifests = [
        builders.build_datacheck_job(ft, SETTINGS),
        builders.build_train_job(ft, SETTINGS),
        builders.build_rendezvous_service(ft),
    ]
    if ft.spec.effective_merge:
        manifests.append(builders.build_merge_job(ft, SETTINGS))
    for manifest in manifests:
        validate_manifest(manifest)
        assert manifest["metadata"]["namespace"] == "ml"
        assert manifest["metadata"]["labels"][c.LABEL_FINETUNE] == "tiny"


SERVICES = {
    "worker-pvc": {},
    "worker-hub-adapters-key": {
        "model": {"hubId": "OpenGVLab/InternVL3-2B-hf", "hubTokenSecret": {"name": "hf", "key": "t"}},
        "adapters": [{"name": "a", "pvc": {"claimName": "ck", "path": "x/checkpoint-5"}}, {"name": "b", "pvc": {"claimName": "ck2"}}],
        "apiKeySecret": {"name": "k"},
        "maxConcurrentRequests": 8,
        "autoscaling": {"minReplicas": 1, "maxReplicas": 3, "metricName": "internvl_queue_size", "targetAverageValue": "2"},
        "disruptionBudget": {"minAvailable": 1},
    },
    "vllm": {"engine": "vllm", "gpus": 2, "vllm": {"maxModelLen": 8192, "extraArgs": ["--enforce-eager"]},
             "apiKeySecret": {"name": "k"}, "autoscaling": {"maxReplicas": 2}},
    "cpu-only": {"gpus": 0, "resources": {"requests": {"cpu": "2"}}, "replicas": 0},
}


@pytest.mark.parametrize("spec", SERVICES.values(), ids=SERVICES.keys())
def test_every_serving_manifest_is_valid_kubernetes(spec):
    svc = svc_of(**spec)
    children = builders.build_serving_children(svc, SETTINGS)
    assert [m["kind"] for m in children][:2] == ["Deployment", "Service"]
    for manifest in children:
        validate_manifest(manifest)


def test_strict_validation_catches_a_typo():
    job = builders.build_train_job(ft_of(), SETTINGS)
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(Exception, match="restartPolicyy"):
        validate_manifest(job)


# --------------------------------------------------------------------------- the worker CLI contract


def test_datacheck_job_runs_internvl_data_check_on_cpu():
    job = builders.build_datacheck_job(ft_of(dataset={"pvc": {"claimName": "data"}, "files": ["a.jsonl", "b.jsonl"]}), SETTINGS)
    ctr = container(job)
    assert ctr["command"] == ["internvl"]
    assert ctr["args"][:4] == ["data", "check", "/data/a.jsonl", "/data/b.jsonl"]
    assert arg(ctr["args"], "--report") == "/output/tiny/datacheck.json"
    assert arg(ctr["args"], "--model_id_or_path") == "/models/InternVL3-1B-hf"
    assert arg(ctr["args"], "--max_length") == "2048"
    assert "nvidia.com/gpu" not in json.dumps(ctr["resources"])
    assert job["spec"]["backoffLimit"] == 0
    assert ctr["image"] == "reg.example/worker:9"


def test_train_job_single_node_contract():
    job = builders.build_train_job(ft_of(), SETTINGS)
    ctr = container(job)
    args = ctr["args"]
    assert ctr["command"] == ["torchrun"]
    assert args[args.index("-m") + 1 : args.index("-m") + 3] == ["internvl_worker.cli", "sft"]
    assert arg(args, "--resume_from_checkpoint") == "latest"
    assert arg(args, "--output_dir") == "/output/tiny"
    assert arg(args, "--add_output_dir_suffix") == "false"
    assert arg(args, "--sft_type") == "lora"
    assert arg(args, "--lora_rank") == "8" and arg(args, "--lora_alpha") == "32" and arg(args, "--lora_dropout") == "0.05"
    assert arg(args, "--lora_target_modules") == "DEFAULT"
    assert arg(args, "--learning_rate") == "0.0001"
    assert "--deepspeed" not in args
    env = env_of(job)
    assert env["MASTER_ADDR"]["value"] == "127.0.0.1" and env["NNODES"]["value"] == "1"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # $(VAR) in args is expanded by the kubelet only for variables declared in env.
    for ref in ("$(NODE_RANK)", "$(MASTER_ADDR)", "$(NNODES)", "$(NPROC_PER_NODE)", "$(MASTER_PORT)"):
        assert ref in args and ref[2:-1] in env
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 1
    assert "subdomain" not in job["spec"]["template"]["spec"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in ctr["volumeMounts"]


def test_train_job_multi_node_uses_indexed_job_and_headless_service():
    ft = ft_of(method="full", gpusPerNode=2, nodes=2, deepspeed="zero2", queueName="gpu")
    job = builders.build_train_job(ft, SETTINGS)
    svc = builders.build_rendezvous_service(ft)
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    # Node 0's DNS name: <job>-0.<headless service>
    assert env_of(job)["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert env_of(job)["NPROC_PER_NODE"]["value"] == "2"
    # The Service selects exactly the training pods.
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())
    args = container(job)["args"]
    assert arg(args, "--deepspeed") == "default-zero2" and arg(args, "--sft_type") == "full"
    assert "--lora_rank" not in args
    assert job["metadata"]["labels"][c.LABEL_KUEUE_QUEUE] == "gpu"
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_hub_token_comes_from_a_secret_never_from_args():
    ft = ft_of(model={"modelType": "internvl3-1b", "hubId": "OpenGVLab/InternVL3-1B-hf", "hubTokenSecret": {"name": "hf", "key": "tok"}})
    for job in (builders.build_datacheck_job(ft, SETTINGS), builders.build_train_job(ft, SETTINGS), builders.build_merge_job(ft, SETTINGS)):
        env = env_of(job)
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "tok"}
        assert "hf" not in " ".join(container(job)["args"]).split()
        assert env["HF_HOME"]["value"].startswith("/output/")  # one download shared by all stages
    assert arg(container(builders.build_train_job(ft, SETTINGS))["args"], "--model_id_or_path") == "OpenGVLab/InternVL3-1B-hf"


def test_configmap_dataset():
    ft = ft_of(dataset={"configMap": {"name": "d"}, "files": ["a.jsonl"], "validationFiles": ["v.jsonl"]})
    job = builders.build_train_job(ft, SETTINGS)
    assert {"name": "data", "configMap": {"name": "d"}} in job["spec"]["template"]["spec"]["volumes"]
    assert arg(container(job)["args"], "--dataset") == "/data/a.jsonl"
    assert arg(container(job)["args"], "--val_dataset") == "/data/v.jsonl"


def test_cpu_only_training_has_one_process_and_no_gpu():
    ft = ft_of(gpusPerNode=0, training={"maxSteps": 8, "loggingSteps": 1, "dataloaderWorkers": 0})
    job = builders.build_train_job(ft, SETTINGS)
    trainer = container(job)
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["NPROC_PER_NODE"] == "1"
    assert "nvidia.com/gpu" not in json.dumps(trainer["resources"])
    args = trainer["args"]
    assert (arg(args, "--max_steps"), arg(args, "--logging_steps"), arg(args, "--dataloader_num_workers")) == ("8", "1", "0")
    # Unset knobs leave the worker's defaults alone.
    default_args = container(builders.build_train_job(ft_of(), SETTINGS))["args"]
    assert not {"--max_steps", "--logging_steps", "--dataloader_num_workers"} & set(default_args)
    assert container(builders.build_train_job(ft_of(), SETTINGS))["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_merge_job_exports_latest_checkpoint():
    job = builders.build_merge_job(ft_of(), SETTINGS)
    assert container(job)["args"] == ["export", "--ckpt_dir", "latest", "--output_dir", "/output/tiny", "--merge_lora", "true"]


def test_cpu_jobs_skip_gpu_node_selection_but_training_keeps_it():
    ft = ft_of(placement={"nodeSelector": {"gpu": "h100"}, "serviceAccountName": "trainer"})
    assert builders.build_train_job(ft, SETTINGS)["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "h100"}
    datacheck = builders.build_datacheck_job(ft, SETTINGS)["spec"]["template"]["spec"]
    assert "nodeSelector" not in datacheck and datacheck["serviceAccountName"] == "trainer"


def test_generation_label_marks_which_spec_made_a_job():
    body = finetune_body()
    body["metadata"]["generation"] = 7
    job = builders.build_train_job(api.InternVLFineTune.model_validate(body), SETTINGS)
    assert job["metadata"]["labels"][builders.GENERATION_LABEL] == "7"
    assert builders.GENERATION_LABEL not in job["spec"]["template"]["metadata"]["labels"]


# --------------------------------------------------------------------------- names


def test_child_names_are_deterministic_and_fit():
    long = "a" * 250
    other = "a" * 249 + "b"
    for fn in (builders.datacheck_job_name, builders.train_job_name, builders.merge_job_name):
        assert fn(long) == fn(long)
        assert len(fn(long)) <= c.MAX_JOB_NAME_LENGTH
        assert fn(long) != fn(other)  # the hash keeps two long parents apart
    assert builders.train_job_name("tiny") == "tiny-train"
    name = builders.train_job_name(long)
    assert name.endswith("-train") and len(f"{name}-123456") <= 63  # Indexed Job pod hostname fits
    assert len(builders.serving_name(long)) <= 63
    assert builders.serving_name("1chat")[0].isalpha()  # Service names must start with a letter


# --------------------------------------------------------------------------- serving


def test_worker_deployment_contract():
    svc = svc_of(
        adapters=[{"name": "a", "pvc": {"claimName": "models", "path": "ad"}}, {"name": "b", "pvc": {"claimName": "ck", "path": "x"}}],
        apiKeySecret={"name": "key"},
        maxConcurrentRequests=4,
    )
    dep = builders.build_deployment(svc, SETTINGS)
    ctr = container(dep)
    assert ctr["command"] == ["internvl"]
    args = ctr["args"]
    assert args[0] == "serve" and arg(args, "--model_id_or_path") == "/models/m"
    assert arg(args, "--adapters") == "a=/models/ad,b=/adapters/0/x"
    assert arg(args, "--host") == "0.0.0.0" and arg(args, "--port") == "8080"
    assert arg(args, "--api-key-file") == "/secrets/key" and arg(args, "--max-concurrent-requests") == "4"
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/health"
    # 1800 s of model loading allowed before liveness may restart the pod.
    assert ctr["startupProbe"]["periodSeconds"] * ctr["startupProbe"]["failureThreshold"] >= 1800
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert dep["spec"]["replicas"] == 1
    service = builders.build_service(svc)
    assert service["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert all(dep["spec"]["template"]["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())


def test_model_change_changes_the_pod_template_so_the_deployment_rolls():
    a = builders.build_deployment(svc_of(model={"pvc": {"claimName": "models", "path": "v1"}}), SETTINGS)
    b = builders.build_deployment(svc_of(model={"pvc": {"claimName": "models", "path": "v2"}}), SETTINGS)
    assert a["spec"]["template"] != b["spec"]["template"]


def test_vllm_deployment():
    svc = svc_of(engine="vllm", gpus=2, vllm={"maxModelLen": 8192, "extraArgs": ["--enforce-eager"]}, apiKeySecret={"name": "k"},
                 adapters=[{"name": "a", "pvc": {"claimName": "models", "path": "ad"}}])  # fmt: skip
    dep = builders.build_deployment(svc, SETTINGS)
    ctr = container(dep)
    assert ctr["image"] == "reg.example/vllm:1"
    args = ctr["args"]
    assert arg(args, "--model") == "/models/m" and arg(args, "--tensor-parallel-size") == "2"
    assert arg(args, "--max-model-len") == "8192" and args[-1] == "--enforce-eager"
    assert "--enable-lora" in args and arg(args, "--lora-modules") == "a=/models/ad"
    assert env_of(dep)["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "k"
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_hpa_owns_replicas_and_pdb():
    svc = svc_of(autoscaling={"minReplicas": 2, "maxReplicas": 5}, disruptionBudget={"maxUnavailable": 1})
    dep = builders.build_deployment(svc, SETTINGS)
    assert "replicas" not in dep["spec"]
    hpa = builders.build_hpa(svc)
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 80
    assert builders.build_pdb(svc)["spec"]["maxUnavailable"] == 1
    assert builders.build_hpa(svc_of()) is None and builders.build_pdb(svc_of()) is None


def test_service_url():
    assert builders.service_url("chat", "ml", SETTINGS) == "http://chat.ml.svc.cluster.local"


# --------------------------------------------------------------------------- fine-tune -> service


def test_service_cr_serves_the_merged_model():
    ft = ft_of(serve={"replicas": 2, "engine": "worker"})
    cr = builders.build_service_cr(ft, checkpoint_path="tiny/checkpoint-10")
    assert cr["spec"]["model"] == {"pvc": {"claimName": "out", "path": "tiny/merged"}, "modelType": "internvl3-1b"}
    assert cr["spec"]["replicas"] == 2 and "adapters" not in cr["spec"]
    api.InternVLService.model_validate(cr)


def test_service_cr_serves_base_plus_adapter_without_merge():
    ft = ft_of(merge=False, serve={"name": "svc"})
    cr = builders.build_service_cr(ft, checkpoint_path="tiny/checkpoint-10")
    assert cr["metadata"]["name"] == "svc"
    assert cr["spec"]["model"]["pvc"] == {"claimName": "models", "path": "InternVL3-1B-hf"}
    assert cr["spec"]["adapters"] == [{"name": "tiny", "pvc": {"claimName": "out", "path": "tiny/checkpoint-10"}}]


def test_service_cr_of_a_full_finetune_serves_its_checkpoint():
    cr = builders.build_service_cr(ft_of(method="full", serve={}), checkpoint_path="tiny/checkpoint-3")
    assert cr["spec"]["model"]["pvc"]["path"] == "tiny/checkpoint-3"
    with pytest.raises(ValueError, match="checkpoint"):
        builders.build_service_cr(ft_of(method="full", serve={}), checkpoint_path=None)


def test_unresolved_fine_tune_reference_is_refused():
    ft = ft_of(model={"modelType": "internvl3-1b", "fromFineTune": "other"})
    with pytest.raises(ValueError, match="resolved"):
        builders.build_train_job(ft, SETTINGS)


def test_gpu_resource_name_comes_from_settings():
    """A cluster with AMD GPUs or MIG slices names its GPU resource differently: the setting decides."""
    from internvl_operator import builders
    from internvl_operator.settings import OperatorSettings

    custom = SETTINGS.model_copy(update={"gpu_resource_name": "nvidia.com/mig-3g.40gb"})
    limits = container(builders.build_train_job(ft_of(), custom))["resources"]["limits"]
    assert limits.get("nvidia.com/mig-3g.40gb") == 1 and "nvidia.com/gpu" not in limits
    assert OperatorSettings().gpu_resource_name == "nvidia.com/gpu"


def test_worker_containers_report_their_last_log_lines_when_they_fail():
    """A failing worker's last line ("internvl: error: GPU out of memory at step 3 ...") becomes the container's
    termination message, which status copies onto the custom resource."""
    ft = ft_of()
    jobs = [builders.build_datacheck_job(ft, SETTINGS), builders.build_train_job(ft, SETTINGS), builders.build_merge_job(ft, SETTINGS), builders.build_deployment(svc_of(), SETTINGS)]
    assert [container(j)["terminationMessagePolicy"] for j in jobs] == ["FallbackToLogsOnError"] * 4


@pytest.mark.parametrize("value", [None, True, False])
def test_gradient_checkpointing_flag_only_when_set(value):
    training = {} if value is None else {"gradientCheckpointing": value}
    args = container(builders.build_train_job(ft_of(training=training), SETTINGS))["args"]
    if value is None:  # unset: the worker's own default (auto: as many layers as memory needs)
        assert "--gradient_checkpointing" not in args
    else:
        assert arg(args, "--gradient_checkpointing") == str(value).lower()
