"""Which SDPA kernel should the training step's attention run? Forward + backward of one batch's attention at
the InternVL3-1B layout, timed per backend on this GPU, with a NaN check at the length that trips cuDNN.

    python bench/attention_probe.py

Shapes (bf16, random inputs):
    llm   8 rows x 3,712 tokens, 14 query heads of 64 over 2 key/value heads, causal, no mask: the decoder's
          attention as `internvl sft` calls it (right-padded rows, the causal mask alone), forward + backward,
          once with the key/value heads shared (`enable_gqa`, as transformers passes them) and once repeated
    vit   76 tiles x 1,025 tokens, 16 heads of 64, not causal: the frozen vision tower's, forward only
    nan   the llm shape at 3,776 tokens (64 mod 128, where torch 2.11's cuDNN backward returned NaN with an
          explicit mask, pytorch#196678), causal without a mask: are the gradients finite?

Backends: flash (PyTorch's FlashAttention-2), cudnn, efficient (memory-efficient). A backend that cannot take a
shape is reported as such. Prints one JSON line per case and writes bench/results/train-attention-<card>-<date>.json
(baseline: flash, what the step runs today).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_record  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


def tensors(batch: int, length: int, heads: int, kv_heads: int, grad: bool, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, heads, length, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, kv_heads, length, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, kv_heads, length, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def run(backend, q, k, v, *, causal: bool, gqa: bool, backward: bool):
    with sdpa_kernel([backend]):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    if backward:
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out) * 0.01)
        return out, grads
    return out, ()


def time_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def case(name: str, *, batch, length, heads, kv_heads, causal, backward, gqa, reps) -> dict:
    q, k, v = tensors(batch, length, heads, kv_heads, backward)
    if not gqa and kv_heads != heads:  # repeated key/value heads, as transformers does where it cannot pass enable_gqa
        k, v = (t.detach().repeat_interleave(heads // kv_heads, dim=1).requires_grad_(backward) for t in (k, v))
    # Attention FLOPs: 2 matmuls of 2 x L x L x 64 per head, half of them under a causal mask; backward 2.5x forward.
    flops = 4 * batch * heads * length * length * 64 * (0.5 if causal else 1.0) * (3.5 if backward else 1.0)
    result, reference = {"case": name}, None
    for label, backend in BACKENDS.items():
        try:
            out, grads = run(backend, q, k, v, causal=causal, gqa=gqa, backward=backward)
            ms = time_ms(lambda: run(backend, q, k, v, causal=causal, gqa=gqa, backward=backward), reps)
        except RuntimeError as e:
            result[label] = {"error": str(e).splitlines()[0][:160]}
            continue
        finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
        entry = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "finite": finite}
        if reference is None:
            reference = (out.float(), [g.float() for g in grads])
        else:
            entry["max_diff_out"] = round(float((out.float() - reference[0]).abs().max()), 5)
            if grads:
                entry["max_rel_grad"] = round(max(float((g.float() - r).norm() / r.norm()) for g, r in zip(grads, reference[1])), 5)
        result[label] = entry
        del out, grads
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions per backend (default: 10)")
    ap.add_argument("--results_dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("attention_probe needs a CUDA GPU", file=sys.stderr)
        return 2
    llm = dict(batch=8, heads=14, kv_heads=2, causal=True, backward=True, reps=args.reps)
    cases = [
        case("llm-gqa", length=3712, gqa=True, **llm),
        case("llm-repeated-kv", length=3712, gqa=False, **llm),
        case("vit", batch=76, length=1025, heads=16, kv_heads=16, causal=False, backward=False, gqa=False, reps=args.reps),
        case("nan-3776-gqa", length=3776, gqa=True, **llm),
        case("nan-3776-repeated-kv", length=3776, gqa=False, **llm),
    ]
    ours = {c["case"]: {k: v for k, v in c.items() if k not in ("case", "flash")} for c in cases}
    baselines = {c["case"]: c["flash"] for c in cases}
    ratios = {f"{c['case']}-{label}": round(c["flash"]["ms"] / c[label]["ms"], 3) for c in cases for label in BACKENDS if label != "flash" and "ms" in c.get(label, {}) and "ms" in c["flash"]}
    config = {"torch": torch.__version__, "torch_device": torch.cuda.get_device_name(), "dtype": "bf16", "head_dim": 64, "what": __doc__.split("\n\n")[1]}
    path = write_record(args.results_dir, "train", "attention", config=config, baselines=baselines, ours=ours, ratios=ratios)
    print(json.dumps({"event": "done", "written": str(path), "ratios_flash_ms_over_backend_ms": ratios}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
