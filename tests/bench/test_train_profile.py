"""bench/train_profile.py's GPU-idle analysis on a hand-made torch.profiler trace: which gaps between kernels
it finds and which code it charges them to."""

import pytest

from .conftest import load_bench_module


@pytest.fixture(scope="module")
def profile_mod(bench_path):
    return load_bench_module("train_profile")


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def test_gpu_idle_charges_each_gap_to_the_code_that_launched_after_it(profile_mod):
    site = "/usr/lib/python3.12/site-packages/"
    events = [
        # host side, main thread: a step frame around a PEFT layer's forward around torch's own linear
        _x("python_function", f"{profile_mod.ROOT}/bench/train_profile.py(100): train_step", 0, 100),
        _x("python_function", f"{site}peft/tuners/lora/layer.py(770): forward", 20, 12),
        _x("python_function", f"{site}torch/nn/functional.py(1): linear", 25, 5),
        _x("python_function", f"{site}peft/tuners/lora/layer.py(770): forward", 5, 3),  # a sibling that ended earlier
        _x("cuda_runtime", "cudaLaunchKernel", 1, 1, correlation=1),
        _x("cuda_runtime", "cudaLaunchKernel", 26, 1, correlation=2),
        # backward's thread: no Python frames, only ops
        _x("cpu_op", "autograd::engine::evaluate_function: AddmmBackward0", 40, 8, tid=2),
        _x("cuda_runtime", "cudaLaunchKernel", 42, 1, tid=2, correlation=3),
        _x("cuda_runtime", "cudaLaunchKernel", 43, 1, tid=2, correlation=4),
        _x("cuda_runtime", "cudaLaunchKernel", 44, 1, tid=2, correlation=5),
        # device side (tid = stream)
        _x("kernel", "gemm_a", 0, 10, tid=7, correlation=1),
        _x("kernel", "gemm_b", 30, 10, tid=7, correlation=2),  # 20 us after gemm_a
        _x("kernel", "add", 46, 4, tid=7, correlation=3),  # 6 us after gemm_b
        _x("gpu_memcpy", "Memcpy DtoD", 50, 10, tid=7, correlation=4),  # back to back: no gap
        _x("kernel", "other_stream", 55, 15, tid=8, correlation=5),  # overlaps the copy
    ]
    idle = profile_mod.gpu_idle(events, min_gap_us=5.0)
    # Busy: [0,10] + [30,40] + [46,70] = 44 of a 70 us span.
    assert (idle["span_ms"], idle["busy_ms"], idle["idle_ms"], idle["gaps"]) == (0.07, 0.04, 0.03, 2)
    assert [(e["where"], e["gaps"]) for e in idle["top"]] == [
        ("peft/tuners/lora/layer.py(770): forward", 1),  # innermost frame outside torch around the launch
        ("autograd::engine::evaluate_function: AddmmBackward0", 1),  # no Python frame on backward's thread
    ]
    assert idle["top"][0]["idle_ms"] == 0.02
    # A larger threshold drops the 6 us gap.
    assert profile_mod.gpu_idle(events, min_gap_us=10.0)["gaps"] == 1
    assert profile_mod.gpu_idle([e for e in events if e["cat"] != "kernel" and e["cat"] != "gpu_memcpy"]) == {}


def test_lora_host_probe_writes_both_settings(bench_path, tmp_path, monkeypatch):
    """bench/lora_host_probe.py times PEFT and ours in fp32 and under bf16 autocast, forward and forward+backward,
    and records each pair with its ratio (the timings themselves are the benchmark's, not asserted here)."""
    import json
    import sys

    probe = load_bench_module("lora_host_probe")
    monkeypatch.setattr(sys, "argv", ["lora_host_probe.py", "--reps", "2", "--results_dir", str(tmp_path)])
    assert probe.main() == 0
    (path,) = tmp_path.glob("train-lora-host-*.json")
    record = json.loads(path.read_text())
    keys = {f"{s}-{w}" for s in ("fp32", "bf16-autocast") for w in ("forward", "forward_backward")}
    assert set(record["baselines"]) == set(record["ours"]) == set(record["ratios"]) == keys
    for key in keys:
        peft, ours = record["baselines"][key]["host_us_per_layer"], record["ours"][key]["host_us_per_layer"]
        assert peft > 0 and ours > 0 and record["ratios"][key] == round(peft / ours, 3)


def test_sync_sites_count_the_steps_waits_by_caller(profile_mod, monkeypatch):
    """Each wait the step makes is counted once, under its caller; the one that turning the debug mode on reports
    is not the step's. (CUDA's debug mode stood in for by warnings with its message.)"""
    import warnings

    import torch

    def set_mode(mode):
        if mode == "warn":
            warnings.warn("called a synchronizing CUDA operation")

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)

    def wait():
        warnings.warn("called a synchronizing CUDA operation")

    def step():
        wait()
        wait()
        warnings.warn("something else")

    sites = profile_mod.sync_sites(step)
    assert len(sites) == 1 and sites[0]["count"] == 2 and "test_train_profile.py" in sites[0]["where"], sites
