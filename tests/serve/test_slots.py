"""The fixed-slot decode path (serve/slots.py): same tokens as the reference, rows joining and leaving.

On a CPU the slots run eagerly (`decode="static"`); the CUDA-graph replay of the very same step function
is checked by tests/gpu/test_serve_graphs.py.
"""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from internvl_worker.infer import inference
from internvl_worker.serve import slots
from internvl_worker.serve.engine import Engine, EngineError, Handle, Prepared, load_served_model
from internvl_worker.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    """The tiny model served without adapters (adapters force the eager path)."""
    return load_served_model(model_id_or_path=str(tiny_model_dir), dtype="fp32", device_map={"": "cpu"})


def _prepared(sm, query: str, image=None, *, features: bool = True) -> Prepared:
    """A request as prepare.py leaves it: image features computed, or (features=False) the pixels for the
    engine to encode."""
    from internvl_worker.infer import build_conversation
    from internvl_worker.serve.engine import encode_images

    t = sm.template
    pixel_values, tiles = t.tiler([image]) if image is not None else (None, [])
    enc = t.encode(build_conversation(query, [], [image] if image is not None else [], None), tiles, check_length=False)
    p = Prepared(input_ids=enc.input_ids, image_tokens=enc.image_tokens, tiles=tiles)
    if pixel_values is not None:
        if features:
            p.image_features = encode_images(sm, pixel_values)
        else:
            p.pixel_values = pixel_values
    return p


def _run(engine: Engine, jobs) -> list[list[int]]:
    handles = [engine.submit(Handle(SamplingParams(max_new_tokens=n, min_new_tokens=n), None, p)) for p, n in jobs]
    out = []
    for h in handles:
        toks = [ev[1] for ev in h.events_sync(timeout=120) if ev[0] == "token"]
        out.append(toks)
    return out


def test_slot_engine_equals_reference_while_rows_join_and_leave(plain):
    red, green = Image.new("RGB", (64, 48), (250, 10, 10)), Image.new("RGB", (40, 70), (10, 240, 10))
    words = "red green blue cat dog road city poem left right".split()
    # every other image request leaves its pixels for the engine (batched vision tower on the slot path)
    jobs = [(_prepared(plain, f"What is the {w}?", [red, green, None][i % 3], features=i % 2 == 0), 3 + (i * 5) % 11) for i, w in enumerate(words)]
    assert any(p.pixel_values is not None for p, _ in jobs)
    eager = Engine(plain, max_batch_size=4, decode="eager", max_total_tokens=512)
    static = Engine(plain, max_batch_size=4, decode="static", max_total_tokens=512)
    for e in (eager, static):
        e.start()
    try:
        want = _run(eager, jobs)
        got = _run(static, jobs)
    finally:
        eager.shutdown(30)
        static.shutdown(30)
    assert static.decode_info["decode"] == "static" and static.decode_info["slots"] == 4
    assert static.decode_info["layers"] == "fused"  # the tiny Qwen2 LM takes the fused layers
    assert eager.decode_info["decode"] == "eager"
    assert got == want
    assert [len(t) for t in got] == [n for _, n in jobs]
    assert all(p.pixel_values is None and (p.image_features is not None) == (p.tiles != []) for p, _ in jobs)  # encoded in the engine
    # and the slots equal plain `generate` up to its first stop token: spot-check two rows
    tok = plain.template.tokenizer
    stops = set(plain.template.stop_token_ids or [])
    for i in (0, 1):
        text = inference(plain.model, plain.template, f"What is the {words[i]}?", images=[[red], [green]][i], max_new_tokens=jobs[i][1])[0]
        ours = next((got[i][:k] for k, t in enumerate(got[i]) if t in stops), got[i])
        assert tok.decode(ours, skip_special_tokens=True) == text


