"""The real `kubernetes` Python client against the emulator: CRUD, patch flavours, watch with
resourceVersion, bookmarks and 410, selectors, status subresource, finalizers, GC, CRD schemas."""
import functools
import json
import threading
import time

import pytest
import requests
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

import polling
from crds import GROUP, PLURAL, VERSION, WIDGET_CRD, widget

pytestmark = pytest.mark.skipif("os.environ.get('INTERNVL_E2E_REAL') == '1'")


wait_until = functools.partial(polling.wait_until, timeout=5.0, step=0.05)


@pytest.fixture
def core(kube_client):
    return client.CoreV1Api(kube_client)


@pytest.fixture
def custom(kube_client):
    ext = client.ApiextensionsV1Api(kube_client)
    ext.create_custom_resource_definition(WIDGET_CRD)
    return client.CustomObjectsApi(kube_client)


def cm(name, labels=None, data=None):
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels or {}},
            "data": data or {"k": "v"}}


def test_create_sets_server_fields_and_conflicts(core):
    a = core.create_namespaced_config_map("default", cm("a"))
    b = core.create_namespaced_config_map("default", {"metadata": {"generateName": "gen-"}, "data": {}})
    assert a.metadata.uid and a.metadata.creation_timestamp and a.metadata.generation == 1
    assert int(b.metadata.resource_version) > int(a.metadata.resource_version)  # one global counter
    assert b.metadata.name.startswith("gen-") and len(b.metadata.name) == 9
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map("default", cm("a"))
    assert e.value.status == 409 and json.loads(e.value.body)["reason"] == "AlreadyExists"
    stale = core.read_namespaced_config_map("a", "default")
    core.patch_namespaced_config_map("a", "default", {"data": {"k": "v2"}})
    stale.data = {"k": "v3"}
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_config_map("a", "default", stale)
    assert e.value.status == 409 and json.loads(e.value.body)["reason"] == "Conflict"
    with pytest.raises(ApiException) as e:
        core.read_namespaced_config_map("nope", "default")
    assert e.value.status == 404 and json.loads(e.value.body)["kind"] == "Status"
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map("no-such-ns", cm("x"))
    assert e.value.status == 404


