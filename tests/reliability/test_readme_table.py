"""The README's reliability table shows the corpus as it is: every count there is recomputed here."""

import re
from pathlib import Path

from .corpus import counts

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_counts_match_the_corpus():
    text = README.read_text()
    section = text[text.index("## Reliability"):]
    rows = {line.split("|")[1].strip().split(" (")[0]: line for line in section.splitlines() if line.startswith("| ") and "---" not in line}
    n = counts()
    print(f"\n[reliability] {n}")
    dataset, http, crs = rows["dataset rows"], rows["HTTP requests"], rows["custom resources"]
    assert f"{n['dataset']['refused']} bad rows" in dataset and f"{n['dataset']['accepted']} odd but valid rows" in dataset
    assert f"{n['dataset']['refused']} refused by" in dataset and f"{n['dataset']['accepted']} accepted as RGB" in dataset
    assert f"{n['http']['refused']} bad requests" in http
    assert f"{n['crs']['refused']} invalid CRs" in crs
    assert f"{n['crs']['schema']} refused by the CRD schema" in crs and f"{n['crs']['operator']} by the operator" in crs
    faults, cf = rows["cluster faults"], n["cluster_faults"]
    assert f"{cf['tests']} fault tests" in faults and f"{cf['request_faults']} request faults" in faults
    assert f"{cf['gone_watches']} forced 410s" in faults
    assert f"expired {cf['expiries']} times" in faults and f"compacted {cf['compactions']} times" in faults
    # Every test file the table links exists.
    for link in re.findall(r"\]\((tests/[^)]+\.py)\)", section):
        assert (README.parent / link).is_file(), link
