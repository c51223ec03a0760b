"""The generation engine: load once, prepare requests off the decode thread, batch decode steps.

Three kinds of threads, so that no request waits on another's slow part:

- the HTTP event loop (app.py): parses, detokenizes, writes responses; never runs the model;
- a preprocessing pool: fetches and decodes images, tiles them, encodes the prompt, and runs the vision
  tower (on its own CUDA stream) so the image features are ready before the request reaches the engine;
- one engine thread that owns the language model: at each step boundary it admits waiting requests
  (prefill each alone, then copy its KV cache into a row of the batch, see kvbatch.py), then runs one
  decode step for all rows, and hands the tokens to the event loop in one call per step.

transformers 5.24 has its own continuous batching (`generate_batch`, `ContinuousBatchingManager` in
generation/continuous_batching): its requests are token-id lists only (`RequestState.initial_tokens`;
the model runner calls `model(input_ids=..., position_ids=..., cache=paged)`), with no way to pass
pixel values or image features, so it cannot serve InternVL's image tokens. Hence this scheduler.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..images import pixels_on_device
from .sampling import RowState, SamplingParams, next_tokens

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class EngineError(Exception):
    """A request failed inside the engine (the error goes to that request; the server keeps serving)."""


class EngineOverloaded(EngineError):
    pass


# --------------------------------------------------------------------------------------------- loading


@dataclass
class ServedModel:
    """The loaded model plus what serving needs to know about it."""

    loaded: object  # modeling.LoadedModel
    name: str  # the model name clients see (/v1/models, /info, `model` in responses)
    adapters: dict[str, str] = field(default_factory=dict)  # served adapter name -> PEFT adapter name
    default_adapter: str | None = None  # PEFT adapter for requests naming no adapter (None: plain model)
    vision_in_engine: bool = False  # encode images in the engine: an adapter changes the vision tower, or the slot path batches them
    image_cache: object = None  # imagecache.ImageFeatureCache, or None (off, or adapters touch the vision tower)

    @property
    def peft(self):
        from peft import PeftModel

        return self.loaded.model if isinstance(self.loaded.model, PeftModel) else None

    @property
    def model(self):
        """The transformers model (LoRA layers injected, when there are adapters)."""
        peft = self.peft
        return peft.get_base_model() if peft is not None else self.loaded.model

    @property
    def template(self):
        return self.loaded.template

    @property
    def device(self):
        return self.model.get_input_embeddings().weight.device

    def adapter_context(self, names: list[str] | None):
        """Per-row adapters for one forward (PEFT's mixed-batch LoRA); nothing for a plain model."""
        peft = self.peft
        if peft is None or names is None:
            return contextlib.nullcontext()
        # PeftModel.forward(adapter_names=...) does exactly this around its call; we enter it ourselves
        # so the transformers model can be called with `cache=` and `mm_encoder_outputs=`.
        return peft._enable_peft_forward_hooks(adapter_names=names)


def parse_adapters(spec: str | None) -> dict[str, str]:
    """`name=/path,name2=/path2` -> {name: path}; names must be unique and not the reserved ones."""
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--adapters item {item!r}: expected name=/path/to/adapter")
        if name in out or name in (BASE_ADAPTER, "default"):
            raise ValueError(f"--adapters: adapter name {name!r} is {'reserved' if name in (BASE_ADAPTER, 'default') else 'given twice'}")
        out[name] = path
    return out


def load_served_model(*, model_id_or_path=None, model_type=None, ckpt_dir=None, adapters: dict[str, str] | None = None, dtype="auto", use_flash_attn=None, max_tiles=None, served_model_name=None, device_map=None) -> ServedModel:
    from .. import modeling

    loaded = modeling.load_model(model_id_or_path, model_type=model_type, ckpt_dir=ckpt_dir, dtype=dtype, use_flash_attn=use_flash_attn, max_tiles=max_tiles, device_map=device_map)
    default = "default" if loaded.adapter_dir is not None else None  # --ckpt_dir was a LoRA checkpoint
    served: dict[str, str] = {}
    for name, path in (adapters or {}).items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise modeling.ModelLoadError(f"--adapters {name}={path}: no adapter_config.json there")
        modeling.check_safetensors(Path(path), what=f"--adapters {name}:", stem="adapter_model")
        from peft import PeftModel

        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(path, adapter_name=name)
        else:
            loaded.model = PeftModel.from_pretrained(loaded.model, path, adapter_name=name)
        served[name] = name
    if served and default is None:
        default = BASE_ADAPTER
    loaded.model.eval()
    name = served_model_name or (Path(str(ckpt_dir)).name if ckpt_dir else Path(str(loaded.model_dir)).name)
    sm = ServedModel(loaded=loaded, name=name, adapters=served, default_adapter=default)
    sm.vision_in_engine = lora_in_vision(sm.model)
    return sm


def lora_in_vision(model) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return any(isinstance(m, LoraLayer) and ("vision_tower" in n or "multi_modal_projector" in n) for n, m in model.named_modules())


# ------------------------------------------------------------------------------------------- requests


@dataclass
class Prepared:
    """A request ready for the engine: prompt ids and, for images, features or pixels."""

    input_ids: list[int]
    image_tokens: int = 0
    tiles: list[int] = field(default_factory=list)
    image_features: object = None  # (tiles, tokens per tile, hidden) on the model device, all images
    pixel_values: object = None  # tiles of the images still to encode (those not cached), when the engine encodes them
    image_keys: list = field(default_factory=list)  # per image: its content key in the feature cache (or None)
    cached: list = field(default_factory=list)  # per image: its cached features, or None (its tiles are in pixel_values)


def finish_image_features(sm: "ServedModel", prepared: Prepared, computed) -> None:
    """prepared.image_features from the cached images' features and `computed` (the vision tower's output for
    the other images' tiles, in prompt order); the newly computed ones go into the cache."""
    import torch

    parts, start = [], 0
    cached = prepared.cached or [None] * len(prepared.tiles)
    for i, (n, hit) in enumerate(zip(prepared.tiles, cached)):
        if hit is None:
            hit = computed[start : start + n]
            start += n
            key = prepared.image_keys[i] if prepared.image_keys else None
            if sm.image_cache is not None and key is not None:
                sm.image_cache.put(key, hit.clone())  # a copy: a view would keep the whole batch's output alive
        parts.append(hit)
    if computed is not None and start != computed.shape[0]:
        raise EngineError(f"vision features for {computed.shape[0]} tiles, but the uncached images have {start}")
    prepared.image_features = parts[0] if len(parts) == 1 else torch.cat(parts)
    prepared.pixel_values = None


def encode_images(sm: ServedModel, pixel_values, adapter: str | None = None):
    """Vision tower + pixel shuffle + projector: (tiles, 3, H, W) -> (tiles, tokens per tile, hidden). Pixels are
    the processor's float values, or its uint8 tiles (ImageTiler(normalize=False)), normalized here."""
    import torch

    model, config = sm.model, sm.model.config
    pixel_values = pixels_on_device(pixel_values, sm.device)
    with torch.inference_mode(), sm.adapter_context(None if adapter is None else [adapter] * pixel_values.shape[0]):
        out = model.model.get_image_features(
            pixel_values=pixel_values.to(device=sm.device, dtype=model.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        )
    # 5.24 returns an output object (features in pooler_output); earlier 5.x the features tensor itself
    return out.pooler_output if hasattr(out, "pooler_output") else out


def vision_features_off_thread(sm: ServedModel, pixel_values):
    """encode_images for a preprocessing thread: on its own CUDA stream, finished before returning."""
    import torch

    if sm.device.type != "cuda":
        return encode_images(sm, pixel_values)
    stream = torch.cuda.Stream(device=sm.device)
    with torch.cuda.stream(stream):
        feats = encode_images(sm, pixel_values)
    stream.synchronize()  # blocks this pool thread only; the engine's stream never waits on it
    return feats


_ids = itertools.count(1)


class Handle:
    """One request's channel out of the engine. `events()` (async) yields what the engine sends:
    ("token", id, logprob), ("done", finish_reason), ("error", message)."""

    def __init__(self, params: SamplingParams, adapter: str | None, prepared: Prepared, loop=None):
        self.id = next(_ids)
        self.params, self.adapter, self.prepared = params, adapter, prepared
        self.cancelled = threading.Event()
        self.loop = loop
        if loop is not None:
            import asyncio

            self.queue = asyncio.Queue()
        else:
            self.queue = queue.Queue()
        self.t_submit = time.monotonic()
        self.t_first: float | None = None

    def cancel(self) -> None:
        """Stop generating at the next step boundary (client gone, stop sequence seen, timeout)."""
        self.cancelled.set()

    async def events(self, deadline: float | None = None):
        """Yields ("token", id, logprob, finish_reason | None), then stops; or one ("done", reason) /
        ("error", message). A token and the "done" after it arrive in one delivery, so the last token
        carries its finish reason (TGI sends the last token and the final text in one event).

        `deadline` (time.monotonic()): asyncio.TimeoutError once it passes. One timer for the whole
        request, not an `asyncio.wait_for` (a new task) per token: with 64 streams that per-token cost
        was most of the event loop's time."""
        timer = None
        if deadline is not None and self.loop is not None:
            timer = self.loop.call_later(max(0.0, deadline - time.monotonic()), self.queue.put_nowait, ("timeout",))
        try:
            async for ev in self._events():
                yield ev
        finally:
            if timer is not None:
                timer.cancel()

    async def _events(self):
        import asyncio

        ahead = None
        while True:
            ev = ahead if ahead is not None else await self.queue.get()
            ahead = None
            if ev[0] == "timeout":
                raise asyncio.TimeoutError
            if ev[0] != "token":
                yield ev
                return
            if not self.queue.empty():
                ahead = self.queue.get_nowait()
            if ahead is not None and ahead[0] == "done":
                yield ("token", ev[1], ev[2], ahead[1])
                return
            yield ("token", ev[1], ev[2], None)

    def events_sync(self, timeout: float | None = None):
        while True:
            ev = self.queue.get(timeout=timeout)
            yield ev
            if ev[0] != "token":
                return


class _Row:
    """Engine-side state of a running request."""

    def __init__(self, handle: Handle):
        self.handle = handle
        self.state = RowState(handle.params, handle.prepared.input_ids)
        self.pos = 0  # next position id = real tokens so far
        self.last = 0  # the token fed to the next decode step
        self.done = False


# -------------------------------------------------------------------------------------------- engine


DECODE_MODES = ("auto", "graphs", "static", "eager")


def admit_now(waiting: int, running: int, steps_waited: int, *, ratio: float, max_steps: int) -> bool:
    """Whether to pause decoding for an admission round now (TGI's rule, with its option names).

    A round (vision tower, prefill, first tokens) costs about as much for one newcomer as for twenty, since
    its kernels are launch-bound, so with a batch running it waits until the waiting requests are at least
    `ratio` x the running ones (--waiting-served-ratio), or it has waited `max_steps` decode steps
    (--max-waiting-tokens). An empty batch admits at once."""
    if waiting == 0:
        return False
    return running == 0 or waiting >= ratio * running or steps_waited >= max_steps


PREFILL_TOKENS = 16384  # padded prompt tokens per batched prefill forward (slot path)
VISION_TILES = 64  # 448-px tiles per vision-tower forward when the engine encodes a group's images (slot path)


class Engine:
    """Continuous batching over one model. `submit` is thread-safe; events go out through handles."""

    def __init__(
        self, sm: ServedModel, *, max_batch_size: int = 32, metrics=None, max_total_tokens: int = 10240, decode: str = "auto", kv_cache_fraction: float = 0.5,
        compile: bool = False, liger: bool | None = None, fused_layers: bool = True, waiting_served_ratio: float = 0.3, max_waiting_tokens: int = 20,
        triton_decode: bool | None = None, prefill_chunk_tokens: int = 0,
    ):  # fmt: skip
        if decode not in DECODE_MODES:
            raise ValueError(f"decode {decode!r}: use one of {', '.join(DECODE_MODES)}")
        self.sm = sm
        self.max_batch_size = max_batch_size
        self.metrics = metrics
        self.max_total_tokens = max_total_tokens
        self.decode = decode
        self.kv_cache_fraction = kv_cache_fraction
        self.compile = compile
        self.liger = liger  # None: Liger's kernels on the slot path when installed (and on a GPU)
        self.fused_layers = fused_layers  # fused.py's decode layers where the architecture allows
        self.triton_decode = triton_decode  # None: our own Triton kernels (kernels.py) in them where they run
        # Slot path: a prompt longer than this is prefilled a chunk per loop turn, between decode steps, so the
        # running rows keep streaming (0: off, the default: it did not pay yet, see the serve README).
        # _chunking holds [row, prompt embeds, tokens done] in order.
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._chunking: list[list] = []
        self.prefill_chunks = 0
        self.waiting_served_ratio, self.max_waiting_tokens = waiting_served_ratio, max_waiting_tokens  # see admit_now
        self._steps_waited = 0  # decode steps since requests started waiting with a batch running
        self._ahead = None  # a greedy slot step queued before the last one was read (SlotDecoder.step_chained)
        self.chained_steps = 0
        self.decode_info: dict = {}  # what the engine chose (reported by /info and the startup log)
        self.stop_ids = list(sm.template.stop_token_ids or [])
        if not self.stop_ids and sm.model.generation_config.eos_token_id is not None:
            eos = sm.model.generation_config.eos_token_id
            self.stop_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self._waiting: list[Handle] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pending: list[tuple[Handle, tuple]] = []
        self._slots = None
        self._started = threading.Event()
        self.start_error: str | None = None
        self.steps = 0
        # transformers renamed `past_key_values` to `cache` during 5.x (the GPU image has 5.17, we 5.24)
        import inspect

        params = inspect.signature(type(sm.model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # -- public

    def start(self) -> None:
        """Start the engine thread; return once it has chosen its decode path (and captured its CUDA
        graphs), so the first request does not wait for that."""
        if self.sm.device.type == "cuda":
            import torch

            # cuDNN's attention builds an execution plan for every new shape, and prompts come in every length:
            # the first prefill at a new length took 80-94 ms with it and 18-19 ms without (1B shape, ~350
            # tokens, H100; bench/decode_profile.py). Flash / memory-efficient SDPA need no plan.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self._thread = threading.Thread(target=self._run, name="internvl-engine", daemon=True)
        self._thread.start()
        self._started.wait()
        if self.decode == "graphs" and self.start_error:
            raise EngineError(f"--decode graphs: {self.start_error}")

    def submit(self, handle: Handle) -> Handle:
        with self._cv:
            if self._stopping:
                raise EngineOverloaded("the server is shutting down")
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    def shutdown(self, timeout: float | None = None) -> None:
        """Finish what is running and waiting, then stop the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._batch) if hasattr(self, "_batch") else 0

    # -- choosing how to decode

    def _new_batch(self):
        """A fresh batch of the kind chosen at start (slots: fixed buffers, maybe graphs; else KVBatch)."""
        from .kvbatch import KVBatch

        if self._slots is not None:
            return SlotBatch(self._slots)
        return KVBatch(self.sm.device)

    def _make_slots(self):
        """The fixed-slot decoder when this model and mode allow it; None for the eager KVBatch path.

        auto: slots with CUDA graphs on a GPU for a model without adapters (PEFT's per-row adapter hooks
        are Python, not graph-safe); the eager path otherwise. graphs: as auto but an error when impossible.
        static: slots without graphs (any device; the tests' way to check the slot path). eager: KVBatch."""
        import torch

        from . import slots

        mode, sm = self.decode, self.sm
        cuda = sm.device.type == "cuda"
        rows = self.max_batch_size
        per_token = slots.kv_bytes_per_token(sm.model.config.text_config, sm.model.dtype.itemsize)
        reason = None
        if mode == "eager":
            reason = "--decode eager"
        elif sm.peft is not None:
            reason = "LoRA adapters are served (per-row adapters run eagerly)"
        elif mode in ("auto", "graphs") and not cuda:
            reason = "no CUDA device"
        elif cuda:
            free, _ = torch.cuda.mem_get_info(sm.device)
            rows = slots.plan_slots(wanted=rows, max_len=self.max_total_tokens, bytes_per_token=per_token, free_bytes=free, fraction=self.kv_cache_fraction)
            if rows < 1:
                reason = (
                    f"one slot of {self.max_total_tokens} tokens ({per_token * self.max_total_tokens / 1e9:.1f} GB) does not fit in "
                    f"{self.kv_cache_fraction:.0%} of the free {free / 1e9:.1f} GB; lower --max-total-tokens"
                )  # fmt: skip
        if reason:
            if mode == "graphs":
                raise EngineError(f"--decode graphs: {reason}")
            self.decode_info = {"decode": "eager", "why": reason}
            return None
        from . import fused

        fusable = self.fused_layers and fused.unsupported(sm.model.model.language_model) is None
        kernels = self._liger_kernels(patch_model=not fusable)
        sm.vision_in_engine = True  # _encode_images_together: one vision forward for all newcomers
        t0 = time.monotonic()
        dec = slots.SlotDecoder(
            sm.model, slots=rows, max_len=self.max_total_tokens, use_graphs=mode != "static", compile=self.compile, fused=self.fused_layers,
            stop_ids=self.stop_ids, liger=kernels == "liger", triton=cuda and self.triton_decode is not False,
        )  # fmt: skip
        if self.triton_decode and (not cuda or dec.triton_why is not None):
            log.warning("--triton-decode true but %s: decoding with SDPA attention", dec.triton_why if cuda else "no CUDA device")
        graphs = dec.capture_all() if dec.use_graphs else 0
        self.decode_info = {
            "decode": "graphs" if dec.use_graphs else "static", "kernels": kernels, "layers": "fused" if dec.fused is not None else "transformers",
            "attention": "triton split-KV" if dec.own_attention else "sdpa",
            "compiled": self.compile, "slots": rows, "max_len": self.max_total_tokens,
            "prefill_chunk_tokens": self.prefill_chunk_tokens if dec.scratch is not None else None,
            "kv_cache_gb": round(dec.bytes / 1e9, 2), "graphs": graphs, "capture_s": round(time.monotonic() - t0, 2),
        }  # fmt: skip
        if dec.fused is None:
            self.decode_info["layers_why"] = dec.fused_why
        if rows < self.max_batch_size:
            self.decode_info["why"] = f"--max-batch-size {self.max_batch_size} lowered to {rows}: the KV slots that fit in {self.kv_cache_fraction:.0%} of free GPU memory"
        return dec

    def _liger_kernels(self, patch_model: bool) -> str:
        """Liger's fused RMSNorm/SwiGLU/RoPE for the decode step, which is launch-bound: "liger" when they will
        run, else "torch". With the fused layers they are called by the step itself (fused.py) and the model
        stays unpatched, so the eager prefill keeps aten's cheaper launches; otherwise (transformers' layers)
        they are patched into the language model."""
        from .. import speedups

        if self.liger is False:
            return "torch"
        why = speedups.liger_unavailable()
        if why is None and (not patch_model or speedups.apply_liger_kernels(self.sm.model) is not None):
            return "liger"
        if self.liger:
            log.warning("--use_liger_kernel true but %s: decoding with the plain PyTorch kernels", why or "liger-kernel has no kernels for this language model")
        return "torch"

    # -- the loop

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            try:
                self._slots = self._make_slots()
            except Exception as e:
                self.start_error = f"{type(e).__name__}: {e}"
                if self.decode == "graphs":
                    log.exception("the slot decoder failed to start")  # the traceback; start() raises the message
                    self._started.set()
                    return
                log.exception("the slot decoder failed to start; decoding eagerly")
                self._slots = None
                self.decode_info = {"decode": "eager", "why": f"slot decoder failed: {self.start_error}"}
            log.info("decode: %s", self.decode_info)
            self._batch = self._new_batch()
            self._started.set()
            capacity = self._slots.slots if self._slots is not None else self.max_batch_size
            while True:
                with self._cv:
                    while not self._waiting and not len(self._batch) and not self._chunking and not self._stopping:
                        self._cv.wait()
                    if self._stopping and not self._waiting and not len(self._batch) and not self._chunking:
                        break
                    room = min(self.max_batch_size, capacity) - len(self._batch) - len(self._chunking)
                    admit = []
                    if room > 0 and admit_now(len(self._waiting), len(self._batch), self._steps_waited, ratio=self.waiting_served_ratio, max_steps=self.max_waiting_tokens):
                        admit, self._waiting = self._waiting[:room], self._waiting[room:]
                        self._steps_waited = 0
                    elif self._waiting:
                        self._steps_waited += 1
                try:
                    if admit:
                        self._drain()  # the rows change: finish the step in flight first
                        self._flush()  # the last step's tokens go out before a prefill, not after it
                        self._admit(admit)
                    if self._chunking and not (admit and len(self._batch)):
                        # one chunk of a long prompt, then a decode step for the others (not on the turn of an
                        # admission round: that already paused them)
                        self._prefill_chunk()
                    if len(self._batch):
                        self._step()  # hands the previous step's events to the loop while the GPU works
                except Exception as e:  # e.g. CUDA out of memory: fail the batch, keep serving
                    self._ahead = None
                    log.exception("decode step failed; failing %d running request(s)", len(self._batch))
                    for row in self._batch.rows:
                        self._emit(row.handle, ("error", f"generation failed: {type(e).__name__}: {e}"))
                    self._batch = self._new_batch()
                if not len(self._batch) or self._waiting:
                    self._flush()  # no step follows at once: nothing would carry these events out
                self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(len(self._batch))

    def _admit(self, handles: list[Handle]) -> None:
        t0 = time.monotonic()
        rows = []
        for h in handles:
            if h.cancelled.is_set():
                self._emit(h, ("done", "cancelled"))
            else:
                rows.append(_Row(h))
        if self.metrics is not None:
            for r in rows:
                self.metrics.queue_time.observe(t0 - r.handle.t_submit)
        if rows:
            self._prefill_rows(rows)
            if self.metrics is not None:
                self.metrics.prefill_duration.observe(time.monotonic() - t0)  # the first tokens' wait ends it
                self.metrics.prefill_requests.observe(len(rows))

    def _prefill_rows(self, rows: list[_Row]) -> None:
        if self._slots is not None:
            self._admit_together(rows)
            return
        kept, caches = [], []
        for row in rows:
            try:
                cache = self._prefill(row)
            except Exception as e:
                self._fail([row], "prefill", e)
                continue
            if not row.done:
                kept.append(row)
                caches.append(cache)
        self._batch.add(kept, caches)

    def _fail(self, rows: list[_Row], what: str, e: Exception) -> None:
        log.exception("%s failed for request(s) %s", what, [r.handle.id for r in rows])
        for r in rows:
            self._emit(r.handle, ("error", f"generation failed: {type(e).__name__}: {e}"))

    def _admit_together(self, rows: list[_Row]) -> None:
        """Slot path: the newcomers' prompts in as few forwards as fit PREFILL_TOKENS (right-padded, so the
        causal mask alone keeps padding out of every real token's attention). One prefill per request
        costs ~20 ms of Python per forward: 64 arrivals one by one would stall decoding for over a second."""
        self._encode_images_together(rows)
        embedded = []
        for row in (r for r in rows if not r.done):
            try:
                embedded.append((row, self._embeds(row)))
            except Exception as e:
                self._fail([row], "prefill", e)
        chunk = self.prefill_chunk_tokens
        if chunk and self._slots.scratch is not None:  # long prompts go in chunk by chunk (_prefill_chunk)
            self._chunking.extend([r, e, 0] for r, e in embedded if e.shape[0] > chunk)
            embedded = [(r, e) for r, e in embedded if e.shape[0] <= chunk]
        embedded.sort(key=lambda x: x[1].shape[0])
        group: list = []
        for item in embedded + [None]:
            if group and (item is None or (len(group) + 1) * item[1].shape[0] > PREFILL_TOKENS):
                try:
                    caches = self._prefill_group(group)
                except Exception as e:
                    self._fail([r for r, _ in group], "prefill", e)
                else:
                    if caches is None:
                        self._batch.add_prefilled([r for r, _ in group])
                    else:
                        live = [i for i, (r, _) in enumerate(group) if not r.done]
                        self._batch.add([group[i][0] for i in live], [caches[i] for i in live])
                group = []
            if item is not None:
                group.append(item)

    def _prefill_chunk(self) -> None:
        """The next chunk of the oldest long prompt, into the scratch slot (SlotDecoder.prefill_chunk). After
        its last chunk the prompt moves into the next free slot, its first token is chosen and the row joins
        the batch. With no batch running, the rest of the prompt goes in one forward: nobody waits on it."""
        entry = self._chunking[0]
        row, embeds, start = entry
        if row.handle.cancelled.is_set():
            self._chunking.pop(0)
            self._emit(row.handle, ("done", "cancelled"))
            return
        n = embeds.shape[0]
        end = min(start + self.prefill_chunk_tokens, n) if len(self._batch) else n
        try:
            logits = self._slots.prefill_chunk(embeds[start:end], start, last=end == n)
        except Exception as e:
            self._chunking.pop(0)
            self._fail([row], "prefill", e)
            return
        self.prefill_chunks += 1
        if end < n:
            entry[2] = end
            return
        self._chunking.pop(0)
        self._drain()  # the rows are about to change (and a drained row may leave: take the slot after)
        self._slots.take_scratch(len(self._batch), n)
        row.pos = n
        self._accept([row], logits[None])
        self._batch.add_prefilled([row])

    def _encode_images_together(self, rows: list[_Row]) -> None:
        """The vision tower once for all newcomers' tiles (VISION_TILES a forward) rather than once per request
        in the preprocessing threads: an eager ViT forward costs ~8 ms of kernel launches whatever its batch,
        and four threads launching at once fight the decode loop for the GIL."""
        import torch

        waiting = [r for r in rows if r.handle.prepared.image_features is None and r.handle.prepared.pixel_values is not None]
        start = 0
        while start < len(waiting):
            chunk, tiles = [], 0
            for r in waiting[start:]:
                n = r.handle.prepared.pixel_values.shape[0]
                if chunk and tiles + n > VISION_TILES:
                    break
                chunk.append(r)
                tiles += n
            start += len(chunk)
            try:
                feats = encode_images(self.sm, torch.cat([pixels_on_device(r.handle.prepared.pixel_values, self.sm.device) for r in chunk]))
            except Exception as e:
                self._fail(chunk, "vision encoding", e)
                for r in chunk:
                    r.done = True
                continue
            for r, f in zip(chunk, feats.split([r.handle.prepared.pixel_values.shape[0] for r in chunk])):
                finish_image_features(self.sm, r.handle.prepared, f)

    def _prefill_group(self, group: list) -> list | None:
        """Prefill rows together (batch = len(group), right-padded); returns each row's KV per layer, or None
        when the fused layers wrote it straight into the slots after the batch's rows."""
        import torch
        from transformers.cache_utils import DynamicCache

        lengths = [e.shape[0] for _, e in group]
        width = max(lengths)
        first = group[0][1]
        embeds = first.new_zeros(len(group), width, first.shape[-1])
        for i, (_, e) in enumerate(group):
            embeds[i, : e.shape[0]] = e
        rows = [r for r, _ in group]
        for r, n in zip(rows, lengths):
            r.pos = n
        if self._slots is not None and self._slots.fused is not None:
            self._accept(rows, self._slots.prefill(embeds, len(self._batch), [n - 1 for n in lengths]))
            return None
        device = self.sm.device
        cache = DynamicCache()
        lm = self.sm.model.model.language_model
        out = lm(inputs_embeds=embeds, position_ids=torch.arange(width, device=device)[None].expand(len(group), width), use_cache=True, **{self._cache_kw: cache})
        last = torch.tensor([n - 1 for n in lengths], device=device)
        hidden = out.last_hidden_state[torch.arange(len(group), device=device), last]
        self._accept(rows, self.sm.model.lm_head(hidden))
        # Each row's padded columns go into its slot too: decode overwrites column `pos` before any
        # step's mask (`column <= pos`) lets it be read.
        return [[(layer.keys[i : i + 1], layer.values[i : i + 1]) for layer in cache.layers] for i in range(len(group))]

    def _adapters(self, rows) -> list[str] | None:
        if self.sm.peft is None:
            return None
        return [r.handle.adapter or self.sm.default_adapter or BASE_ADAPTER for r in rows]

    def _embeds(self, row: _Row, adapters: list[str] | None = None):
        """(prompt tokens, hidden): token embeddings with the image features over the <IMG_CONTEXT> slots,
        as the model's own forward does (masked_scatter); done here so it works on every transformers 5.x."""
        import torch

        p = row.handle.prepared
        sm = self.sm
        if p.image_features is None and p.pixel_values is not None:
            finish_image_features(sm, p, encode_images(sm, p.pixel_values, adapters[0] if adapters else None))
        feats = p.image_features
        ids = torch.tensor(p.input_ids, device=sm.device)
        embeds = sm.model.get_input_embeddings()(ids)
        if feats is not None:
            slots = ids == sm.model.config.image_token_id
            feats = feats.reshape(-1, feats.shape[-1])
            if int(slots.sum()) != feats.shape[0]:
                raise EngineError(f"image tokens in the prompt ({int(slots.sum())}) != image features ({feats.shape[0]})")
            embeds = embeds.masked_scatter(slots[:, None].expand_as(embeds), feats.to(embeds.device, embeds.dtype))
        return embeds

    def _prefill(self, row: _Row):
        """Run the prompt alone (batch 1, unpadded) and choose the first token; returns its KV per layer."""
        import torch
        from transformers.cache_utils import DynamicCache

        sm, device = self.sm, self.sm.device
        adapters = self._adapters([row])
        n = len(row.handle.prepared.input_ids)
        cache = DynamicCache()
        with sm.adapter_context(adapters):
            embeds = self._embeds(row, adapters)[None]
            out = sm.model(
                inputs_embeds=embeds,
                attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
                position_ids=torch.arange(n, device=device)[None],
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: cache},
            )
        row.pos = n
        self._accept([row], out.logits[:, -1])
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _step(self) -> None:
        import torch

        batch, device = self._batch, self.sm.device
        greedy_slots = isinstance(batch, SlotBatch) and not any(r.state.params.needs_row_processing for r in batch.rows)
        if not greedy_slots or any(r.handle.cancelled.is_set() for r in batch.rows):
            self._drain()  # the rows are about to change, or this step is not a chained one: take in the last
        live = [i for i, r in enumerate(batch.rows) if not r.handle.cancelled.is_set()]
        for i, r in enumerate(batch.rows):
            if r.handle.cancelled.is_set():
                self._emit(r.handle, ("done", "cancelled"))
        batch.keep(live)
        if not len(batch):
            return
        rows = batch.rows
        if greedy_slots:
            self._greedy_slot_step(batch, rows)
            return
        if isinstance(batch, SlotBatch):
            early = [len(r.state.generated) < r.state.params.min_new_tokens for r in rows]
            logits = batch.decoder.step([r.last for r in rows], [r.pos for r in rows], early)
        else:
            ids = torch.tensor([[r.last] for r in rows], device=device)
            pos = torch.tensor([[r.pos] for r in rows], device=device)
            mask = batch.attention_mask(1)
            with self.sm.adapter_context(self._adapters(rows)):
                out = self.sm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **{self._cache_kw: batch.cache()})
            batch.advance(1)
            logits = out.logits[:, -1]
        # The previous step's events go to the event loop once this step is queued on the GPU: the loop
        # streams them while the GPU computes, and the next launch does not wait behind the loop for the GIL.
        self._took_step(rows, logits=logits, while_waiting=self._flush)
        batch.keep([i for i, r in enumerate(rows) if not r.done])

    def _greedy_slot_step(self, batch: "SlotBatch", rows: list[_Row]) -> None:
        """All rows greedy on the slot path: the step picks the tokens itself, and while the rows stay the same
        the next step is queued (fed on the device) before this one's tokens are read, so the GPU never waits
        for the host's bookkeeping and streaming. A step is not chained when rows will change after this one
        (a row reaching max_new_tokens, requests waiting to be admitted); a row that stops on a stop token
        has one extra step computed for it, dropped."""
        dec = batch.decoder
        if self._ahead is None:
            early = [len(r.state.generated) < r.state.params.min_new_tokens for r in rows]
            dec.step([r.last for r in rows], [r.pos for r in rows], early)
            read = dec.start_read(len(rows))
        else:
            read, self._ahead = self._ahead, None
        if self._can_chain(rows):
            dec.step_chained(len(rows), [r.pos + 1 for r in rows], [len(r.state.generated) + 1 < r.state.params.min_new_tokens for r in rows])
            self._ahead = dec.start_read(len(rows))
            self.chained_steps += 1
        self._took_step(rows, dec.finish_read(read, while_waiting=self._flush))
        if self._ahead is not None and any(r.done for r in rows):
            self._drain()
        if self._ahead is None:
            batch.keep([i for i, r in enumerate(rows) if not r.done])

    def _can_chain(self, rows: list[_Row]) -> bool:
        return (
            not self._waiting and not self._stopping
            and all(len(r.state.generated) + 1 < r.state.params.max_new_tokens for r in rows)
            and max(r.pos for r in rows) + 2 <= self._slots.max_len
        )  # fmt: skip

    def _drain(self) -> None:
        """Take in the chained step, if one is in flight (before the rows change): rows that ended at the step
        before it drop its token."""
        if self._ahead is None:
            return
        read, self._ahead = self._ahead, None
        rows = self._batch.rows
        tokens, logprobs = self._batch.decoder.finish_read(read)
        live = [i for i, r in enumerate(rows) if not r.done]
        self._took_step([rows[i] for i in live], ([tokens[i] for i in live], [logprobs[i] for i in live]))
        self._batch.keep([i for i, r in enumerate(rows) if not r.done])

    def _took_step(self, rows: list[_Row], picked=None, logits=None, while_waiting=None) -> None:
        """A decode step's bookkeeping: positions on, counters, then its tokens (`picked` by the step, or
        chosen here from `logits`)."""
        for r in rows:
            r.pos += 1
        self.steps += 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(rows))
        self._accept(rows, logits, while_waiting=while_waiting, picked=picked)

    def _accept(self, rows: list[_Row], logits, while_waiting=None, picked=None) -> None:
        tokens, logprobs = picked if picked is not None else next_tokens(logits, [r.state for r in rows], self.stop_ids, while_waiting)
        now = time.monotonic()
        for r, tok, lp in zip(rows, tokens, logprobs):
            r.state.generated.append(tok)
            r.last = tok
            h = r.handle
            if h.t_first is None:
                h.t_first = now
            self._emit(h, ("token", tok, lp))
            if tok in self.stop_ids:  # (masked out until min_new_tokens)
                r.done = True
                self._emit(h, ("done", "eos_token"))
            elif len(r.state.generated) >= r.state.params.max_new_tokens:
                r.done = True
                self._emit(h, ("done", "length"))

    # -- delivery: one call into each event loop per step, not one per token

    def _emit(self, handle: Handle, event: tuple) -> None:
        self._pending.append((handle, event))

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_loop: dict = {}
        for h, ev in pending:
            if h.loop is None:
                h.queue.put(ev)
            else:
                by_loop.setdefault(h.loop, []).append((h, ev))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: its requests are gone
                pass


class SlotBatch:
    """The running rows over a SlotDecoder: row i is slot i; the same interface as KVBatch for the loop."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.rows: list = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list, caches: list) -> None:
        for row, kv in zip(rows, caches):
            self.decoder.write_prompt(len(self.rows), kv)
            self.rows.append(row)

    def add_prefilled(self, rows: list) -> None:
        """Rows whose prompts SlotDecoder.prefill already wrote into the next slots; those that ended on their
        first token leave again."""
        self.rows.extend(rows)
        self.keep([i for i, r in enumerate(self.rows) if not r.done])

    def keep(self, indices: list[int]) -> None:
        if len(indices) == len(self.rows):
            return
        used = max((self.rows[i].pos for i in indices), default=0) + 1
        self.decoder.compact(indices, used)
        self.rows = [self.rows[i] for i in indices]


def _deliver(items) -> None:
    for h, ev in items:
        h.queue.put_nowait(ev)