def test_patch_flavours(kube_api, kube_client, core):
    apps = client.AppsV1Api(kube_client)
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
           "spec": {"selector": {"matchLabels": {"app": "d"}}, "template": {
               "metadata": {"labels": {"app": "d"}},
               "spec": {"containers": [{"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}]},
                                       {"name": "b", "image": "y"}]}}}}
    created = apps.create_namespaced_deployment("default", dep)
    # a dict body is a strategic merge patch: containers and env merge by name
    apps.patch_namespaced_deployment("d", "default", {"spec": {"template": {"spec": {"containers": [
        {"name": "a", "env": [{"name": "B", "value": "2"}]}]}}}})
    got = apps.read_namespaced_deployment("d", "default")
    containers = got.spec.template.spec.containers
    assert [c.name for c in containers] == ["a", "b"]
    assert {e.name: e.value for e in containers[0].env} == {"A": "1", "B": "2"}
    assert got.metadata.generation == created.metadata.generation + 1
    # a list body is a JSON patch; a failed `test` is 422 and changes nothing
    rv = got.metadata.resource_version
    apps.patch_namespaced_deployment("d", "default", [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}])
    with pytest.raises(ApiException) as e:
        apps.patch_namespaced_deployment("d", "default", [
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "remove", "path": "/metadata/finalizers"}])
    assert e.value.status == 422
    assert apps.read_namespaced_deployment("d", "default").metadata.finalizers == ["x/y"]
    # merge patch: null deletes, lists replace
    core.create_namespaced_config_map("default", cm("m", data={"a": "1", "b": "2"}))
    r = requests.patch(f"{kube_api.url}/api/v1/namespaces/default/configmaps/m",
                       data=json.dumps({"data": {"a": None, "c": "3"}}),
                       headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200
    assert core.read_namespaced_config_map("m", "default").data == {"b": "2", "c": "3"}


def test_selectors(core):
    core.create_namespaced_config_map("default", cm("one", {"app": "x", "tier": "web"}))
    core.create_namespaced_config_map("default", cm("two", {"app": "x", "tier": "db"}))
    core.create_namespaced_config_map("default", cm("three", {"app": "y"}))
    names = lambda **kw: sorted(i.metadata.name for i in core.list_namespaced_config_map("default", **kw).items)
    assert names(label_selector="app=x") == ["one", "two"]
    assert names(label_selector="app=x,tier!=db") == ["one"]
    assert names(label_selector="tier in (db,cache)") == ["two"]
    assert names(label_selector="!tier") == ["three"]
    assert names(field_selector="metadata.name=two") == ["two"]
    assert names(field_selector="metadata.namespace=default,metadata.name!=two", label_selector="app") == [
        "one", "three"]
    page = core.list_namespaced_config_map("default", limit=2)
    assert len(page.items) == 2 and page.metadata._continue
    rest = core.list_namespaced_config_map("default", limit=2, _continue=page.metadata._continue)
    assert len(page.items) + len(rest.items) == 3


def test_watch_from_resource_version_bookmarks_and_timeout(kube_api, core):
    first = core.create_namespaced_config_map("default", cm("w1"))
    start_rv = first.metadata.resource_version
    core.create_namespaced_config_map("default", cm("w2"))
    core.delete_namespaced_config_map("w1", "default")
    w = watch.Watch()
    seen = []
    t0 = time.monotonic()
    for ev in w.stream(core.list_namespaced_config_map, "default", resource_version=start_rv,
                       allow_watch_bookmarks=True, timeout_seconds=2, _preload_content=False):
        seen.append((ev["type"], ev["raw_object"]["metadata"].get("name")))
    # events strictly after start_rv, in order; bookmarks while idle; the stream ends at timeoutSeconds
    assert seen[:2] == [("ADDED", "w2"), ("DELETED", "w1")]
    assert ("BOOKMARK", None) in seen[2:]
    assert 1.5 < time.monotonic() - t0 < 5


def test_watch_gone_after_compaction(kube_api, core):
    old = core.create_namespaced_config_map("default", cm("g1")).metadata.resource_version
    core.patch_namespaced_config_map("g1", "default", {"data": {"k": "2"}})
    kube_api.server.compact()
    resp = core.list_namespaced_config_map("default", watch=True, resource_version=old, timeout_seconds=2,
                                           _preload_content=False)
    events = [json.loads(line) for line in resp.read().decode().splitlines() if line]
    assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410
    with pytest.raises(ApiException) as e:
        core.list_namespaced_config_map("default", resource_version=old, resource_version_match="Exact")
    assert e.value.status == 410
    # the kubernetes client's watch helper turns the ERROR event into an exception with 410
    with pytest.raises(ApiException) as e:
        for _ in watch.Watch().stream(core.list_namespaced_config_map, "default", resource_version=old,
                                      timeout_seconds=2):
            pass
    assert e.value.status == 410


def test_live_watch_sees_changes(core):
    got = []

    def consume():
        for ev in watch.Watch().stream(core.list_namespaced_config_map, "default", timeout_seconds=3,
                                       label_selector="live=1"):
            got.append((ev["type"], ev["object"].metadata.name))
            if len(got) >= 3:
                break
    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.3)
    core.create_namespaced_config_map("default", cm("lv", {"live": "1"}))
    core.create_namespaced_config_map("default", cm("other", {"live": "0"}))
    core.patch_namespaced_config_map("lv", "default", {"metadata": {"labels": {"live": "0"}}})
    core.patch_namespaced_config_map("other", "default", {"metadata": {"labels": {"live": "1"}}})
    t.join(5)
    # leaving and entering the selector are seen as DELETED and ADDED, as from a real server
    assert got == [("ADDED", "lv"), ("DELETED", "lv"), ("ADDED", "other")]


def test_status_subresource_and_generation(custom):
    obj = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL,
                                                 dict(widget("s1", size=2), status={"phase": "Ignored"}))
    assert "status" not in obj  # create ignores status when the subresource exists
    obj = custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "s1",
                                                       {"status": {"phase": "Ready"}, "spec": {"size": 99}})
    assert obj["status"] == {"phase": "Ready"} and obj["spec"]["size"] == 2 and obj["metadata"]["generation"] == 1
    obj = custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "s1",
                                                {"spec": {"size": 3}, "status": {"phase": "Hacked"}})
    assert obj["status"] == {"phase": "Ready"} and obj["spec"]["size"] == 3 and obj["metadata"]["generation"] == 2
    obj = custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "s1",
                                                {"metadata": {"labels": {"a": "b"}}})
    assert obj["metadata"]["generation"] == 2  # metadata changes do not bump the generation


