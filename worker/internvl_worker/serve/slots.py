"""Decode on a fixed-size KV cache, one slot per running request, replayed as CUDA graphs.

Why: an eager decode step of the 0.5B language model launches ~400 small kernels from Python, so the GPU
waits on the CPU (21 ms a step on an H100 where the weights take 0.3 ms to read). A CUDA graph launches
the whole step at once, and a graph needs every tensor at a fixed address: hence fixed buffers.

Layout per layer: keys/values (slots, kv_heads, max_len, head_dim). Running request i lives in slot i
(rows are kept compact: when a request leaves, the last ones move down into its slot), and its token at
position p sits in column p, so RoPE positions and columns agree and no row is ever shifted.

One step for n rows runs a graph captured for a batch bucket B >= n (1, 2, 4, 8, 16, 24, 32, 48, 64, ...)
and a length bucket L >= the longest row + 1 (256, 512, ... up to max_len): attention reads columns
[0, L) under a mask `column <= position`, so a short batch does not pay for the longest possible row.
Rows n..B-1 are padding: token 0 at position 0 of their own (free) slot, never read by a real row.

The step runs the language model's own weights through fused.py's layers (fused QKV and gate/up GEMMs,
residuals added inside the GEMMs, grouped-query attention without repeated keys: about 12 kernels a layer
instead of ~20) for the Llama family (Qwen2/2.5/3, Llama, InternLM2 converted to Llama). Any other layer
runs transformers' own modules with a cache object whose `update` writes column `position` of each row in
place, so every architecture still decodes through the code `generate` uses.
Without CUDA (or with graphs off) the same function runs eagerly: that is how the CPU tests check it
against the reference path token for token.
"""

from __future__ import annotations

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_LENGTH_BUCKET = 256


def batch_bucket(n: int, max_slots: int) -> int:
    for b in BATCH_BUCKETS:
        if b >= n:
            return min(b, max_slots)
    return max_slots


def length_buckets(max_len: int) -> list[int]:
    """256, 512, ... doubling, then max_len itself."""
    out, b = [], MIN_LENGTH_BUCKET
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


def length_bucket(needed: int, max_len: int) -> int:
    for b in length_buckets(max_len):
        if b >= needed:
            return b
    raise ValueError(f"a row needs {needed} KV columns, over the cache's {max_len}")


