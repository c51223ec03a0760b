"""pytest fixtures for tests that need a cluster. Import them from a conftest.py:

    from tests.kube.fixtures import kube_api, kubelet, kubectl, kube_client  # noqa: F401

By default they start the API emulator (and, for `kubelet`, the process kubelet) per test. With
`INTERNVL_E2E_REAL=1` and `KUBECONFIG` set they use that cluster instead: `kube_api.server` is None,
`kubelet` yields None (the cluster has real kubelets) and `kubectl` runs against the real cluster.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import pytest

from .apiserver import ApiServer
from .binaries import kubectl_path, write_kubeconfig
from .kubelet import ProcessKubelet


def real_cluster() -> bool:
    return os.environ.get("INTERNVL_E2E_REAL") == "1" and bool(os.environ.get("KUBECONFIG"))


@dataclass
class KubeApi:
    url: str | None  # the emulator's base URL (None on a real cluster: read the kubeconfig)
    kubeconfig: str
    server: ApiServer | None  # the emulator, for fault injection and request records; None when real
    tmp_dir: str
    namespace: str = "default"

    @property
    def real(self) -> bool:
        return self.server is None


@pytest.fixture
def kube_api(tmp_path):
    if real_cluster():
        yield KubeApi(None, os.environ["KUBECONFIG"], None, str(tmp_path))
        return
    log_dir = tmp_path / "pod-logs"
    server = ApiServer(log_dir=str(log_dir), bookmark_interval=1.0).start()
    kubeconfig = write_kubeconfig(server.url, tmp_path / "kubeconfig")
    try:
        yield KubeApi(server.url, kubeconfig, server, str(tmp_path))
    finally:
        server.stop()


@pytest.fixture
def kubelet(kube_api):
    if kube_api.real:
        yield None
        return
    k = ProcessKubelet(kube_api.url, os.path.join(kube_api.tmp_dir, "kubelet"),
                       log_dir=kube_api.server.log_dir).start()
    try:
        yield k
    finally:
        k.stop()


@pytest.fixture
def kubectl(kube_api):
    """kubectl("get", "pods", "-o", "json", input=None, check=True) -> CompletedProcess (text)."""
    binary = kubectl_path()

    def run(*args, input: str | None = None, check: bool = True, timeout: float = 60):
        proc = subprocess.run([binary, "--kubeconfig", kube_api.kubeconfig, *args], input=input,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc
    return run


@pytest.fixture
def kube_client(kube_api):
    """A `kubernetes.client.ApiClient` configured from the kubeconfig."""
    from kubernetes import client, config
    cfg = client.Configuration()
    config.load_kube_config(config_file=kube_api.kubeconfig, client_configuration=cfg)
    api = client.ApiClient(cfg)
    yield api
    api.close()
