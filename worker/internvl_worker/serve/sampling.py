"""Choosing the next token for every row of a decode batch, each row with its own parameters.

The common case (all rows greedy, no penalties) is one `argmax` and one `log_softmax` over the batch;
rows that sample or carry penalties are handled one by one, since their parameters differ. Semantics
follow transformers' logits processors, so a greedy row equals `model.generate` token for token:
repetition penalty divides positive and multiplies negative scores of every token seen (prompt included),
frequency/presence penalties (OpenAI) subtract `count * f + (count > 0) * p` over the generated tokens,
then temperature, top-k and top-p (keeping at least one token) warp the distribution before sampling.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    max_new_tokens: int = 20
    min_new_tokens: int = 0  # stop tokens are masked until this many tokens are out (benchmarks: fixed lengths)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # text stop sequences, checked on the decoded text

    def __post_init__(self) -> None:
        if self.do_sample and self.seed is None:
            # Reported back (TGI details.seed) so a sampled answer can be reproduced.
            self.seed = random.getrandbits(63)

    @property
    def needs_row_processing(self) -> bool:
        return self.do_sample or bool(self.repetition_penalty and self.repetition_penalty != 1.0) or bool(self.frequency_penalty) or bool(self.presence_penalty)


class RowState:
    """What sampling needs to remember about one running request (its generator and seen tokens)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]):
        self.params = params
        self.prompt_ids = prompt_ids
        self.generated: list[int] = []
        self._generator = None

    def generator(self, device):
        import torch

        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(int(self.params.seed or 0))
        return self._generator


def _apply_penalties(row, state: RowState) -> None:
    import torch

    p = state.params
    if p.repetition_penalty and p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(state.prompt_ids) | set(state.generated)), device=row.device, dtype=torch.long)
        scores = row.gather(0, seen)
        scores = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        row.scatter_(0, seen, scores)
    if (p.frequency_penalty or p.presence_penalty) and state.generated:
        ids = torch.tensor(state.generated, device=row.device, dtype=torch.long)
        counts = torch.zeros_like(row).scatter_add_(0, ids, torch.ones_like(ids, dtype=row.dtype))
        row -= counts * float(p.frequency_penalty or 0.0) + (counts > 0).to(row.dtype) * float(p.presence_penalty or 0.0)


def _warp(row, p: SamplingParams):
    """Temperature, top-k, top-p on one row of scores; returns log-probabilities (-inf outside the nucleus)."""
    import torch

    row = row / max(p.temperature, 1e-5)
    if p.top_k and 0 < p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p is not None and 0.0 < p.top_p < 1.0:
        sorted_scores, order = torch.sort(row, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        drop_sorted = (cum - sorted_scores.softmax(-1)) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        row = row.masked_fill(drop, float("-inf"))
    return row.log_softmax(-1)


def next_tokens(logits, states: list[RowState], stop_ids: list[int], while_waiting=None) -> tuple[list[int], list[float]]:
    """logits: (rows, vocab) for the last position of each row -> (token per row, its log-probability).
    `while_waiting()` runs once the work is queued on the GPU, before the wait for its results."""
    import torch

    logits = logits.float()
    if stop_ids:
        early = [i for i, s in enumerate(states) if len(s.generated) < s.params.min_new_tokens]
        if early:
            rows = torch.tensor(early, device=logits.device)
            cols = torch.tensor(stop_ids, device=logits.device)
            logits[rows[:, None], cols[None, :]] = float("-inf")
    special = [i for i, s in enumerate(states) if s.params.needs_row_processing]
    for i in special:
        _apply_penalties(logits[i], states[i])
    logprobs = logits.log_softmax(-1)
    tokens = logits.argmax(-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    for i in special:
        p = states[i].params
        if not p.do_sample:
            continue
        warped = _warp(logits[i], p)
        tok = torch.multinomial(warped.exp(), 1, generator=states[i].generator(logits.device))[0]
        tokens[i] = tok
        chosen[i] = warped[tok]
    return to_host(tokens, chosen, while_waiting)


def to_host(tokens, chosen, while_waiting=None) -> tuple[list[int], list[float]]:
    """The step's tokens and log-probabilities as Python lists, copied to pinned host memory and waited for
    with `wait_for` (GIL released)."""
    import torch

    if tokens.device.type != "cuda":
        wait_for(None, while_waiting)
        return tokens.tolist(), chosen.tolist()
    host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host_chosen = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
    host_tokens.copy_(tokens, non_blocking=True)
    host_chosen.copy_(chosen, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    wait_for(done, while_waiting)
    return host_tokens.tolist(), host_chosen.tolist()


def wait_for(done, while_waiting=None) -> None:
    """Run `while_waiting()`, then wait for the CUDA event `done` (None on a CPU: nothing to wait for).

    The wait releases the GIL (an event synchronize), where `.tolist()` on a CUDA tensor would hold it for
    the whole step and the HTTP event loop, which streams every token, could not run while the GPU computes.
    `while_waiting` is where the engine hands the previous step's tokens to the event loop, so the loop
    streams them while the GPU computes this step."""
    if while_waiting is not None:
        while_waiting()
    if done is not None:
        done.synchronize()