def test_crd_schema_defaults_pruning_and_validation(custom):
    obj = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL,
                                                 widget("v1", size=3, bogus=1, extra={"free": {"x": 1}}))
    assert obj["spec"] == {"size": 3, "maxSize": 10, "color": "red", "extra": {"free": {"x": 1}}}
    cases = [
        (widget("bad1", size=0), "spec.size", "greater than or equal to 1"),
        (widget("bad2", size="3"), "spec.size", "must be of type integer"),
        (widget("bad3", size=3, color="green"), "spec.color", 'Unsupported value: "green"'),
        (widget("bad4"), "spec.size", "Required value"),
        (widget("bad5", size=3, labels={"a": 1}), "spec.labels.a", "must be of type string"),
        (widget("bad6", size=20, maxSize=10), "spec", "size must not exceed maxSize"),  # CEL
    ]
    for body, field, text in cases:
        with pytest.raises(ApiException) as e:
            custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, body)
        status = json.loads(e.value.body)
        assert e.value.status == 422 and status["reason"] == "Invalid", body
        assert f"{field}: " in status["message"] and text in status["message"], status["message"]
        assert status["details"]["causes"][0]["field"] == field


def test_finalizers_and_deletion_timestamp(custom):
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL,
                                           dict(widget("f1", size=1), metadata={"name": "f1", "finalizers": ["t/x"]}))
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "f1")
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "f1")
    assert obj["metadata"]["deletionTimestamp"]
    with pytest.raises(ApiException) as e:  # no new finalizers once deleting
        custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "f1",
                                              {"metadata": {"finalizers": ["t/x", "t/y"]}})
    assert e.value.status == 422
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "f1", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as e:
        custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "f1")
    assert e.value.status == 404


def test_owner_reference_cascade(core, custom):
    parent = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, widget("p", size=1))
    ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "name": "p", "uid": parent["metadata"]["uid"],
           "controller": True, "blockOwnerDeletion": True}
    child = cm("child")
    child["metadata"]["ownerReferences"] = [ref]
    core.create_namespaced_config_map("default", child)
    grandchild = cm("grandchild")
    grandchild["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "child",
                                                  "uid": core.read_namespaced_config_map("child", "default").metadata.uid}]
    core.create_namespaced_config_map("default", grandchild)
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "p")
    names = lambda: {i.metadata.name for i in core.list_namespaced_config_map("default").items}
    wait_until(lambda: not ({"child", "grandchild"} & names()))


def test_job_delete_defaults_to_orphan_like_a_real_server(kube_client, core):
    batch = client.BatchV1Api(kube_client)
    job = batch.create_namespaced_job("default", {"metadata": {"name": "j"}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}})
    assert job.spec.selector.match_labels == {"batch.kubernetes.io/controller-uid": job.metadata.uid}
    pod = cm("job-dependent")
    pod["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": "j",
                                           "uid": job.metadata.uid}]
    core.create_namespaced_config_map("default", pod)
    batch.delete_namespaced_job("j", "default")
    time.sleep(0.7)
    orphan = core.read_namespaced_config_map("job-dependent", "default")
    assert not orphan.metadata.owner_references


def test_crd_registration_serves_discovery_at_once(kube_client):
    client.ApiextensionsV1Api(kube_client).create_custom_resource_definition(WIDGET_CRD)
    resources = client.CustomObjectsApi(kube_client).get_api_resources(GROUP, VERSION)
    entries = {r.name: r for r in resources.resources}
    assert entries["widgets"].namespaced and entries["widgets"].short_names == ["wd"]
    assert "widgets/status" in entries and set(entries["widgets/status"].verbs) == {"get", "patch", "update"}
    crd = client.ApiextensionsV1Api(kube_client).read_custom_resource_definition("widgets.example.com")
    assert {c.type: c.status for c in crd.status.conditions}["Established"] == "True"


def test_fault_injection_and_request_record(kube_api, core):
    kube_api.server.inject_fault(r"/configmaps$", method="GET", status=500, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as e:
            core.list_namespaced_config_map("default")
        assert e.value.status == 500
    core.list_namespaced_config_map("default")  # the third call passes
    lists = kube_api.server.requests_for(r"/namespaces/default/configmaps$", verb="list")
    assert [r.status for r in lists] == [500, 500, 200]
    core.create_namespaced_config_map("default", cm("rec"))
    core.patch_namespaced_config_map("rec", "default", {"data": {"x": "y"}})
    patch = kube_api.server.requests_for(r"/configmaps/rec$", verb="patch")[0]
    assert patch.content_type.startswith("application/strategic-merge-patch+json")
