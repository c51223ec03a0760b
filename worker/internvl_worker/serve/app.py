"""The HTTP layer: routes, auth, limits, access logs, readiness. Thin on purpose.

Each generation route runs the same three stages: parse (protocol.py) -> prepare in the thread pool
(prepare.py) and generate in the engine (engine.py) -> encode (protocol.py). Everything a client can get
wrong is a `ServeError`, answered as JSON with its status; nothing a request sends can stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, EngineOverloaded, Handle, ServedModel, lora_in_vision, load_served_model
from .imagecache import ImageFeatureCache
from .metrics import Metrics
from .prepare import ImagePolicy, IncrementalDecoder, prepare
from .protocol import (
    Generated,
    GenerationRequest,
    Limits,
    ServeError,
    chat_chunk,
    chat_completion,
    new_chat_id,
    openai_error,
    parse_chat,
    parse_tgi,
    tgi_error,
    tgi_response,
    tgi_stream_event,
    tgi_token,
    usage,
)

log = logging.getLogger("internvl_worker.serve")
access_log = logging.getLogger("internvl_worker.serve.access")

VERSION = "0.1.0"
OPEN_PATHS = {"/health", "/ready", "/metrics"}  # probes and scrapers carry no token


@dataclass
class ServeConfig:
    model_id_or_path: str | None = None
    model_type: str | None = None
    ckpt_dir: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    served_model_name: str | None = None
    host: str = "0.0.0.0"
    port: int = 8080
    api_key_file: str | None = None
    max_concurrent_requests: int = 128
    max_batch_size: int = 32
    max_waiting_requests: int | None = None  # default: max_batch_size (see admission_limit)
    max_input_tokens: int = 8192
    max_total_tokens: int | None = None  # default: max_input_tokens + 2048
    max_images: int = 8
    max_image_bytes: int = 20 * 1024 * 1024
    max_body_bytes: int | None = None  # default: max_images * max_image_bytes * 4/3 (base64) + 1 MiB
    max_tiles: int | None = None
    request_timeout: float = 600.0
    image_timeout: float = 10.0
    allow_private_image_urls: bool = False
    dtype: str = "auto"
    use_flash_attn: bool | None = None
    preprocess_workers: int = 4
    graceful_timeout: float = 30.0
    warmup: bool = True
    decode: str = "auto"  # auto | graphs | static | eager (engine.py: Engine._make_slots)
    kv_cache_fraction: float = 0.5  # of the GPU memory free after loading, for the decode slots' KV cache
    compile: bool = False  # torch.compile the slot decode step before capturing its graphs
    use_liger_kernel: bool | None = None  # None: Liger's kernels on the slot path when installed
    triton_decode: bool | None = None  # None: our own Triton decode kernels (serve/kernels.py) where they run
    prefill_chunk_tokens: int = 0  # >0: longer prompts are prefilled in chunks between decode steps (off: see README)
    waiting_served_ratio: float = 0.3  # engine.admit_now: admit when waiting >= ratio x running ...
    max_waiting_tokens: int = 20  # ... or after this many decode steps
    image_cache_mb: float = 512.0  # vision features of recent images, by content (imagecache.py); 0: off

    def validate(self) -> None:
        problems = []
        for name in ("max_concurrent_requests", "max_batch_size", "max_input_tokens", "max_images", "max_image_bytes", "preprocess_workers"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            problems.append(f"--max-waiting-requests must be 0 or more, got {self.max_waiting_requests}")
        if self.max_total_tokens is not None and self.max_total_tokens <= self.max_input_tokens:
            problems.append(f"--max-total-tokens {self.max_total_tokens} must be above --max-input-tokens {self.max_input_tokens}")
        from .engine import DECODE_MODES

        if self.decode not in DECODE_MODES:
            problems.append(f"--decode {self.decode!r}: use one of {', '.join(DECODE_MODES)}")
        if self.waiting_served_ratio < 0:
            problems.append(f"--waiting-served-ratio must be 0 or more, got {self.waiting_served_ratio}")
        if self.image_cache_mb < 0:
            problems.append(f"--image-cache-mb must be 0 or more, got {self.image_cache_mb:g}")
        if self.max_waiting_tokens < 0:
            problems.append(f"--max-waiting-tokens must be 0 or more, got {self.max_waiting_tokens}")
        if self.prefill_chunk_tokens < 0:
            problems.append(f"--prefill-chunk-tokens must be 0 (off) or more, got {self.prefill_chunk_tokens}")
        if not 0.0 < self.kv_cache_fraction <= 0.95:
            problems.append(f"--kv-cache-fraction must be in (0, 0.95], got {self.kv_cache_fraction}")
        if self.request_timeout <= 0:
            problems.append(f"--request-timeout must be positive, got {self.request_timeout}")
        if not (self.model_id_or_path or self.ckpt_dir or self.model_type):
            problems.append("give --model_id_or_path, --ckpt_dir or --model_type")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def waiting_requests(self) -> int:
        """Requests that may wait beyond a full batch (--max-waiting-requests; default one batch's worth)."""
        return self.max_batch_size if self.max_waiting_requests is None else self.max_waiting_requests

    @property
    def limits(self) -> Limits:
        return Limits(max_input_tokens=self.max_input_tokens, max_total_tokens=self.max_total_tokens or self.max_input_tokens + 2048, max_images=self.max_images)

    @property
    def body_limit(self) -> int:
        return self.max_body_bytes or (self.max_images * self.max_image_bytes * 4 // 3 + (1 << 20))


def read_api_keys(path: str | None) -> list[str]:
    """One key per line (blank lines and `#` comments ignored); an empty file is an error, not "no auth"."""
    if not path:
        return []
    keys = [line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {path}: no key in it")
    return keys


class Server:
    """Server state shared by the routes: the model, the engine, the pool, limits, metrics, readiness."""

    def __init__(self, cfg: ServeConfig, *, loader=None):
        cfg.validate()
        self.cfg = cfg
        self.limits = cfg.limits
        self.policy = ImagePolicy(max_image_bytes=cfg.max_image_bytes, timeout=cfg.image_timeout, allow_private_urls=cfg.allow_private_image_urls)
        self.api_keys = [k.encode() for k in read_api_keys(cfg.api_key_file)]
        self.metrics = Metrics()
        self.loader = loader or self._load_from_config
        self.sm: ServedModel | None = None
        self.engine: Engine | None = None
        self.pool = ThreadPoolExecutor(cfg.preprocess_workers, thread_name_prefix="internvl-prepare")
        self.state = "loading"  # loading -> warming -> ready | failed
        self.failure: str | None = None
        self.in_flight = 0
        self.on_failure = None  # called (from the loader thread) when loading fails: the CLI stops uvicorn
        self.started = int(time.time())

    # ------------------------------------------------------------------------------------ start/stop

    def _load_from_config(self) -> ServedModel:
        c = self.cfg
        return load_served_model(
            model_id_or_path=c.model_id_or_path, model_type=c.model_type, ckpt_dir=c.ckpt_dir, adapters=c.adapters, dtype=c.dtype,
            use_flash_attn=c.use_flash_attn, max_tiles=c.max_tiles, served_model_name=c.served_model_name,
        )  # fmt: skip

    def start_background(self) -> threading.Thread:
        t = threading.Thread(target=self.load_and_warm, name="internvl-loader", daemon=True)
        t.start()
        return t

    def load_and_warm(self) -> None:
        """Load the model, start the engine, answer one image+text request; only then report ready."""
        try:
            t0 = time.monotonic()
            self.sm = self.loader()
            if self.cfg.image_cache_mb > 0 and not lora_in_vision(self.sm.model):
                self.sm.image_cache = ImageFeatureCache(int(self.cfg.image_cache_mb * 2**20), self.metrics)
            self.engine = Engine(
                self.sm, max_batch_size=self.cfg.max_batch_size, metrics=self.metrics, max_total_tokens=self.limits.max_total_tokens,
                decode=self.cfg.decode, kv_cache_fraction=self.cfg.kv_cache_fraction, compile=self.cfg.compile,
                liger=self.cfg.use_liger_kernel, triton_decode=self.cfg.triton_decode, prefill_chunk_tokens=self.cfg.prefill_chunk_tokens, waiting_served_ratio=self.cfg.waiting_served_ratio, max_waiting_tokens=self.cfg.max_waiting_tokens,
            )  # fmt: skip
            self.engine.start()
            log.info(json.dumps({"event": "model_loaded", "model": self.sm.name, "adapters": sorted(self.sm.adapters), "seconds": round(time.monotonic() - t0, 2)}))
            self.state = "warming"
            if self.cfg.warmup:
                self.warmup()
            self.state = "ready"
            self.metrics.ready.set(1)
            log.info(json.dumps({"event": "ready", "seconds": round(time.monotonic() - t0, 2)}))
        except Exception as e:
            self.state, self.failure = "failed", f"{type(e).__name__}: {e}"
            log.error(json.dumps({"event": "load_failed", "error": self.failure}))
            if self.on_failure is not None:
                self.on_failure()

    def warmup(self) -> str:
        """A real request through every stage: data-URL image decode, tiling, vision tower, prefill, decode."""
        import base64
        import io

        from PIL import Image

        from ..templates import Conversation
        from .sampling import SamplingParams

        size = self.sm.loaded.tiler.size
        img = Image.new("RGB", (size * 2, size), (200, 30, 30))  # two tiles + thumbnail: the multi-tile path
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        req = GenerationRequest(conversation=Conversation(turns=[("<image>\nWhat color is this?", None)], images=[url]), params=SamplingParams(max_new_tokens=2))
        prepared = prepare(self.sm, req, self.limits, ImagePolicy(max_image_bytes=max(self.cfg.max_image_bytes, len(url))))
        handle = self.engine.submit(Handle(req.params, None, prepared))
        events = list(handle.events_sync(timeout=max(self.cfg.request_timeout, 600)))
        if events[-1][0] != "done":
            raise RuntimeError(f"warm-up request failed: {events[-1]}")
        return self.sm.template.tokenizer.decode([e[1] for e in events if e[0] == "token"])

    def shutdown(self) -> None:
        """After uvicorn has drained the connections: finish the engine, stop the pool."""
        if self.engine is not None:
            self.engine.shutdown(timeout=self.cfg.graceful_timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------ the common path

    def adapter_for(self, name: str | None, *, openai: bool) -> str | None:
        sm = self.sm
        if name in (None, "", sm.name, "tgi", "default"):
            return None
        if name in sm.adapters:
            return name
        known = ", ".join([sm.name, *sm.adapters]) or sm.name
        what = "model" if openai else "adapter_id"
        raise ServeError(404 if openai else 422, f"{what} {name!r} is not served here; available: {known}", "validation")

    def check_ready(self) -> None:
        if self.state != "ready":
            msg = f"model not ready ({self.state}" + (f": {self.failure}" if self.failure else "") + ")"
            raise ServeError(503, msg, "overloaded")

    @property
    def batch_rows(self) -> int:
        """Rows the engine decodes together: --max-batch-size, or fewer when its KV slots are capped."""
        slots = (getattr(self.engine, "decode_info", None) or {}).get("slots")
        return min(self.cfg.max_batch_size, slots) if isinstance(slots, int) and slots > 0 else self.cfg.max_batch_size

    @property
    def admission_limit(self) -> int:
        """Requests in flight (preparing, waiting for a batch row, generating) beyond which new ones get 429.

        TGI's --max-concurrent-requests (default 128) bounds it, and so does a full batch plus
        --max-waiting-requests: a saturated server refuses the excess at once rather than queueing it for
        longer than about one generation (with the default, one batch's worth waits) until the client
        gives up. Rows free up as requests finish, so a queue of one batch keeps the batch full."""
        return min(self.cfg.max_concurrent_requests, self.batch_rows + self.cfg.waiting_requests)

    def check_admission(self) -> None:
        """429 with TGI's "Model is overloaded" when one more request would pass `admission_limit`."""
        c, limit = self.cfg, self.admission_limit
        if self.in_flight < limit:
            return
        if limit == c.max_concurrent_requests:
            why = f"--max-concurrent-requests {c.max_concurrent_requests}"
        else:
            why = f"{self.batch_rows} generating (--max-batch-size) + {c.waiting_requests} waiting (--max-waiting-requests)"
        raise ServeError(429, f"Model is overloaded: {self.in_flight} requests in flight, the limit is {limit}: {why}; retry later", "overloaded")

    async def begin(self, greq: GenerationRequest, adapter: str | None) -> tuple[Handle, object]:
        """Admission, preparation (thread pool) and submission; the caller must call `end()`."""
        self.check_admission()
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self.pool, prepare, self.sm, greq, self.limits, self.policy)
            handle = Handle(greq.params, adapter, prepared, loop)
            self.engine.submit(handle)
        except EngineOverloaded as e:
            self.end()
            raise ServeError(503, str(e), "overloaded") from None
        except BaseException:
            self.end()
            raise
        self.metrics.prompt_tokens.inc(len(prepared.input_ids))
        return handle, prepared

    def end(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)

    def observe(self, handle: Handle, n_tokens: int) -> None:
        m = self.metrics
        m.generated_tokens.inc(n_tokens)
        if handle.t_first is not None:
            m.ttft.observe(handle.t_first - handle.t_submit)
            if n_tokens > 1:
                m.itl.observe((time.monotonic() - handle.t_first) / (n_tokens - 1))


class Collector:
    """Engine events -> text: incremental decoding, stop sequences, the final `Generated`."""

    def __init__(self, sm: ServedModel, greq: GenerationRequest, prompt_tokens: int, *, cut_stop: bool):
        self.tok = sm.template.tokenizer
        self.special = set(self.tok.all_special_ids)
        self.greq, self.prompt_tokens, self.cut_stop = greq, prompt_tokens, cut_stop
        self.dec = IncrementalDecoder(self.tok)
        self.ids: list[int] = []
        self.texts: list[str] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.stop_at: int | None = None  # where the stop sequence starts in the text
        self.last_token: dict | None = None

    def token(self, token_id: int, logprob: float) -> dict:
        self.ids.append(token_id)
        self.logprobs.append(logprob)
        special = token_id in self.special
        delta = self.dec.step(token_id)
        text = self.tok.convert_ids_to_tokens(token_id) if special else delta
        self.texts.append(text)
        for s in self.greq.params.stop:
            at = self.dec.sent.find(s)
            if at != -1:
                self.finish_reason, self.stop_at = "stop_sequence", at
                break
        self.last_token = tgi_token(token_id, text, logprob, special)
        return self.last_token

    def result(self, reason: str) -> Generated:
        reason = self.finish_reason or reason
        text = self.dec.full_text()
        # Bytes held back at the end (an unfinished multi-byte character) go out with the last token,
        # so the token texts always add up to the generated text.
        tail = self.dec.finish(text)
        if tail and self.texts:
            self.texts[-1] += tail
            if self.last_token is not None:
                self.last_token["text"] = self.texts[-1]
        if reason == "stop_sequence" and self.cut_stop and self.stop_at is not None:
            text = text[: self.stop_at]
        p = self.greq.params
        return Generated(
            text=text, token_ids=self.ids, token_texts=self.texts, logprobs=self.logprobs, specials=[i in self.special for i in self.ids],
            finish_reason=reason, prompt_tokens=self.prompt_tokens, seed=p.seed if p.do_sample else None,
        )  # fmt: skip


def error_response(e: ServeError, *, openai: bool = False) -> JSONResponse:
    body = openai_error(e.message, e.error_type, e.status) if openai else tgi_error(e.message, e.error_type)
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(body, status_code=e.status, headers=headers)


async def read_json(request: Request, limit: int):
    """The body as JSON: 413 over the limit (checked while reading, not only from Content-Length), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"request body is {declared} bytes, over the limit of {limit} bytes", "validation")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServeError(413, f"request body is over the limit of {limit} bytes", "validation")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ServeError(400, "client disconnected while sending the body", "validation") from None
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ServeError(400, f"request body is not valid JSON: {e}", "validation") from None


def sse(obj) -> bytes:
    return b"data:" + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_TOKEN_EVENT = 'data:{"index":%d,"token":{"id":%d,"text":%s,"logprob":%s,"special":%s},"top_tokens":null,"generated_text":null,"details":null}\n\n'


def sse_token(index: int, tok: dict) -> bytes:
    """`sse(tgi_stream_event(index, tok))` for a token that is not the last, byte for byte, without building
    and serialising the nested dicts: the event loop writes one per token per stream (at 64 streams, JSON
    encoding was its second-largest cost)."""
    lp = tok["logprob"]
    if lp is not None and not math.isfinite(lp):
        return sse(tgi_stream_event(index, tok))  # NaN/Infinity: as json writes them
    lp_text = "null" if lp is None else float.__repr__(float(lp))
    return (_TOKEN_EVENT % (index, tok["id"], json.encoder.encode_basestring(tok["text"]), lp_text, "true" if tok["special"] else "false")).encode()


# -------------------------------------------------------------------------------------------- routes


def build_app(server: Server) -> Starlette:
    cfg = server.cfg

    async def events_within_timeout(handle: Handle, collector: Collector):
        """generate_events under one deadline for the whole stream: asyncio.TimeoutError when it passes."""
        async for item in generate_events(handle, collector, deadline=time.monotonic() + cfg.request_timeout):
            yield item

    async def generate_events(handle: Handle, collector: Collector, deadline: float | None = None):
        """Yields (token dict | None, finished Generated | None) until the request ends."""
        async for ev in handle.events(deadline):
            if ev[0] == "token":
                tok = collector.token(ev[1], ev[2])
                if collector.finish_reason:  # a stop sequence: tell the engine, end here
                    handle.cancel()
                    yield tok, collector.result("stop_sequence")
                    return
                yield tok, (collector.result(ev[3]) if ev[3] else None)
            elif ev[0] == "done":
                yield None, collector.result(ev[1])
                return
            else:
                raise ServeError(500, ev[1], "generation")

    async def run_to_end(handle, collector) -> Generated:
        async for _, final in generate_events(handle, collector):
            if final is not None:
                return final
        raise ServeError(500, "generation ended without a result", "generation")

    async def tgi_route(request: Request, *, as_list: bool, force_stream: bool | None):
        route = request.url.path
        try:
            server.check_ready()
            body = await read_json(request, cfg.body_limit)
            greq = parse_tgi(body, server.limits, stream=force_stream)
            adapter = server.adapter_for(greq.adapter, openai=False)
            handle, prepared = await asyncio.wait_for(server.begin(greq, adapter), cfg.request_timeout)
        except ServeError as e:
            return fail(request, e)
        except asyncio.TimeoutError:
            return fail(request, ServeError(504, f"request timed out after {cfg.request_timeout:g}s while preparing", "timeout"))
        collector = Collector(server.sm, greq, len(prepared.input_ids), cut_stop=False)
        note(request, prompt_tokens=len(prepared.input_ids), adapter=adapter)
        if not greq.stream:
            try:
                g = await asyncio.wait_for(run_to_end(handle, collector), cfg.request_timeout)
            except asyncio.TimeoutError:
                handle.cancel()
                return fail(request, ServeError(504, f"request timed out after {cfg.request_timeout:g}s", "timeout"))
            except ServeError as e:
                return fail(request, e)
            finally:
                server.end()
                server.observe(handle, len(collector.ids))
            note(request, generated_tokens=len(g.token_ids), finish_reason=g.finish_reason)
            body = tgi_response(g, greq)
            return JSONResponse([body] if as_list else body)

        async def stream():
            index = 0
            held: list[bytes] = []
            try:
                async for tok, final in events_within_timeout(handle, collector):
                    index += 1
                    if final is None:
                        # Tokens that are already queued go out in one write: when the loop falls behind
                        # (dozens of streams), fewer, larger writes let it catch up.
                        held.append(sse_token(index, tok))
                        if handle.queue.empty():
                            yield b"".join(held)
                            held.clear()
                        continue
                    if held:
                        yield b"".join(held)
                        held.clear()
                    if tok is None:  # finished without a new token (cancelled): repeat the last one
                        tok = tgi_token(collector.ids[-1], collector.texts[-1], collector.logprobs[-1], False) if collector.ids else tgi_token(0, "", None, True)
                    note(request, generated_tokens=len(final.token_ids), finish_reason=final.finish_reason)
                    yield sse(tgi_stream_event(index, tok, final=final, req=greq))
                    return
            except asyncio.TimeoutError:
                server.metrics.errors.labels("timeout").inc()
                yield b"".join(held) + sse(tgi_error(f"request timed out after {cfg.request_timeout:g}s", "timeout"))
            except ServeError as e:
                server.metrics.errors.labels(e.error_type).inc()
                yield b"".join(held) + sse(tgi_error(e.message, e.error_type))
            finally:
                handle.cancel()  # no-op when finished; stops the row when the client went away
                server.end()
                server.observe(handle, len(collector.ids))

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def root(request):
        return await tgi_route(request, as_list=True, force_stream=None)

    async def generate(request):
        return await tgi_route(request, as_list=False, force_stream=False)

    async def generate_stream(request):
        return await tgi_route(request, as_list=False, force_stream=True)

    async def chat(request: Request):
        try:
            server.check_ready()
            body = await read_json(request, cfg.body_limit)
            # The text-generation 0.7.0 client json-decodes every `data:` line, so `data: [DONE]` breaks it;
            # its requests are recognisable by the TGI-only key `repetition_penalty`, always sent (null or not).
            greq = parse_chat(body, server.limits, omit_done=isinstance(body, dict) and "repetition_penalty" in body)
            adapter = server.adapter_for(greq.adapter, openai=True)
            handle, prepared = await asyncio.wait_for(server.begin(greq, adapter), cfg.request_timeout)
        except ServeError as e:
            return fail(request, e, openai=True)
        except asyncio.TimeoutError:
            return fail(request, ServeError(504, f"request timed out after {cfg.request_timeout:g}s while preparing", "timeout"), openai=True)
        model = greq.model_name if greq.model_name and (greq.model_name == server.sm.name or adapter) else server.sm.name
        collector = Collector(server.sm, greq, len(prepared.input_ids), cut_stop=True)
        chat_id, created = new_chat_id(), int(time.time())
        note(request, prompt_tokens=len(prepared.input_ids), adapter=adapter)
        if not greq.stream:
            try:
                g = await asyncio.wait_for(run_to_end(handle, collector), cfg.request_timeout)
            except asyncio.TimeoutError:
                handle.cancel()
                return fail(request, ServeError(504, f"request timed out after {cfg.request_timeout:g}s", "timeout"), openai=True)
            except ServeError as e:
                return fail(request, e, openai=True)
            finally:
                server.end()
                server.observe(handle, len(collector.ids))
            note(request, generated_tokens=len(g.token_ids), finish_reason=g.finish_reason)
            return JSONResponse(chat_completion(g, model=model, chat_id=chat_id, created=created))

        longest_stop = max((len(s) for s in greq.params.stop), default=0)

        async def stream():
            chunk = dict(chat_id=chat_id, model=model, created=created)
            emitted = 0  # characters of the text sent so far
            try:
                async for tok, final in events_within_timeout(handle, collector):
                    if final is None:
                        # Hold back what could still become a stop sequence (it must not reach the client).
                        safe = len(collector.dec.sent) - max(0, longest_stop - 1)
                        if safe > emitted:
                            yield sse(chat_chunk(**chunk, content=collector.dec.sent[emitted:safe]))
                            emitted = safe
                        continue
                    rest = final.text[emitted:] if final.text.startswith(collector.dec.sent[:emitted]) else ""
                    yield sse(chat_chunk(**chunk, content=rest, finish_reason=final.finish_reason))
                    if greq.include_usage:
                        yield sse(chat_chunk(**chunk, content=None, usage_=usage(final), empty_choices=True))
                    if not greq.omit_done:
                        yield b"data: [DONE]\n\n"
                    note(request, generated_tokens=len(final.token_ids), finish_reason=final.finish_reason)
                    return
            except asyncio.TimeoutError:
                server.metrics.errors.labels("timeout").inc()
                yield sse(openai_error(f"request timed out after {cfg.request_timeout:g}s", "timeout", 504))
            except ServeError as e:
                server.metrics.errors.labels(e.error_type).inc()
                yield sse(openai_error(e.message, e.error_type, e.status))
            finally:
                handle.cancel()
                server.end()
                server.observe(handle, len(collector.ids))

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def models(request):
        if server.sm is None:
            return fail(request, ServeError(503, f"model not ready ({server.state})", "overloaded"), openai=True)
        sm = server.sm
        data = [{"id": sm.name, "object": "model", "created": server.started, "owned_by": "internvl", "root": str(sm.loaded.model_dir), "parent": None}]
        data += [{"id": a, "object": "model", "created": server.started, "owned_by": "internvl", "root": str(cfg.adapters.get(a, a)), "parent": sm.name} for a in sm.adapters]
        return JSONResponse({"object": "list", "data": data})

    async def info(request):
        sm = server.sm
        return JSONResponse(
            {
                "model_id": sm.name if sm else (cfg.model_id_or_path or cfg.ckpt_dir),
                "model_sha": None,
                "model_dtype": str(sm.model.dtype).replace("torch.", "") if sm else cfg.dtype,
                "model_device_type": sm.device.type if sm else None,
                "model_pipeline_tag": "image-text-to-text",
                "adapters": sorted(sm.adapters) if sm else [],
                "max_concurrent_requests": cfg.max_concurrent_requests,
                "max_waiting_requests": cfg.waiting_requests,
                "admission_limit": server.admission_limit,
                "max_best_of": 1,
                "max_stop_sequences": 4,
                "max_input_tokens": server.limits.max_input_tokens,
                "max_input_length": server.limits.max_input_tokens,
                "max_total_tokens": server.limits.max_total_tokens,
                "max_batch_size": cfg.max_batch_size,
                "waiting_served_ratio": cfg.waiting_served_ratio,
                "max_waiting_tokens": cfg.max_waiting_tokens,
                "max_images": cfg.max_images,
                "image_cache_mb": cfg.image_cache_mb if server.sm is not None and server.sm.image_cache is not None else 0,
                "max_image_bytes": cfg.max_image_bytes,
                "validation_workers": cfg.preprocess_workers,
                "max_client_batch_size": 1,
                "router": "internvl-serve",
                "version": VERSION,
                "sha": None,
                "docker_label": None,
                "state": server.state,
                "decode": server.engine.decode_info if server.engine else None,
            }
        )

    async def health(request):
        # Liveness: the process answers. A failed load exits the process instead (see the CLI).
        return Response(status_code=200)

    async def ready(request):
        if server.state == "ready":
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": server.state, "error": server.failure}, status_code=503)

    async def metrics(request):
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    def fail(request: Request, e: ServeError, *, openai: bool = False) -> JSONResponse:
        server.metrics.errors.labels(e.error_type).inc()
        note(request, error=e.message)
        return error_response(e, openai=openai)

    routes = [
        Route("/", root, methods=["POST"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/generate_stream", generate_stream, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(AccessMiddleware, server=server)
    return app


def note(request: Request, **fields) -> None:
    """Fields for this request's access-log line."""
    request.scope.setdefault("internvl_log", {}).update(fields)


class AccessMiddleware:
    """Bearer auth, then one JSON access-log line per request (written when the response has finished)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        status = {"code": 500}
        path = scope.get("path", "")

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.server.api_keys and path not in OPEN_PATHS and not self._authorized(scope):
                openai = path.startswith("/v1/")
                e = ServeError(401, "missing or wrong bearer token (Authorization: Bearer <key from --api-key-file>)", "authentication")
                await error_response(e, openai=openai)(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            route = path if path in ROUTES else "other"
            self.server.metrics.requests.labels(route, str(status["code"])).inc()
            self.server.metrics.request_duration.labels(route).observe(time.monotonic() - t0)
            if path not in ("/health", "/ready", "/metrics") or status["code"] >= 400:
                client = scope.get("client") or ("", 0)
                line = {"ts": round(time.time(), 3), "method": scope.get("method"), "path": path, "status": status["code"], "duration_ms": round((time.monotonic() - t0) * 1000, 1), "client": client[0]}
                line.update(scope.get("internvl_log", {}))
                access_log.info(json.dumps(line, ensure_ascii=False))

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = token.strip()
                    return any(hmac.compare_digest(token, k) for k in self.server.api_keys)
        return False


ROUTES = {"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/models", "/info", "/health", "/ready", "/metrics"}


def setup_logging() -> None:
    """JSON lines on stderr for the server and its access log (what a log pipeline in a cluster wants)."""

    class JsonFormatter(logging.Formatter):
        def format(self, record):
            msg = record.getMessage()
            if msg.startswith("{"):
                return msg
            return json.dumps({"ts": round(record.created, 3), "level": record.levelname, "logger": record.name, "message": msg}, ensure_ascii=False)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("internvl_worker.serve", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(logging.INFO)
        lg.propagate = False


def run(cfg: ServeConfig) -> int:
    """Serve until SIGTERM/SIGINT; in-flight requests finish first (up to --graceful-timeout)."""
    import contextlib

    import uvicorn

    setup_logging()
    # The engine thread and the event loop share the GIL; Python's default 5 ms switch interval would let
    # one make the other wait up to 5 ms per hand-over (a decode step takes ~2 ms).
    sys.setswitchinterval(0.0005)
    server = Server(cfg)
    app = build_app(server)
    exit_code = {"code": 0}

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        server.start_background()  # listen at once: /health answers and /ready says 503 while loading
        yield
        server.shutdown()

    app.router.lifespan_context = lifespan
    ucfg = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False, timeout_graceful_shutdown=cfg.graceful_timeout, lifespan="on")
    userver = uvicorn.Server(ucfg)

    def on_failure():
        exit_code["code"] = 1
        userver.should_exit = True

    server.on_failure = on_failure
    userver.run()
    return exit_code["code"]