def kv_shape(text_config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the language model's KV cache."""
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    return text_config.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_token(text_config, dtype_bytes: int) -> int:
    layers, kv_heads, head_dim = kv_shape(text_config)
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def plan_slots(*, wanted: int, max_len: int, bytes_per_token: int, free_bytes: int, fraction: float) -> int:
    """How many slots of max_len columns fit in `fraction` of the free memory (at most `wanted`)."""
    per_slot = bytes_per_token * max_len
    return max(0, min(wanted, int(free_bytes * fraction) // per_slot))


class _SlotLayer:
    """One layer's view for one step: writes the new key/value of each row at its position, returns
    columns [0, L) of the rows in the step."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values  # (slots, kv_heads, max_len, head_dim)
        self.rows = self.pos = None
        self.b = self.length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        b, length = self.b, self.length
        # (b, heads, 1, dim) -> (b, heads, dim) written at [row, :, pos[row]]
        self.keys[:b][self.rows, :, self.pos] = key_states[:, :, 0]
        self.values[:b][self.rows, :, self.pos] = value_states[:, :, 0]
        return self.keys[:b, :, :length], self.values[:b, :, :length]


class _SlotCache:
    """What the language model calls on its cache during a decode step (update, and the length)."""

    is_compileable = False

    def __init__(self, layers: list[_SlotLayer]):
        self.layers = layers

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length - 1

    def __len__(self) -> int:
        return len(self.layers)


class SlotDecoder:
    """Fixed KV buffers for `slots` requests of up to `max_len` tokens, and the decode step over them."""

    def __init__(self, model, *, slots: int, max_len: int, use_graphs: bool | None = None, compile: bool = False, fused: bool = True, stop_ids: list[int] | None = None, liger: bool = False, triton: bool = False):
        import torch

        from . import fused as fused_layers

        self.model = model
        self.lm = model.model.language_model
        self.head = model.lm_head
        emb = self.lm.get_input_embeddings().weight
        self.device, self.dtype = emb.device, emb.dtype
        cfg = self.lm.config
        n_layers, kv_heads, head_dim = kv_shape(cfg)
        self.slots, self.max_len = slots, max_len
        # Fewer kernels a layer (fused.py) where the architecture allows; transformers' layers otherwise.
        self.fused_why = fused_layers.unsupported(self.lm) if fused else "turned off"
        # With the fused layers, one more slot than decode rows: the scratch slot where a long prompt is
        # prefilled chunk by chunk between decode steps (prefill_chunk). No decode graph ever reads or writes
        # it (its padding rows use slots below `slots`), so a prompt half-way through is safe there.
        self.scratch = slots if self.fused_why is None else None
        shape = (slots + (self.scratch is not None), kv_heads, max_len, head_dim)
        self.layers = [_SlotLayer(torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(n_layers)]
        self.cache = _SlotCache(self.layers)
        # Static inputs and outputs: graphs read and write these addresses. The inputs are one buffer, so a
        # step's arrive in one copy: token, position, and 1 while the row is under min_new_tokens (its stop
        # tokens are masked in the greedy pick).
        self._inputs = torch.zeros(3, slots, dtype=torch.long, device=self.device)
        self.ids, self.pos, self.early = self._inputs[0], self._inputs[1], self._inputs[2]
        self.rows = torch.arange(slots, device=self.device)
        pinned = self.device.type == "cuda"
        self._host = torch.zeros(3, slots, dtype=torch.long, pin_memory=pinned)
        # The greedy choice is made inside the step (graph) too: (token, its log-probability) per row, as
        # float64 (token ids are exact) so that one copy brings both back.
        self.stop_ids = torch.tensor(sorted(set(stop_ids or [])), dtype=torch.long, device=self.device)
        self._picked = torch.zeros(2, slots, dtype=torch.float64, device=self.device)
        # Two of each host buffer: with one step queued ahead (step_chained), the last one's copy may be in use.
        self._picked_hosts = [torch.zeros(2, slots, dtype=torch.float64, pin_memory=pinned) for _ in range(2)]
        self._early_hosts = [torch.zeros(slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._flips = [0, 0]
        self.columns = torch.arange(max_len, device=self.device)
        self.logits = torch.empty(slots, self.head.weight.shape[0], dtype=self.dtype, device=self.device)
        self.layer_types = sorted(set(getattr(cfg, "layer_types", None) or ["full_attention"]))
        # Our own Triton kernels (kernels.py: split-KV attention, RoPE with the KV write, SiLU x up) in them.
        self.triton_why = (fused_layers.triton_unsupported(self.lm) if triton else "turned off") if self.fused_why is None else self.fused_why
        self.fused = fused_layers.FusedLayers(self.lm, liger=liger, triton=self.triton_why is None) if self.fused_why is None else None
        self._slot_kv = [(layer.keys, layer.values) for layer in self.layers]
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.graphs: dict[tuple[int, int], object] = {}
        self._pool = None
        # torch.compile fuses the step's ~40 small kernels a layer (RMSNorm, RoPE, SiLU, residuals) into
        # a few; dynamic shapes so that one compilation serves every bucket (batch 1 compiles apart).
        self._run = torch.compile(self._forward, dynamic=True) if compile else self._forward

    @property
    def own_attention(self) -> bool:
        """Whether the step runs our Triton kernels (kernels.py) rather than SDPA."""
        return self.fused is not None and self.fused.kernels is not None

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))

    # -- rows in and out

    def write_prompt(self, slot: int, kv: list) -> None:
        """Put a prefilled prompt's cache (per layer (keys, values), each (1, heads, P, dim)) in a slot."""
        n = kv[0][0].shape[-2]
        if n > self.max_len:
            raise ValueError(f"prompt of {n} tokens over the slot length {self.max_len}")
        for layer, (k, v) in zip(self.layers, kv):
            layer.keys[slot, :, :n] = k[0]
            layer.values[slot, :, :n] = v[0]

    def prefill(self, embeds, first_slot: int, last: list[int]):
        """Right-padded prompts (b, T, hidden) straight into slots first_slot.. (fused layers only; see
        fused.FusedLayers.prefill); returns (b, vocab) logits at each row's last prompt token (`last`)."""
        import torch

        b, t = embeds.shape[:2]
        if self.fused is None:
            raise ValueError(f"prefill into slots needs the fused layers ({self.fused_why})")
        if t > self.max_len or first_slot + b > self.slots:
            raise ValueError(f"{b} prompts of {t} tokens from slot {first_slot}: over {self.slots} slots of {self.max_len}")
        slot_ids = torch.arange(first_slot, first_slot + b, device=self.device)
        hidden = self.fused.prefill(embeds, self._slot_kv, slot_ids, torch.tensor(last, device=self.device))
        return self.head(hidden)

    def prefill_chunk(self, embeds, start: int, last: bool):
        """One chunk of a long prompt, (t, hidden) at positions start.., into the scratch slot: its keys and
        values land in columns [start, start + t), and its tokens attend to every earlier column there.
        Returns the (vocab,) logits at the chunk's last token when `last`, else None. `take_scratch` then
        moves the whole prompt into a decode slot."""
        import torch

        if self.scratch is None:
            raise ValueError(f"chunked prefill needs the fused layers ({self.fused_why})")
        t = embeds.shape[0]
        if start + t > self.max_len:
            raise ValueError(f"prompt chunk [{start}, {start + t}) over the slot length {self.max_len}")
        slot = torch.tensor([self.scratch], device=self.device)
        hidden = self.fused.prefill(embeds[None], self._slot_kv, slot, torch.tensor([t - 1], device=self.device), start=start)
        return self.head(hidden)[0] if last else None

    def take_scratch(self, slot: int, columns: int) -> None:
        """Copy the scratch slot's first `columns` keys/values into decode slot `slot`."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} of {self.slots}")
        for layer in self.layers:
            layer.keys[slot, :, :columns] = layer.keys[self.scratch, :, :columns]
            layer.values[slot, :, :columns] = layer.values[self.scratch, :, :columns]

    def compact(self, keep: list[int], used_columns: int) -> None:
        """Rows `keep` (ascending) move to slots 0..len(keep)-1; only the first used_columns are copied."""
        import torch

        moves = [(src, dst) for dst, src in enumerate(keep) if src != dst]
        if not moves:
            return
        src = torch.tensor([m[0] for m in moves], device=self.device)
        dst = torch.tensor([m[1] for m in moves], device=self.device)
        cols = min(used_columns, self.max_len)
        for layer in self.layers:
            for buf in (layer.keys, layer.values):
                # Gather-then-scatter copies first, so overlapping moves (src > dst always) are safe.
                buf[dst, :, :cols] = buf[src, :, :cols]

    # -- the step

    def step(self, tokens: list[int], positions: list[int], early: list[bool] | None = None):
        """One decode step for rows 0..n-1 (row i feeds tokens[i] at positions[i]; early[i]: its stop tokens
        are masked in the greedy choice); returns (n, vocab) logits. The returned tensor is a view of a static
        buffer: read it, or `greedy()`, before the next step."""
        import torch

        n = len(tokens)
        if not 0 < n <= self.slots:
            raise ValueError(f"{n} rows for {self.slots} slots")
        b = batch_bucket(n, self.slots)
        length = length_bucket(max(positions) + 1, self.max_len)
        # One host->device copy of (tokens, positions), from a pinned buffer allocated once (the engine
        # reads each step's results before the next, so the buffer is free again). Padding rows get
        # token 0 at position 0.
        # The whole buffer goes, not the [:, :b] columns: a strided copy_ stages through a pageable temporary,
        # and a copy from pageable memory waits for the GPU to finish all queued work first.
        host = self._host
        host.zero_()
        host[0, :n] = torch.tensor(tokens)
        host[1, :n] = torch.tensor(positions)
        if early is not None and any(early):
            host[2, :n] = torch.tensor(early)
        self._inputs.copy_(host, non_blocking=True)
        self._launch(b, length)
        return self.logits[:n]

    def step_chained(self, n: int, positions: list[int], early: list[bool]) -> None:
        """The next step for the same n rows, fed on the device by the last step's own greedy tokens and
        positions (each step writes them back into its inputs): it needs nothing from the host but the rows'
        min_new_tokens flags, so it can be queued before the host has read the last step's tokens, and the
        GPU does not idle while the host hands them out. `positions`: this step's (for its length bucket)."""
        import torch

        b = batch_bucket(n, self.slots)
        length = length_bucket(max(positions) + 1, self.max_len)
        flags = self._early_hosts[self._flips[0]]
        self._flips[0] ^= 1
        flags[:b].zero_()
        if any(early):
            flags[:n] = torch.tensor(early)
        self.early[:b].copy_(flags[:b], non_blocking=True)
        self._launch(b, length)

    def _launch(self, b: int, length: int) -> None:
        if not self.use_graphs:
            self._run(b, length)
            return
        graph = self.graphs.get((b, length))
        if graph is None:
            graph = self.graphs[(b, length)] = self._capture(b, length)
        graph.replay()

    def _forward(self, b: int, length: int) -> None:
        if self.own_attention:  # no SDPA in the step
            self._forward_step(b, length)
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # cuDNN's attention is off for the engine (a plan per new prefill length); decode shapes are fixed per
        # graph, and cuDNN is the fastest SDPA kernel with a mask here (H100, fused layers, engine in-process at
        # batch 1: 505 tokens/s with it, 377 without), so the step asks for it first. Every backend is listed:
        # torch 2.11 restores the priority list without an unlisted one (OVERRIDEABLE), and the next engine's
        # sdpa_kernel then fails with "4 is not in list".
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
        order += [SDPBackend.OVERRIDEABLE] if hasattr(SDPBackend, "OVERRIDEABLE") else []
        with sdpa_kernel(order, set_priority=True):
            self._forward_step(b, length)

    def _forward_step(self, b: int, length: int) -> None:
        import torch

        pos = self.pos[:b]
        # Our own attention kernel reads each row's columns up to its position and needs no mask.
        allowed = None if self.own_attention else (self.columns[:length][None, :] <= pos[:, None])[:, None, None, :]  # (b, 1, 1, L)
        if self.fused is not None:
            # One additive mask for every layer (a boolean one is converted inside each attention call).
            bias = None if allowed is None else torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))
            hidden = self.fused.forward(self.ids[:b], pos, bias, self._slot_kv, self.rows[:b], length)
        else:
            for layer in self.layers:
                layer.rows, layer.pos, layer.b, layer.length = self.rows[:b], pos, b, length
            out = self.lm(
                input_ids=self.ids[:b, None],
                position_ids=pos[:, None],
                attention_mask={kind: allowed for kind in self.layer_types},
                cache=self.cache,
                use_cache=True,
            )
            hidden = out.last_hidden_state[:, -1]
        if self.head.bias is None:
            torch.matmul(hidden, self.head.weight.t(), out=self.logits[:b])
        else:
            self.logits[:b] = self.head(hidden)
        # Greedy choice, as sampling.next_tokens makes it for greedy rows: stop tokens masked for early rows,
        # argmax, and its log-probability.
        scores = self.logits[:b].float()
        if self.stop_ids.numel():
            masked = torch.where(self.early[:b, None] > 0, float("-inf"), 0.0).expand(b, self.stop_ids.numel())
            scores.index_add_(1, self.stop_ids, masked)
        token = scores.argmax(-1)
        self._picked[0, :b] = token
        self._picked[1, :b] = scores.gather(1, token[:, None])[:, 0] - scores.logsumexp(-1)
        # The next step's inputs, should it be chained (step_chained): this step's tokens, one position on.
        self.ids[:b].copy_(token)
        self.pos[:b] += 1

    def start_read(self, n: int):
        """Queue the copy of the last step's greedy picks (rows 0..n-1) to the host; `finish_read` waits."""
        import torch

        host = self._picked_hosts[self._flips[1]]
        self._flips[1] ^= 1
        # The whole (contiguous) buffer: a strided [:, :n] copy would stage through pageable memory, which
        # makes the copy wait for the step, and a chained step would no longer overlap the host's work
        # (H100, batch 1: 1.43 ms between tokens for a 1.17 ms step).
        host.copy_(self._picked, non_blocking=True)
        host = host[:, :n]
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return host, done

    def finish_read(self, read, while_waiting=None) -> tuple[list[int], list[float]]:
        """(tokens, log-probabilities) of a `start_read`, as Python lists (sampling.wait_for: `while_waiting()`
        runs first, and the wait releases the GIL)."""
        from .sampling import wait_for

        host, done = read
        wait_for(done, while_waiting)
        tokens, logprobs = host.tolist()
        return [int(t) for t in tokens], logprobs

    def greedy(self, n: int, while_waiting=None) -> tuple[list[int], list[float]]:
        """The last step's greedy (token, log-probability) for rows 0..n-1."""
        return self.finish_read(self.start_read(n), while_waiting)

    def _capture(self, b: int, length: int):
        """Record one step for this (batch, length) bucket. The warm-up runs compute this very step (same
        inputs, so the writes they make are the ones the replay makes again)."""
        import torch

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        inputs = self._inputs.clone()  # a step moves its inputs on (tokens, positions): warm up on the same ones
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(b, length)
                self._inputs.copy_(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._run(b, length)
        return graph

    def capture_all(self, max_batch: int | None = None) -> int:
        """Capture every (batch, length) bucket up front, so no request pays for a capture. Returns the count.
        The inputs are padding (token 0 at position 0), written only to column 0 of each slot."""
        if not self.use_graphs:
            return 0
        import torch

        top = batch_bucket(max_batch or self.slots, self.slots)
        for b in sorted({batch_bucket(x, self.slots) for x in BATCH_BUCKETS if x <= top} | {top}):
            for length in length_buckets(self.max_len):
                if (b, length) not in self.graphs:
                    self._inputs[:, :b].zero_()
                    self.graphs[(b, length)] = self._capture(b, length)
        torch.cuda.synchronize(self.device)
        return len(self.graphs)
