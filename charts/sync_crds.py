"""Copy the generated CRDs (crds/*.yaml) into the chart (charts/internvl-operator/crds-src/).

    python charts/sync_crds.py          # after `python -m internvl_operator.crdgen`

crds/ stays the one source of truth (generated from operator/internvl_operator/api.py). Helm cannot
read files outside a chart, and a symlink would not survive `helm package`, so the chart carries a
byte-for-byte copy; tests/chart/test_chart.py fails when the copy and crds/ differ.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "crds"
TARGET = REPO / "charts" / "internvl-operator" / "crds-src"


def main() -> int:
    TARGET.mkdir(parents=True, exist_ok=True)
    wanted = {p.name for p in SOURCE.glob("*.yaml")}
    for stale in TARGET.glob("*.yaml"):
        if stale.name not in wanted:
            stale.unlink()
    for name in sorted(wanted):
        shutil.copyfile(SOURCE / name, TARGET / name)
        print(f"copied crds/{name} -> {TARGET.relative_to(REPO)}/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
