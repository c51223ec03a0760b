"""bench/serve_bench.py's CPU-testable parts: flags, the load generator (against the test server), the result file."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from datetime import date
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "bench" / "serve_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flags(bench):
    a = bench.parse_args(["--quick"])
    assert a.concurrency_levels == [1, 8, 32, 64] and a.max_new_tokens == 256 and a.dtype == "bf16" and a.rounds == 2 and a.bs1_requests == 4
    b = bench.parse_args(["--device", "cpu", "--concurrency", "2,4", "--rounds", "3"])
    assert b.dtype == "fp32" and b.concurrency_levels == [2, 4] and b.rounds == 3


def test_load_generator_and_result_file(bench, server, tmp_path):
    img = bench.image_data_url(32)
    bodies = lambda i: bench.tgi_body(img, bench.prompt_text(8, salt=i), 6)  # noqa: E731
    level = asyncio.run(bench.closed_loop(server.url, bodies, 3, 2))
    assert level["requests"] == 6 and level["errors"] == 0 and level["tokens"] == 36  # min_new_tokens = max: exactly 6 each
    assert level["ttft_p50_ms"] > 0 and level["itl_p50_ms"] > 0 and level["tokens_per_s"] > 0
    ours = {"bs1_tokens_per_s": 50.0, "saturation_tokens_per_s": 400.0, "tokens_per_s_at_8": 300.0}
    baselines = {"hf_naive_bs1": {"bs1_tokens_per_s": 20.0}, "hf_naive_bs8": {"tokens_per_s": 150.0}}
    args = bench.parse_args(["--quick"])
    result = bench.build_result(args, card="NVIDIA H100 80GB HBM3", config={"x": 1}, baselines=baselines, ours=ours, levels={"3": level}, argv=["--quick"])
    path = bench.write_result(bench.result_path(tmp_path, result["card"], date(2026, 11, 27)), result)
    assert path.name == "serve-first-nvidia-h100-80gb-hbm3-2026-11-27.json"
    saved = json.loads(path.read_text())
    for key in ("card", "command", "git_commit", "date", "config", "baselines", "ours", "ratios"):
        assert key in saved
    assert saved["ratios"] == {"bs1_tokens_per_s_vs_hf_naive_bs1": 2.5, "saturation_vs_best_baseline": round(400 / 150, 3), "at_8_vs_hf_naive_bs8": 2.0}
