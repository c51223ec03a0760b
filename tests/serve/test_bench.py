"""bench/serve_bench.py's CPU-testable parts: flags, the load generator (against the test server), the result file."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
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
    assert a.concurrency_levels == [1, 8, 32, 64, 128] and a.max_new_tokens == 256 and a.dtype == "bf16" and a.rounds == 2 and a.bs1_requests == 4
    assert a.rate_list is None and a.rate_factor_list == [0.5, 1.0, 1.5, 2.0] and a.rate_duration == 20 and a.rate_warmup == 5
    # the server admits the largest closed loop (128 = 64 decoding + 64 waiting), and no more
    assert (a.max_batch_size, a.max_waiting, a.max_concurrent) == (64, 64, 128)
    assert bench.serve_command(a, "/m", 9)[-6:] == ["--max-batch-size", "64", "--max-concurrent-requests", "128", "--max-waiting-requests", "64"]
    b = bench.parse_args(["--device", "cpu", "--concurrency", "2,4", "--rounds", "3", "--rates", "2,4.5", "--rate_duration", "8", "--serve_args", "--decode eager"])
    assert b.dtype == "fp32" and b.concurrency_levels == [2, 4] and b.rounds == 3 and b.rate_list == [2.0, 4.5] and b.rate_warmup == 2
    assert bench.serve_command(b, "/m", 9)[-2:] == ["--decode", "eager"]
    assert bench.parse_args(["--concurrency", "256"]).max_waiting == 192
    with pytest.raises(SystemExit):
        bench.parse_args(["--rate_duration", "10", "--rate_warmup", "10"])


def test_poisson_arrivals_are_seeded(bench):
    a = bench.poisson_arrivals(20.0, 50.0, seed=3)
    assert a == bench.poisson_arrivals(20.0, 50.0, seed=3) and a != bench.poisson_arrivals(20.0, 50.0, seed=4)
    assert all(0 < x < 50 for x in a) and a == sorted(a)
    assert 800 < len(a) < 1200  # ~ rate x duration = 1000 (Poisson: sd ~32)


def test_rates_from_the_closed_loop(bench):
    args = bench.parse_args(["--quick"])
    levels = {"8": {"requests_per_s": 2.0}, "64": {"requests_per_s": 10.0}, "128": {"requests_per_s": 11.0}}
    rates, note = bench.open_loop_rates(args, levels)
    assert rates == [5.0, 10.0, 15.0, 20.0] and note["reference_clients"] == 64
    rates, note = bench.open_loop_rates(bench.parse_args(["--concurrency", "1,8"]), {"1": {"requests_per_s": 1.0}, "8": {"requests_per_s": 4.0}})
    assert rates == [2.0, 4.0, 6.0, 8.0] and note["reference_clients"] == 8  # no 64-client level: the highest
    assert bench.open_loop_rates(bench.parse_args(["--rates", "3,6"]), levels)[0] == [3.0, 6.0]


def _result(kind, t0, *, times=(), end=None):
    return {"ok": kind == "ok", "kind": kind, "status": {"ok": 200, "rejected": 429, "http_error": 500}.get(kind), "error": None if kind == "ok" else kind,
            "tokens": len(times), "ttft": (times[0] - t0) if times else None, "itl": [b - a for a, b in zip(times, times[1:])],
            "latency": (end or t0) - t0, "t0": t0, "end": end or t0, "times": list(times)}  # fmt: skip


def test_open_loop_summary_counts_429_apart_from_failures(bench):
    # window [102, 110): warm-up 2 s of a 10 s rate starting at 100
    results = [
        _result("ok", 100.5, times=[101.0, 101.5, 102.5], end=102.5),  # sent in the warm-up: 1 token inside the window
        _result("ok", 103.0, times=[103.2, 103.4, 103.6, 103.8], end=103.8),
        _result("ok", 109.0, times=[109.5, 110.5], end=110.5),  # finishes after the window: 1 token inside
        _result("rejected", 104.0, end=104.01),
        _result("rejected", 105.0, end=105.02),
        _result("timeout", 106.0, end=166.0),
        _result("http_error", 107.0, end=107.1),
        _result("connection_error", 108.0, end=108.0),
    ]
    s = bench.summarize_open(results, t0=100.0, duration=10.0, warmup=2.0, rate=0.8)
    assert (s["requests"], s["ok_200"], s["rejected_429"], s["timeouts"], s["http_errors"], s["other_errors"]) == (8, 3, 2, 1, 1, 1)
    assert s["error_rate"] == round(3 / 8, 4) and s["reject_rate"] == 0.25  # 429s are refusals, not failures
    assert s["tokens_per_s"] == round(6 / 8, 2) and s["completed_rps"] == round(2 / 8, 3)
    assert s["ttft_p50_ms"] == 200.0 and s["e2e_p99_ms"] == 1500.0  # only requests sent inside the window
    assert s["reject_latency_p99_ms"] == 20.0 and s["sent_rps"] == 0.8


def test_open_loop_against_the_server(bench, server):
    img = bench.image_data_url(32)
    bodies = lambda i: bench.tgi_body(img, bench.prompt_text(8, salt=i), 4)  # noqa: E731
    before = bench.scrape(server.url)
    s = asyncio.run(bench.open_loop(server.url, bodies, 4.0, 2.0, warmup=0.5, timeout=60, seed=1))
    view = bench.server_view(before, bench.scrape(server.url))
    n = len(bench.poisson_arrivals(4.0, 2.0, 1))
    assert s["requests"] == s["ok_200"] == n and s["error_rate"] == 0 and s["rejected_429"] == 0
    assert view["generated_tokens"] == 4 * n and view["statuses"] == {"200": n} and view["server_ttft_mean_ms"] > 0 and view["mean_batch_rows"] >= 1
    # a full server: every request is refused with 429 at once, and that is no error
    srv = server.server
    limit = srv.cfg.max_concurrent_requests
    srv.cfg.max_concurrent_requests = srv.in_flight
    try:
        full = asyncio.run(bench.open_loop(server.url, bodies, 10.0, 1.0, timeout=60, seed=2))
    finally:
        srv.cfg.max_concurrent_requests = limit
    assert full["requests"] == full["rejected_429"] > 0 and full["error_rate"] == 0 and full["reject_rate"] == 1.0
    # a client timeout is a failure of its own kind (64 tokens take far more than 50 ms on a CPU)
    slow = lambda i: bench.tgi_body(img, bench.prompt_text(8, salt=i), 64)  # noqa: E731
    late = asyncio.run(bench.open_loop(server.url, slow, 5.0, 0.5, timeout=0.05, seed=0))
    assert late["requests"] == late["timeouts"] > 0 and late["error_rate"] == 1.0
    deadline = time.monotonic() + 60  # the server lets go of the requests whose clients left
    while srv.in_flight:
        assert time.monotonic() < deadline, srv.in_flight
        time.sleep(0.05)


def test_load_generator_and_result_file(bench, server, tmp_path):
    img = bench.image_data_url(32)
    bodies = lambda i: bench.tgi_body(img, bench.prompt_text(8, salt=i), 6)  # noqa: E731
    level = bench.with_server_view(server.url, lambda: asyncio.run(bench.closed_loop(server.url, bodies, 3, 2)))
    assert level["requests"] == 6 and level["errors"] == 0 and level["tokens"] == 36  # min_new_tokens = max: exactly 6 each
    assert level["ttft_p50_ms"] > 0 and level["itl_p50_ms"] > 0 and level["tokens_per_s"] > 0 and level["requests_per_s"] > 0
    assert level["server"]["generated_tokens"] == 36 and level["server"]["before_engine_mean_ms"] is not None
    ours = {"bs1_tokens_per_s": 50.0, "saturation_tokens_per_s": 400.0, "tokens_per_s_at_8": 300.0}
    baselines = {"hf_naive_bs1": {"bs1_tokens_per_s": 20.0}, "hf_naive_bs8": {"tokens_per_s": 150.0}}
    args = bench.parse_args(["--quick"])
    assert args.name == "speed"
    result = bench.build_result(card="NVIDIA H100 80GB HBM3", config={"x": 1}, baselines=baselines, ours=ours, levels={"3": level}, argv=["--quick"], open_loop=[{"offered_rps": 1.0}])
    assert result["command"] == "python bench/serve_bench.py --quick"
    path = bench.save_record(tmp_path, "serve", args.name, result)  # bench/record.py's writer, as train records use
    assert path.name == f"serve-speed-NVIDIA-H100-80GB-HBM3-{result['date']}.json" and not list(tmp_path.glob("*.tmp"))
    saved = json.loads(path.read_text())
    for key in ("card", "command", "git_commit", "date", "config", "baselines", "ours", "ratios", "ours_by_concurrency", "ours_open_loop"):
        assert key in saved
    assert saved["ratios"] == {"bs1_tokens_per_s_vs_hf_naive_bs1": 2.5, "saturation_vs_best_baseline": round(400 / 150, 3), "at_8_vs_hf_naive_bs8": 2.0}


def test_headline_metrics(bench):
    bs1 = {"requests": 4, "ok_200": 4, "rejected_429": 0, "per_request_tokens_per_s_p50": 300.0, "ttft_p50_ms": 30.0, "itl_p50_ms": 3.0}
    levels = {"64": {"requests": 128, "ok_200": 128, "rejected_429": 0, "tokens_per_s": 4000.0}}
    rates = [
        {"requests": 100, "ok_200": 100, "rejected_429": 0, "error_rate": 0.0, "tokens_per_s": 2000.0, "offered_rps": 8.0, "completed_rps": 7.9, "ttft_p50_ms": 40, "ttft_p99_ms": 90, "e2e_p50_ms": 900, "e2e_p99_ms": 1200},
        {"requests": 300, "ok_200": 200, "rejected_429": 99, "error_rate": round(1 / 300, 4), "tokens_per_s": 4100.0, "offered_rps": 24.0, "completed_rps": 16.0, "ttft_p50_ms": 300, "ttft_p99_ms": 2000, "e2e_p50_ms": 4000, "e2e_p99_ms": 8000},
    ]  # fmt: skip
    ours = bench.summarize_ours(bs1, levels, rates, startup=12.0)
    assert ours["saturation_tokens_per_s"] == 4100.0 and ours["saturation_source"] == "open loop" and ours["saturation_e2e_p99_ms"] == 8000
    assert ours["tokens_per_s_at_64"] == 4000.0 and ours["rejected_429"] == 99
    assert ours["error_rate"] == round(1 / 532, 4)  # the one failure; the 99 refusals are not errors
    assert bench.summarize_ours(bs1, levels, [], startup=12.0)["saturation_source"] == "closed loop"
