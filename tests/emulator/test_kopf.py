"""A real Kopf operator (KopfRunner, standalone) against the emulator: create/update/delete with
finalizers, status writes, a child adopted with kopf.adopt and collected with its parent."""
import functools
import os

import pytest
from kubernetes import client, config

import polling
from crds import GROUP, PLURAL, VERSION, WIDGET_CRD, widget

pytestmark = pytest.mark.skipif("os.environ.get('INTERNVL_E2E_REAL') == '1'")
HERE = os.path.dirname(__file__)


wait_until = functools.partial(polling.wait_until, timeout=15.0, ignore=(client.ApiException,))


def test_kopf_operator_lifecycle(kube_api, kube_client, monkeypatch):
    from kopf.testing import KopfRunner
    client.ApiextensionsV1Api(kube_client).create_custom_resource_definition(WIDGET_CRD)
    monkeypatch.setenv("KUBECONFIG", kube_api.kubeconfig)
    config.load_kube_config(config_file=kube_api.kubeconfig)  # for the handlers' own client calls
    custom, core = client.CustomObjectsApi(kube_client), client.CoreV1Api(kube_client)
    args = ["run", "--standalone", "-n", "default", "--verbose", os.path.join(HERE, "kopf_operator.py")]
    with KopfRunner(args, timeout=30) as runner:
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, widget("k1", size=2))
        child = wait_until(lambda: core.read_namespaced_config_map("k1-child", "default"))
        assert child.data == {"size": "2"}
        owner = child.metadata.owner_references[0]
        assert owner.kind == "Widget" and owner.name == "k1" and owner.controller
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "k1")
        assert "example.com/widget-finalizer" in obj["metadata"]["finalizers"]
        wait_until(lambda: custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "k1")
                   .get("status", {}).get("create_fn") == {"child": "k1-child"})
        custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "k1", {"spec": {"size": 5}})
        wait_until(lambda: core.read_namespaced_config_map("k1-child", "default").data == {"size": "5"})
        custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "k1")
        names = lambda: {w["metadata"]["name"] for w in
                         custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["items"]}
        wait_until(lambda: "k1" not in names())
        # the child goes with its parent (ownerReference cascade)
        wait_until(lambda: "k1-child" not in {c.metadata.name for c in
                                              core.list_namespaced_config_map("default").items})
    assert runner.exception is None, runner.output
    assert "Handler 'delete_fn' succeeded" in runner.output
    # Kopf >= 1.44 adds/removes its finalizer with a JSON patch guarded by a resourceVersion test
    json_patches = kube_api.server.requests_for(r"/widgets/k1$", verb="patch")
    assert any(r.content_type.startswith("application/json-patch+json") for r in json_patches)
    status_patches = kube_api.server.requests_for(r"/widgets/k1/status$", verb="patch")
    assert status_patches, "Kopf wrote its handler results through the status subresource"