def check_steps_against_forward(model, dec) -> None:
    """Decode three tokens for two rows of different lengths, then compact row 0 away and decode on: each
    step's logits equal a no-cache forward of the model."""
    from transformers.cache_utils import DynamicCache

    prompts = [[5, 9, 13, 2, 7, 30, 31], [8, 3, 22]]
    seqs = [list(p) for p in prompts]
    for slot, p in enumerate(prompts):
        cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=torch.tensor([p]), use_cache=True, cache=cache)
        dec.write_prompt(slot, [(layer.keys, layer.values) for layer in cache.layers])
    with torch.inference_mode():
        for step in range(3):
            nxt = [17 + step, 40 + step]
            logits = dec.step(nxt, [len(s) for s in seqs]).clone()
            for i, t in enumerate(nxt):
                seqs[i].append(t)
                ref = model(input_ids=torch.tensor([seqs[i]])).logits[0, -1]
                torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4)
        # row 0 leaves: row 1 moves into slot 0 and decodes on from there
        dec.compact([1], used_columns=len(seqs[1]))
        logits = dec.step([99], [len(seqs[1])]).clone()
        seqs[1].append(99)
        ref = model(input_ids=torch.tensor([seqs[1]])).logits[0, -1]
        torch.testing.assert_close(logits[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-layers", "transformers-layers"])
def test_slot_step_logits_equal_a_full_forward(plain, fused):
    dec = slots.SlotDecoder(plain.model, slots=3, max_len=300, use_graphs=False, fused=fused)
    assert (dec.fused is not None) == fused
    check_steps_against_forward(plain.model, dec)


def test_buckets_and_slot_planning():
    assert [slots.batch_bucket(n, 64) for n in (1, 3, 5, 17, 33, 64)] == [1, 4, 8, 24, 48, 64]
    assert slots.batch_bucket(70, 40) == 40  # never above the slot count
    assert slots.length_buckets(1500) == [256, 512, 1024, 1500]
    assert slots.length_bucket(257, 1500) == 512
    with pytest.raises(ValueError, match="1501 KV columns, over the cache's 1500"):
        slots.length_bucket(1501, 1500)
    # InternVL3-1B's LM: 24 layers x 2 KV heads x 64 dims x (K and V) x 2 bytes = 12,288 bytes a token
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
    per = slots.kv_bytes_per_token(cfg, 2)
    assert per == 12_288
    assert slots.plan_slots(wanted=64, max_len=10_240, bytes_per_token=per, free_bytes=70 * 10**9, fraction=0.5) == 64
    assert slots.plan_slots(wanted=64, max_len=10_240, bytes_per_token=per, free_bytes=4 * 10**9, fraction=0.5) == 15


def test_decode_modes(plain, served_model):
    with pytest.raises(ValueError, match="decode 'fast'"):
        Engine(plain, decode="fast")
    e = Engine(plain, decode="graphs")
    with pytest.raises(EngineError, match="--decode graphs: no CUDA device"):
        e.start()
    auto = Engine(plain, decode="auto")  # CPU: eager, and it says why
    auto.start()
    auto.shutdown(10)
    assert auto.decode_info == {"decode": "eager", "why": "no CUDA device"}
    adapters = Engine(served_model, decode="static")
    adapters.start()
    adapters.shutdown(10)
    assert adapters.decode_info["decode"] == "eager" and "LoRA adapters" in adapters.decode_info["why"]


def test_greedy_choice_in_the_step_equals_next_tokens(plain):
    """The step's own greedy pick (token and log-probability, stop tokens masked for rows under
    min_new_tokens) equals sampling.next_tokens on the same logits."""
    from internvl_worker.serve.sampling import RowState, next_tokens

    model = plain.model
    probe = slots.SlotDecoder(model, slots=2, max_len=256, use_graphs=False)
    with torch.inference_mode():
        top = probe.step([11, 12], [0, 0]).argmax(-1).tolist()
    stops = [top[0], 3]  # row 0's favourite is a stop token: masked while row 0 is early
    dec = slots.SlotDecoder(model, slots=2, max_len=256, use_graphs=False, stop_ids=stops)
    states = [RowState(SamplingParams(min_new_tokens=5), []), RowState(SamplingParams(), [])]
    with torch.inference_mode():
        logits = dec.step([11, 12], [0, 0], early=[True, False])
        flushed = []
        tokens, logprobs = dec.greedy(2, while_waiting=lambda: flushed.append(1))
        want_tokens, want_logprobs = next_tokens(logits.clone(), states, stops)
    assert flushed == [1]
    assert tokens == want_tokens and tokens[0] != top[0] and tokens[1] == top[1]
    assert logprobs == pytest.approx(want_logprobs, abs=1e-5)
    with torch.inference_mode():  # not early any more: the stop token may win
        dec.step([11, 12], [0, 0], early=[False, False])
        assert dec.greedy(2)[0] == top


def test_admission_rounds_are_pooled():
    from internvl_worker.serve.engine import admit_now

    rule = dict(ratio=0.3, max_steps=20)
    assert admit_now(1, 0, 0, **rule)  # nothing running: at once
    assert not admit_now(0, 0, 50, **rule)  # nobody waiting
    assert not admit_now(2, 10, 0, **rule) and admit_now(3, 10, 0, **rule)  # 3 >= 0.3 x 10
    assert not admit_now(1, 63, 19, **rule) and admit_now(1, 63, 20, **rule)  # waited 20 steps: admitted anyway
    assert admit_now(1, 63, 0, ratio=0.3, max_steps=0)  # --max-waiting-tokens 0: every step


def test_pooled_admission_keeps_every_answer(plain):
    """A high --waiting-served-ratio holds newcomers back while a long request runs: two that arrive two steps
    apart are admitted in one round once --max-waiting-tokens steps have passed (without pooling they would
    take a round each), and every answer still equals the eager path's."""
    from internvl_worker.serve.metrics import Metrics

    jobs = [(_prepared(plain, "What is the red?"), 80), (_prepared(plain, "And the green?"), 5), (_prepared(plain, "Blue?"), 7)]
    metrics = Metrics()
    eager = Engine(plain, max_batch_size=4, decode="eager", max_total_tokens=512)
    pooled = Engine(plain, max_batch_size=4, decode="static", max_total_tokens=512, metrics=metrics, waiting_served_ratio=10.0, max_waiting_tokens=40)
    for e in (eager, pooled):
        e.start()
    try:
        want = _run(eager, jobs)
        long = pooled.submit(Handle(SamplingParams(max_new_tokens=80, min_new_tokens=80), None, jobs[0][0]))
        long_events = long.events_sync(timeout=120)
        first = next(long_events)  # the long request is running
        short = []
        for p, n in jobs[1:]:  # the second newcomer comes two steps after the first
            at = pooled.steps
            short.append(pooled.submit(Handle(SamplingParams(max_new_tokens=n, min_new_tokens=n), None, p)))
            while pooled.steps < at + 2:
                time.sleep(0.0005)
        got_short = [[ev[1] for ev in h.events_sync(timeout=120) if ev[0] == "token"] for h in short]
        got_long = [first[1]] + [ev[1] for ev in long_events if ev[0] == "token"]
    finally:
        eager.shutdown(30)
        pooled.shutdown(30)
    assert [got_long] + got_short == want
    rounds = metrics.prefill_requests.collect()[0].samples
    count = next(x.value for x in rounds if x.name.endswith("_count"))
    total = next(x.value for x in rounds if x.name.endswith("_sum"))
    assert (count, total) == (2, 3)  # the long one alone, then both newcomers in one round


def test_chained_steps_give_the_eager_tokens(plain):
    """Greedy rows on the slot path run chained steps (the next one queued on the device before the last
    is read). Row 0 meets a stop token mid-way, so a chained step computed for it is dropped; a sampled
    request joins later (the chain is taken in first). Every answer equals the eager path's."""
    prompts = [_prepared(plain, q) for q in ("What is the red?", "Tell me a story", "Name three colours")]
    probe = Engine(plain, max_batch_size=4, decode="eager", max_total_tokens=512)
    probe.start()
    try:
        free = _run_free(probe, prompts, 30)
    finally:
        probe.shutdown(30)
    stop = free[0][6]  # a token row 0 emits at step 7: made a stop token, row 0 ends there
    results, chained = {}, 0
    for mode in ("eager", "static"):
        engine = Engine(plain, max_batch_size=4, decode=mode, max_total_tokens=512)
        engine.stop_ids = engine.stop_ids + [stop]
        engine.start()
        try:
            results[mode] = _run_free(engine, prompts, 30)
            sampled = engine.submit(Handle(SamplingParams(max_new_tokens=12, do_sample=True, seed=7), None, prompts[1]))
            results[mode].append([ev[1] for ev in sampled.events_sync(timeout=60) if ev[0] == "token"])
        finally:
            engine.shutdown(30)
        chained = engine.chained_steps
    assert results["static"] == results["eager"]
    assert results["eager"][0][-1] == stop and len(results["eager"][0]) <= 7 < len(results["eager"][1])
    assert chained > 10


def _run_free(engine: Engine, prepared: list, n: int) -> list[list[int]]:
    handles = [engine.submit(Handle(SamplingParams(max_new_tokens=n), None, p)) for p in prepared]
    out = [[ev[1] for ev in h.events_sync(timeout=120) if ev[0] == "token"] for h in handles]
    time.sleep(0.2)
    assert all(h.queue.empty() for h in handles)  # nothing after a request's end (a dropped chained step)
    return out


def test_cancelling_a_chained_request_keeps_the_others_right(plain):
    """A request cancelled while its steps are chained ends with "cancelled" and nothing after; the request
    decoding beside it still gets the eager path's tokens."""
    prompts = [_prepared(plain, "What is the red?"), _prepared(plain, "Tell me a story")]
    eager = Engine(plain, max_batch_size=4, decode="eager", max_total_tokens=512)
    eager.start()
    try:
        want = _run_free(eager, prompts[1:], 40)[0]
    finally:
        eager.shutdown(30)
    engine = Engine(plain, max_batch_size=4, decode="static", max_total_tokens=512)
    engine.start()
    try:
        doomed = engine.submit(Handle(SamplingParams(max_new_tokens=200, min_new_tokens=200), None, prompts[0]))
        other = engine.submit(Handle(SamplingParams(max_new_tokens=40), None, prompts[1]))
        events = doomed.events_sync(timeout=60)
        seen = [next(events) for _ in range(5)]
        doomed.cancel()
        rest = list(events)
        got = [ev[1] for ev in other.events_sync(timeout=60) if ev[0] == "token"]
        time.sleep(0.2)
    finally:
        engine.shutdown(30)
    assert all(ev[0] == "token" for ev in seen)
    assert rest[-1] == ("done", "cancelled") and len(rest) < 200 and doomed.queue.empty()
    assert got == want
    assert engine.chained_steps > 0


def test_long_prompts_prefill_in_chunks_between_decode_steps(plain):
    """With --prefill-chunk-tokens 16, a ~100-token prompt goes in chunk by chunk while a short request
    keeps decoding (its tokens stream before the long one's first token); both answers equal the eager
    path's. Alone, a long prompt goes in one forward (nobody to wait on it)."""
    long_prompt = _prepared(plain, "Describe the picture please and tell me " * 10)
    short = _prepared(plain, "What is the red?")
    assert len(long_prompt.input_ids) > 6 * 16
    eager = Engine(plain, max_batch_size=4, decode="eager", max_total_tokens=512)
    eager.start()
    try:
        want_short, want_long = _run(eager, [(short, 30), (long_prompt, 8)])
    finally:
        eager.shutdown(30)
    engine = Engine(plain, max_batch_size=4, decode="static", max_total_tokens=512, prefill_chunk_tokens=16)
    order = []
    emit = engine._emit
    engine._emit = lambda h, ev: (order.append((h, ev[0])), emit(h, ev))[1]
    engine.start()
    try:
        assert engine.decode_info["prefill_chunk_tokens"] == 16
        hs = engine.submit(Handle(SamplingParams(max_new_tokens=30, min_new_tokens=30), None, short))
        first = next(hs.events_sync(timeout=60))  # the short request is decoding ...
        hl = engine.submit(Handle(SamplingParams(max_new_tokens=8, min_new_tokens=8), None, long_prompt))  # ... when this arrives
        got_long = [ev[1] for ev in hl.events_sync(timeout=60) if ev[0] == "token"]
        got_short = [first[1]] + [ev[1] for ev in hs.events_sync(timeout=60) if ev[0] == "token"]
        chunks = engine.prefill_chunks
        alone = _run(engine, [(long_prompt, 8)])[0]
    finally:
        engine.shutdown(30)
    assert got_short == want_short and got_long == want_long and alone == want_long
    assert chunks >= len(long_prompt.input_ids) // 16
    assert engine.prefill_chunks == chunks + 1  # alone: the whole prompt in one forward
    long_first = next(i for i, (h, kind) in enumerate(order) if h is hl and kind == "token")
    short_before = sum(1 for h, kind in order[:long_first] if h is hs and kind == "token")
    assert short_before >= chunks  # a decode step between every two chunks
