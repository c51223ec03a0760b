"""e2e fixtures: one cluster for the package (the emulator + process kubelet, or a real cluster with
INTERNVL_E2E_REAL=1 and KUBECONFIG), one namespace and one `internvl-operator` per test."""
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:  # `tests.kube` is imported as a package from the repository root
    sys.path.insert(0, ROOT)

from tests.kube.fixtures import real_cluster  # noqa: E402

from .cluster import Cluster  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "e2e: the whole operator path (kubectl apply -> Jobs -> serving) on the API emulator or a real cluster"
    )


@pytest.fixture(scope="package")  # torn down after tests/e2e, not left running through the rest of a CI run
def e2e_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    models_dir = None
    if not real_cluster():
        # Every namespace's `models` PVC maps to this one host dir: the tiny model is built once per session
        # (a real cluster builds it with a Job in each test namespace instead).
        from internvl_worker.tiny import build_tiny_model

        models_dir = root / "models"
        build_tiny_model(models_dir / "tiny")
    cluster = Cluster.start(root, models_dir=models_dir)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)  # lets e2e_ns know whether the test body passed
    return report


@pytest.fixture
def e2e_ns(e2e_cluster, request):
    """A fresh namespace with PVCs `models` (tiny model) and `internvl-output`, ConfigMap `tiny-dataset`,
    and the operator watching it (started by the test: `e2e_ns.start_operator()`)."""
    prefix = "e2e-" + request.node.name.removeprefix("test_").replace("_", "-")[:40].rstrip("-")
    ns = e2e_cluster.namespace(prefix.lower())
    try:
        ns.create()
        yield ns
        call = getattr(request.node, "rep_call", None)
        if call is not None and call.passed:
            # A passing run must not hide handler crashes that Kopf retried its way around.
            errors = ns.operator.errors()
            assert not errors, f"the operator logged errors:\n{ns.operator.log_tail(80)}"
    finally:
        ns.close()
