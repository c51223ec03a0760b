"""The Helm chart, rendered by the real `helm` binary: lint, strict Kubernetes 1.30 validation of every
rendered object, the values schema, the CRD copy, the operator pod's hardening and its settings."""

from __future__ import annotations

import json
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import CHART, K8S_VERSION, RELEASE_NS, REPO, by_kind, helm, one, render, render_text

# Non-default values that switch on every optional template; each must render valid objects.
VARIANTS = {
    "default": {},
    "namespaced": {"watchNamespaces": ["ml", "ml-staging"]},
    "namespaced-minimal": {
        "watchNamespaces": ["ml"],
        "rbac": {"clusterReads": False},
        "crds": {"install": False},
        "serviceAccount": {"create": False, "name": "internvl-runner"},
        "metrics": {"service": {"enabled": False}},
    },
    "everything": {
        "replicaCount": 2,
        "peering": {"enabled": True, "name": "internvl"},
        "image": {"digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "system-cluster-critical",
        "crds": {"keep": False},
        "worker": {"image": "registry.example/worker:1.2.3", "gpuResourceName": "amd.com/gpu", "shmSize": "32Gi",
                   "imagePullPolicy": "Always"},
        "operator": {"pollIntervalSeconds": 2.5, "strictModelTypes": False, "verbose": True,
                     "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]},
        "podAnnotations": {"example.com/team": "ml"},
        "podLabels": {"team": "ml"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "serviceAccount": {"annotations": {"iam.example.com/role": "internvl"}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                    "podMonitor": {"enabled": True}},
    },
    "namespaced-peering-monitors": {
        "watchNamespaces": ["ml"],
        "replicaCount": 3,
        "peering": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
    },
}
# Kinds whose schemas are CRDs that kubernetes-validate does not know: checked by hand below.
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "KopfPeering", "ClusterKopfPeering"}


def test_helm_lint_strict():
    helm("lint", "--strict", str(CHART))
    for name in ("namespaced-minimal", "everything"):
        out = render_text(VARIANTS[name])  # writes the values file that lint reads too
        assert out.returncode == 0
        path = [a for a in out.args if a.endswith(".json")][0]
        helm("lint", "--strict", str(CHART), "--values", path)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_objects_are_valid_kubernetes_1_30(variant):
    objs = render(VARIANTS[variant])
    assert objs
    for obj in objs:
        where = f"{variant}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CUSTOM_KINDS:
            assert obj["apiVersion"] in ("monitoring.coreos.com/v1", "kopf.dev/v1"), where
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{where}: {exc.message} at {list(exc.path)}") from exc
        assert len(obj["metadata"]["name"]) <= 63 or obj["kind"] == "CustomResourceDefinition", where


def test_default_install_objects():
    objs = render()
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(["ServiceAccount", "CustomResourceDefinition", "CustomResourceDefinition", "ClusterRole",
                            "ClusterRoleBinding", "Service", "Deployment"])
    for obj in objs:
        if obj["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == RELEASE_NS, obj["kind"]


def test_fullname_is_cut_to_63_characters():
    objs = render({"fullnameOverride": "x" * 63})
    assert one(objs, "Deployment")["metadata"]["name"] == "x" * 63
    # 53 characters is Helm's longest release name; "<release>-internvl-operator" would be 71.
    long_release = helm("template", "r" * 53, str(CHART), "--kube-version", K8S_VERSION)
    for obj in yaml.safe_load_all(long_release.stdout):
        if obj and obj["kind"] in ("Deployment", "Service", "ServiceAccount"):
            name = obj["metadata"]["name"]
            assert len(name) <= 63 and not name.endswith("-"), name
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# --------------------------------------------------------------------------- operator pod


def _container(objs):
    dep = one(objs, "Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, container


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_operator_pod_is_hardened(variant):
    dep, container = _container(render(VARIANTS[variant]))
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    # The probes reach the port the operator serves Kopf's /healthz on.
    assert str(ports["health"]) == env["INTERNVL_OPERATOR_LIVENESS_PORT"]
    assert str(ports["metrics"]) == env["INTERNVL_OPERATOR_METRICS_PORT"]
    assert ":latest" not in container["image"]


def test_priority_class_digest_and_peering_values_reach_the_pod():
    dep, container = _container(render(VARIANTS["everything"]))
    pod = dep["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert container["image"] == "ghcr.io/internvl-operator/operator@sha256:" + "a" * 64
    assert dep["spec"]["replicas"] == 2 and "strategy" not in dep["spec"]  # peering: rolling update is safe
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["INTERNVL_OPERATOR_PEERING"] == "internvl"
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    assert container["args"] == ["--verbose"]
    default_dep, _ = _container(render())
    assert default_dep["spec"]["strategy"] == {"type": "Recreate"}  # standalone: never two at once


def _operator_env(objs) -> dict[str, str]:
    _, container = _container(objs)
    return {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("INTERNVL_OPERATOR_")}


# Variables the chart sets that the operator does not read yet (operator change requested; see README.md).
# When settings.py gains the field, this test fails until the name is removed here.
PENDING_OPERATOR_SETTINGS: set[str] = set()


def test_every_operator_setting_is_set_and_every_variable_is_read():
    from internvl_operator.settings import OperatorSettings

    env = _operator_env(render())
    fields = {f"INTERNVL_OPERATOR_{name.upper()}" for name in OperatorSettings.model_fields}
    assert set(env) - PENDING_OPERATOR_SETTINGS == fields, "chart env and operator settings differ"
    assert not PENDING_OPERATOR_SETTINGS & fields, "the operator reads these now: remove them from PENDING"


@pytest.mark.parametrize("variant", ["default", "everything", "namespaced"])
def test_operator_parses_the_rendered_settings(variant, monkeypatch):
    """The chart's env, read by the operator's own settings class, gives the values that went in."""
    from internvl_operator.settings import OperatorSettings

    for key in list(__import__("os").environ):
        if key.startswith("INTERNVL_OPERATOR_"):
            monkeypatch.delenv(key)
    values = VARIANTS[variant]
    for key, value in _operator_env(render(values)).items():
        monkeypatch.setenv(key, value)
    settings = OperatorSettings()
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    worker = {**defaults["worker"], **values.get("worker", {})}
    operator = {**defaults["operator"], **values.get("operator", {})}
    assert settings.namespaces == values.get("watchNamespaces", [])
    assert settings.worker_image == worker["image"] and settings.vllm_image == worker["vllmImage"]
    assert settings.image_pull_policy == worker["imagePullPolicy"]
    assert settings.shm_size == worker["shmSize"]
    assert settings.datacheck_resources == worker["datacheckResources"]
    assert settings.merge_resources == worker["mergeResources"]
    assert settings.train_default_resources == worker["trainDefaultResources"]
    assert settings.poll_interval_s == operator["pollIntervalSeconds"]
    assert settings.strict_model_types == operator["strictModelTypes"]
    assert settings.liveness_port == operator["healthPort"] and settings.metrics_port == operator["metricsPort"]
    assert settings.cluster_domain == operator["clusterDomain"]
    peering = values.get("peering", {})
    assert settings.peering == (peering.get("name", "internvl-operator") if peering.get("enabled") else "")


def test_chart_defaults_equal_the_operator_defaults():
    from internvl_operator.settings import OperatorSettings

    fresh = OperatorSettings.model_fields
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    expect = {
        "worker_image": values["worker"]["image"], "vllm_image": values["worker"]["vllmImage"],
        "image_pull_policy": values["worker"]["imagePullPolicy"], "shm_size": values["worker"]["shmSize"],
        "datacheck_resources": values["worker"]["datacheckResources"],
        "merge_resources": values["worker"]["mergeResources"],
        "train_default_resources": values["worker"]["trainDefaultResources"],
        "poll_interval_s": values["operator"]["pollIntervalSeconds"],
        "strict_model_types": values["operator"]["strictModelTypes"],
        "liveness_port": values["operator"]["healthPort"], "metrics_port": values["operator"]["metricsPort"],
        "cluster_domain": values["operator"]["clusterDomain"],
    }
    for name, value in expect.items():
        field = fresh[name]
        default = field.default_factory() if field.default_factory else field.default
        assert default == value, f"values.yaml {name}: chart {value!r} != operator {default!r}"


def test_settings_change_restarts_the_pod():
    a, _ = _container(render())
    b, _ = _container(render({"worker": {"image": "registry.example/worker:9.9.9"}}))
    key = "checksum/settings"
    assert a["spec"]["template"]["metadata"]["annotations"][key] != b["spec"]["template"]["metadata"]["annotations"][key]


# --------------------------------------------------------------------------- CRDs


def test_crd_copy_equals_generated_crds():
    """crds/ is the source (python -m internvl_operator.crdgen); the chart carries a byte-equal copy."""
    source = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    copy = {p.name: p.read_bytes() for p in (CHART / "crds-src").glob("*.yaml")}
    assert source, "crds/ is empty"
    assert copy == source, "charts/internvl-operator/crds-src differs from crds/: run `python charts/sync_crds.py`"


def test_rendered_crds_equal_the_source_plus_labels_and_keep():
    rendered = {o["metadata"]["name"]: o for o in by_kind(render(), "CustomResourceDefinition")}
    for path in sorted((REPO / "crds").glob("*.yaml")):
        source = yaml.safe_load(path.read_text())
        crd = rendered[source["metadata"]["name"]]
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        labels = crd["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels.items() >= source["metadata"].get("labels", {}).items()
        # Helm reads numbers as float64 and writes them back (1.0 comes out as 1): compare as data, where
        # 1 == 1.0, but a number that came back as text (1e+06) would differ.
        assert crd["spec"] == source["spec"], path.name
        assert {k: v for k, v in crd.items() if k != "metadata"} == {k: v for k, v in source.items() if k != "metadata"}


def test_crd_switches():
    assert not by_kind(render({"crds": {"install": False}}), "CustomResourceDefinition")
    for crd in by_kind(render({"crds": {"keep": False}}), "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})


# --------------------------------------------------------------------------- monitoring


def test_service_monitor_and_pod_monitor():
    objs = render(VARIANTS["everything"])
    svc = one(objs, "Service")
    sm = one(objs, "ServiceMonitor")
    pm = one(objs, "PodMonitor")
    dep, container = _container(objs)
    # ServiceMonitor -> metrics Service (labels) -> operator pod (selector) -> container port "metrics".
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert svc["spec"]["ports"][0]["targetPort"] in [p["name"] for p in container["ports"]]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # PodMonitor -> the serving pods the operator builds (same labels, port "http", /metrics).
    from internvl_operator import api, builders

    svc_cr = api.InternVLService.model_validate({
        "metadata": {"name": "chat", "namespace": "ml"},
        "spec": {"model": {"modelType": "internvl3-1b", "pvc": {"claimName": "models"}}},
    })
    serving = builders.build_deployment(svc_cr)
    pod_labels = serving["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = [p["name"] for p in serving["spec"]["template"]["spec"]["containers"][0]["ports"]]
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] in port_names
    assert serving["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    namespaced = one(render(VARIANTS["namespaced-peering-monitors"]), "PodMonitor")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    for mon in (sm, pm):
        for ep in mon["spec"].get("endpoints", []) + mon["spec"].get("podMetricsEndpoints", []):
            assert re.fullmatch(r"\d+s", ep["interval"]) and re.fullmatch(r"\d+s", ep["scrapeTimeout"])


def test_service_monitor_needs_the_metrics_service():
    proc = render_text({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}, check=False)
    assert proc.returncode != 0 and "metrics.serviceMonitor.enabled needs metrics.service.enabled" in proc.stderr


def test_peering_objects():
    cluster = render(VARIANTS["everything"])
    assert [o["metadata"]["name"] for o in by_kind(cluster, "ClusterKopfPeering")] == ["internvl"]
    namespaced = render(VARIANTS["namespaced-peering-monitors"])
    peerings = by_kind(namespaced, "KopfPeering")
    assert [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in peerings] == [("ml", "internvl-operator")]
    assert not by_kind(render(), "KopfPeering") and not by_kind(render(), "ClusterKopfPeering")


# --------------------------------------------------------------------------- values and schema


def _schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def _documented_keys() -> list[tuple[str, bool]]:
    """(dotted path, documented) for every key of values.yaml, read from the text.

    A key is documented when a comment block ends right above it. A block that starts with "# --"
    documents a value; when that value is a map (resources, securityContext, probes), the map is the
    value and its inner keys (Kubernetes' own) are not listed. A block without "--" heads a section of
    our own keys, each of which must be documented in turn.
    """
    lines = (CHART / "values.yaml").read_text().splitlines()
    out: list[tuple[str, bool]] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open parents
    skip_below: int | None = None
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        if skip_below is not None:
            if indent > skip_below:
                continue
            skip_below = None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        block = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.insert(0, lines[j].strip())
            j -= 1
        path = ".".join([k for _, k in stack] + [key])
        is_value = bool(block) and block[0].startswith("# --")
        opens_map = line.rstrip().endswith(":")
        if is_value or not opens_map:
            out.append((path, bool(block)))
            if opens_map:
                skip_below = indent
        else:
            if not block:
                out.append((path, False))
            stack.append((indent, key))
    return out


def test_values_yaml_passes_the_schema_and_the_schema_lists_every_key():
    schema = _schema()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(values, schema)

    def props(node, prefix=()):
        for key, sub in (node.get("properties") or {}).items():
            yield ".".join(prefix + (key,))
            yield from props(sub, prefix + (key,))

    documented = set(props(schema)) - {"global"}
    paths = set()
    for leaf, _ in _documented_keys():
        parts = leaf.split(".")
        paths.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    # Keys inside free-form maps (resources, securityContext, probes) are the user's, not the schema's.
    missing = {p for p in documented if p not in paths and not re.search(r"(Resources|resources|SecurityContext|Probe)\.", p)}
    assert not missing, f"schema keys with no default in values.yaml: {sorted(missing)}"


def test_every_value_has_a_comment():
    undocumented = [path for path, documented in _documented_keys() if not documented]
    assert not undocumented, f"values.yaml keys without a comment: {undocumented}"
    assert len(_documented_keys()) > 40


def test_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    missing = [path for path, _ in _documented_keys() if f"`{path}`" not in readme]
    assert not missing, f"values not in charts/internvl-operator/README.md: {missing}"


BAD_VALUES = [
    # (values, what the schema must name in its refusal)
    ({"watchNamespace": ["ml"]}, "watchNamespace"),  # typo of watchNamespaces: unknown keys are refused
    ({"watchNamespaces": ["ML_Team"]}, "ML_Team"),  # not a DNS-1123 label
    ({"watchNamespaces": "ml"}, "ml"),  # a string, not a list
    ({"image": {"tag": "latest"}}, "latest"),
    ({"image": {"digest": "sha256:abc"}}, "sha256:abc"),
    ({"image": {"pullPolicy": "Sometimes"}}, "Sometimes"),
    ({"replicaCount": 2}, "enabled"),  # several standalone replicas would reconcile twice
    ({"replicaCount": -1}, "-1"),
    ({"worker": {"gpuResourceName": "nvidia gpu"}}, "nvidia gpu"),
    ({"worker": {"shmSize": "lots"}}, "lots"),
    ({"worker": {"datacheckResources": {"requests": {"cpu": "one"}}}}, "one"),
    ({"worker": {"mergeResources": {"request": {"memory": "1Gi"}}}}, "request"),
    ({"operator": {"pollIntervalSeconds": 0}}, "0"),
    ({"operator": {"healthPort": 70000}}, "70000"),
    ({"operator": {"strictModelTypes": "yes"}}, "yes"),
    ({"crds": {"install": "true"}}, "true"),
    ({"rbac": {"namespaced": True}}, "namespaced"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
    ({"podSecurityContext": {"runAsUser": 0}}, "runAsUser"),
    ({"containerSecurityContext": {"allowPrivilegeEscalation": True}}, "allowPrivilegeEscalation"),
    ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "30 seconds"),
    ({"peering": {"name": "Internvl_Peering"}}, "Internvl_Peering"),
]


def _merged(overrides):
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(base, extra):
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value
        return base

    return merge(values, json.loads(json.dumps(overrides)))


@pytest.mark.parametrize("bad,needle", BAD_VALUES, ids=[json.dumps(b)[:60] for b, _ in BAD_VALUES])
def test_schema_refuses_bad_values(bad, needle):
    errors = list(jsonschema.Draft7Validator(_schema()).iter_errors(_merged(bad)))
    assert errors, f"schema accepted {bad}"
    text = " ".join(f"{list(e.absolute_path)} {e.message}" for e in errors)
    assert needle in text, text


@pytest.mark.parametrize("bad,needle", [
    ({"watchNamespace": ["ml"]}, "watchNamespace"),
    ({"image": {"tag": "latest"}}, "/image/tag"),
    ({"replicaCount": 2}, "/peering/enabled"),
])
def test_helm_enforces_the_schema(bad, needle):
    proc = render_text(bad, check=False)
    assert proc.returncode != 0, f"helm accepted {bad}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert needle in proc.stderr, proc.stderr


def test_ports_must_differ():
    proc = render_text({"operator": {"healthPort": 9090}}, check=False)
    assert proc.returncode != 0 and "must differ" in proc.stderr


def test_notes_name_next_steps():
    # `helm install --dry-run=client` renders NOTES.txt without a cluster.
    proc = helm("install", "ivl", str(CHART), "--dry-run=client", "--namespace", RELEASE_NS,
                "--set", "watchNamespaces={ml}")
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply -n ml -f" in notes and "finetune-lora-tiny.yaml" in notes
    assert "kubectl get ivft -n ml -w" in notes
    assert "rollout status deployment/ivl-internvl-operator" in notes
