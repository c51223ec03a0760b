"""Try the operator without a cluster: the API emulator, the process kubelet and `internvl-operator`,
with the tiny model, the example dataset and the PVCs the example fine-tune needs.

    python -m tests.e2e.local_cluster            # from the repository root, with the dev venv active
    python -m tests.e2e.local_cluster --port 8001 --dir /tmp/internvl-local

It prints the kubeconfig and the kubectl commands to run, then stays in the foreground (Ctrl-C stops
everything, processes included). Pods run as local processes; a Service's ready backend is printed as a
loopback URL when it appears. See tests/e2e/README.md.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.kube.binaries import kubectl_path  # noqa: E402

from .cluster import EXAMPLE, Cluster  # noqa: E402


def _watch_services(cluster: Cluster, namespace: str, stop: threading.Event) -> None:
    """Print each Service's loopback URL once a backend is ready (the kubelet maps ports to 127.0.0.1)."""
    shown: dict[str, str] = {}
    while not stop.wait(1.0):
        try:
            names = [s["metadata"]["name"] for s in cluster.kube.list("Service", namespace)]
        except Exception:
            continue
        for name in names:
            url = cluster.kubelet.service_url(namespace, name)
            if url and shown.get(name) != url:
                shown[name] = url
                print(f"\n>>> Service {name} is ready at {url}  (TGI: POST {url}/generate, OpenAI: {url}/v1)\n",
                      flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.local_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="working directory (kubeconfig, PVC dirs, logs); default: a temp dir")
    parser.add_argument("--port", type=int, default=0, help="API server port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--no-operator", action="store_true", help="do not start internvl-operator (run your own)")
    args = parser.parse_args(argv)
    if os.environ.get("INTERNVL_E2E_REAL") == "1":
        parser.error("unset INTERNVL_E2E_REAL: this starts a local emulator")

    root = Path(args.dir or tempfile.mkdtemp(prefix="internvl-local-")).resolve()
    models_dir = root / "models"
    if not (models_dir / "tiny" / "config.json").exists():
        print(f"building the tiny random InternVL in {models_dir / 'tiny'} ...", flush=True)
        from internvl_worker.tiny import build_tiny_model

        build_tiny_model(models_dir / "tiny")
    cluster = Cluster.start(root, models_dir=models_dir, api_port=args.port)
    ns = cluster.namespace(args.namespace, exact=True).create()
    if not args.no_operator:
        ns.start_operator()

    kubectl = kubectl_path()
    print(f"""
API emulator:   {cluster.server.url}
kubeconfig:     {cluster.kubeconfig}
namespace:      {ns.name} (PVCs models + internvl-output, ConfigMap tiny-dataset)
operator:       {'not started (--no-operator)' if args.no_operator else f'internvl-operator -n {ns.name}, log: {ns.operator.log_path}'}
pod logs:       {cluster.server.log_dir}
PVC dirs:       {root / 'kubelet' / 'pvc' / ns.name} (models: {models_dir})

In another shell:
  export KUBECONFIG={cluster.kubeconfig}
  alias kubectl={kubectl}          # or any kubectl >= 1.28
  kubectl -n {ns.name} apply -f {EXAMPLE.relative_to(ROOT)}
  kubectl -n {ns.name} get internvlfinetunes -w         # Validating -> Training -> Merging -> Serving
  kubectl -n {ns.name} get jobs,pods,internvlservices,deployments,services
  kubectl -n {ns.name} logs -f job/tiny-lora-e2e-train
  kubectl -n {ns.name} describe internvlfinetune tiny-lora-e2e
  kubectl -n {ns.name} delete internvlfinetune tiny-lora-e2e   # deletes its Jobs, service and pods

Ctrl-C stops the operator, every pod process and the API server.
""", flush=True)

    stop = threading.Event()
    watcher = threading.Thread(target=_watch_services, args=(cluster, ns.name, stop), daemon=True)
    watcher.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            if not args.no_operator and not ns.operator.alive:
                print(f"the operator exited; its log:\n{ns.operator.log_tail()}", flush=True)
                break
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        print("stopping ...", flush=True)
        ns.operator.stop()
        cluster.stop()
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
