"""bench/record.py: every result record has DESIGN.md's fields, in its order, under its file name."""

from __future__ import annotations

import json

import pytest

from .conftest import load_bench_module


@pytest.fixture(scope="module")
def record(bench_path):
    return load_bench_module("record")


def test_record_fields_and_file_name(record, tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_COMMIT", "abc1234")
    monkeypatch.setattr("sys.argv", ["/somewhere/bench/train_bench.py", "--steps", "10", "--only", "naive-lora"])
    path = record.write_record(tmp_path / "results", "train", "speed", card="NVIDIA H100 80GB HBM3", config={"batch": 4},
                               baselines={"naive": {"samples_per_s": 2.0}}, ours={"ours": {"samples_per_s": 4.0}}, ratios={"speedup": 2.0}, day="2026-11-27")  # fmt: skip
    assert path == tmp_path / "results" / "train-speed-NVIDIA-H100-80GB-HBM3-2026-11-27.json"
    rec = json.loads(path.read_text())
    assert list(rec) == list(record.KEYS)
    assert rec["command"] == "python bench/train_bench.py --steps 10 --only naive-lora"
    assert (rec["card"], rec["git_commit"], rec["date"], rec["ratios"]) == ("NVIDIA H100 80GB HBM3", "abc1234", "2026-11-27", {"speedup": 2.0})
    # Rewriting (after every config) replaces the file: the same name, the newest content.
    again = record.write_record(tmp_path / "results", "train", "speed", card="NVIDIA H100 80GB HBM3", config={}, baselines={}, ours={"x": {}}, ratios={}, day="2026-11-27")
    assert again == path and json.loads(path.read_text())["ours"] == {"x": {}}


def test_extra_fields_follow_and_cannot_overwrite(record, tmp_path):
    rec = record.build_record(card="cpu", config={}, baselines={}, ours={}, ratios={}, command="c", commit="h", day="d", ours_by_phase={"a": 1})
    assert list(rec) == [*record.KEYS, "ours_by_phase"]
    with pytest.raises(ValueError, match="overwrite"):
        record.build_record(card="cpu", config={}, baselines={}, ours={}, ratios={}, command="c", commit="h", day="d", date="today")
    with pytest.raises(ValueError, match="train, serve"):
        record.record_path(tmp_path, "bench", "x", "cpu", "d")


def test_commit_without_env_and_card_without_gpu(record, monkeypatch):
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    assert record.git_commit()  # HEAD's short hash here, "unknown" in a copy without .git
    monkeypatch.setattr(record.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("nvidia-smi")))
    assert record.card_name() == "cpu"
