"""Settings from the environment, the documented field reference, and the model types the worker knows."""

from __future__ import annotations

import kopf
import pytest

from internvl_operator import __main__ as cli, constants as c, crdgen, handlers
from internvl_operator.settings import OperatorSettings

from operator_helpers import REPO


def test_settings_come_from_prefixed_env(monkeypatch):
    monkeypatch.setenv("INTERNVL_OPERATOR_NAMESPACES", "ml, ml-staging")
    monkeypatch.setenv("INTERNVL_OPERATOR_WORKER_IMAGE", "reg/w:2")
    monkeypatch.setenv("INTERNVL_OPERATOR_MERGE_RESOURCES", '{"requests": {"cpu": "4"}}')
    monkeypatch.setenv("INTERNVL_OPERATOR_POLL_INTERVAL_S", "5")
    settings = OperatorSettings()
    assert settings.namespaces == ["ml", "ml-staging"]
    assert settings.worker_image == "reg/w:2" and settings.poll_interval_s == 5.0
    assert settings.merge_resources == {"requests": {"cpu": "4"}}


def test_bad_setting_names_the_value(monkeypatch):
    monkeypatch.setenv("INTERNVL_OPERATOR_IMAGE_PULL_POLICY", "Sometimes")
    with pytest.raises(ValueError, match="Sometimes"):
        OperatorSettings()


def test_readme_field_reference_is_current_and_complete():
    readme = (REPO / "operator" / "README.md").read_text()
    assert crdgen.embed_reference(readme) == readme, "run: python -m internvl_operator.crdgen --docs operator/README.md"
    for field in ("spec.gpusPerNode", "spec.serve.autoscaling.metricName", "spec.adapters[].fromFineTune", "status.progress.loss"):
        assert f"`{field}`" in readme
    for name in OperatorSettings.model_fields:
        assert f"INTERNVL_OPERATOR_{name.upper()}" in readme, name


def test_known_model_types_equal_the_worker_registry():
    registry = pytest.importorskip("internvl_worker.registry")
    assert sorted(c.KNOWN_MODEL_TYPES) == sorted(registry.MODELS)


def test_command_line():
    args = cli.parse_args(["-n", "a", "-n", "b", "--peering", "internvl"])
    assert args.namespace == ["a", "b"] and args.peering == "internvl"


def test_handlers_register_with_kopf():
    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    ids = {h.id for h in registry._changing.get_all_handlers()} | {h.id for h in registry._spawning.get_all_handlers()}
    assert {"finetune-create", "finetune-resume", "finetune-update/spec", "finetune-poll", "service-create", "service-poll"} <= ids
