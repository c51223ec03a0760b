import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:  # `tests.kube` is imported as a package from the repository root
    sys.path.insert(0, ROOT)

from tests.kube.fixtures import kube_api, kube_client, kubectl, kubelet  # noqa: E402,F401
