"""`internvl`: the worker's command line, in the spirit of ms-swift's `swift infer / sft / export`.

    internvl infer --model_type internvl3-1b --model_id_or_path /models/InternVL3-1B-hf   # interactive chat
    internvl infer --ckpt_dir output/.../checkpoint-100 --query "Describe it" --images cat.png
    internvl data check data.jsonl --model_type internvl3-1b --model_id_or_path /models/... --max_length 4096
    internvl tiny --output_dir /tmp/tiny                                                    # a random test model
    internvl models                                                                         # the known model types
    internvl demo                                                                           # the README's first run

Flags use ms-swift's spelling (`--model_type`, `--max_length`, `--use_flash_attn false`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .data import RowError
from .images import ImageError
from .modeling import ModelLoadError
from .registry import MODELS, UnknownModelType
from .templates import TemplateError

# Errors that mean "bad input": one line naming the input, exit code 2, no traceback.
USER_ERRORS = (ModelLoadError, UnknownModelType, ImageError, TemplateError, RowError, FileNotFoundError)


def _user_errors():
    from .checkpoints import CheckpointSaveError
    from .train import SftConfigError

    return USER_ERRORS + (SftConfigError, CheckpointSaveError)


def str2bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_model_args(p: argparse.ArgumentParser, *, ckpt: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model_type", help="a registered model type (`internvl models`); read from the checkpoint when omitted")
    g.add_argument("--model_id_or_path", help="local model directory (transformers-native InternVL) or a hub id")
    if ckpt:
        g.add_argument("--ckpt_dir", help="a LoRA checkpoint (base model read from its sft_args.json) or a merged/full model directory")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="weights dtype (default: bf16 on GPUs that have it, else fp16; fp32 on CPU)")
    g.add_argument("--use_flash_attn", type=str2bool, default=None, metavar="BOOL", help="flash-attn 2 when installed; SDPA otherwise (default)")
    g.add_argument("--max_length", type=positive_int, default=None, help="refuse prompts longer than this many tokens (images count 256 per tile)")
    g.add_argument("--max_num", type=positive_int, default=None, help="max 448-px tiles per image (default: the model's, usually 12; env MAX_NUM)")


def _load(args, **kw):
    from .modeling import load_model

    return load_model(
        args.model_id_or_path,
        model_type=args.model_type,
        ckpt_dir=getattr(args, "ckpt_dir", None),
        dtype=args.dtype,
        use_flash_attn=args.use_flash_attn,
        max_length=args.max_length,
        max_tiles=args.max_num,
        **kw,
    )


# ----------------------------------------------------------------------------------------------- infer


def _generation(args) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
    }


def _answer(loaded, query, history, images, args, out) -> list:
    """Stream one reply to `out`; returns the new history."""
    from .infer import inference_stream

    printed = 0
    history_out = history
    image_kwargs = {"timeout": args.image_timeout}
    for response, history_out in inference_stream(
        loaded.model, loaded.template, query, history, images=images, system=args.system, image_kwargs=image_kwargs, **_generation(args)
    ):
        out.write(response[printed:])
        out.flush()
        printed = len(response)
    out.write("\n")
    return history_out


def chat_loop(loaded, args, stdin=None, out=None) -> None:
    """The seed's interactive chat: `<<<` query, then `Input a media path or URL <<<`; `clear`, `exit`."""
    out = out or sys.stdout
    history: list = []
    images: list = []
    out.write("Chat with the model. `clear` forgets the conversation, `exit` quits. Several images: a, b\n")
    while True:
        try:
            query = input("<<< ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        q = query.strip()
        if q == "exit":
            return
        if q == "clear":
            history, images = [], []
            continue
        if not q:
            continue
        try:
            media = input("Input a media path or URL <<< ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        new_images = split_list(media) if media else []
        try:
            history = _answer(loaded, query, history, images + new_images, args, out)
            images = images + new_images
        except USER_ERRORS as e:
            out.write(f"error: {e}\n")
        out.write("-" * 50 + "\n")


def evaluate_val_split(loaded, args, out=None) -> int:
    """`--load_dataset_config true`: answer every row of the run's saved validation split."""
    from .data import read_dataset
    from .modeling import resolve_checkpoint

    out = out or sys.stdout
    _, _, sft_args = resolve_checkpoint(args.ckpt_dir)
    run_dir = Path(sft_args.get("run_dir") or Path(args.ckpt_dir).parent)
    val_path = run_dir / "val_dataset.jsonl"
    if not val_path.is_file() or not val_path.read_text().strip():
        raise ModelLoadError(f"{val_path} is missing or empty: the run held out no validation rows (--dataset_test_ratio / --val_dataset)")
    from .infer import inference

    rows = read_dataset(val_path)
    exact = 0
    for row in rows:
        *history, (query, label) = row.conversation.turns
        response, _ = inference(loaded.model, loaded.template, query, [list(t) for t in history], images=row.conversation.images, system=row.conversation.system, **_generation(args))
        exact += response.strip() == (label or "").strip()
        out.write(f"[QUERY] {query}\n[RESPONSE] {response}\n[LABELS] {label}\n" + "-" * 50 + "\n")
    out.write(f"{len(rows)} validation rows: {exact} exact matches ({exact / len(rows):.1%})\n")
    return 0


def cmd_infer(args) -> int:
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    if args.load_dataset_config and not args.ckpt_dir:
        raise ModelLoadError("--load_dataset_config true needs --ckpt_dir (a checkpoint of an `internvl sft` run)")
    loaded = _load(args)
    if args.load_dataset_config:
        return evaluate_val_split(loaded, args)
    if args.query is not None:
        _answer(loaded, args.query, [], split_list(args.images) if args.images else [], args, sys.stdout)
        return 0
    chat_loop(loaded, args)
    return 0


# ------------------------------------------------------------------------------------------------ data


def cmd_data_check(args) -> int:
    from .data import check_dataset

    template = None
    if args.model_id_or_path or args.model_type:
        from transformers import AutoConfig, AutoTokenizer

        from .modeling import build_template, resolve_model_source

        spec, model_dir = resolve_model_source(args.model_id_or_path, args.model_type)
        template, _ = build_template(AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir), spec, max_length=args.max_length, max_tiles=args.max_num)
    report = check_dataset(args.files, template=template, image_kwargs={"timeout": args.image_timeout}, progress=sys.stderr.isatty())
    for problem in report.problems:
        print(problem)
    summary = f"{report.rows} rows: {report.good} good, {len(report.problems)} bad"
    if template is not None:
        summary += f"; longest {report.max_tokens} tokens" + (f" (max_length {args.max_length})" if args.max_length else "")
    else:
        summary += " (token lengths not checked: give --model_type/--model_id_or_path)"
    print(summary)
    if args.report:
        from .fsutil import write_json_atomic

        write_json_atomic(args.report, report.to_json())
    return 1 if report.problems else 0


# ----------------------------------------------------------------------------------------------- serve


def cmd_serve(args) -> int:
    from .serve.app import ServeConfig, run
    from .serve.engine import parse_adapters

    try:
        cfg = ServeConfig(
            model_id_or_path=args.model_id_or_path, model_type=args.model_type, ckpt_dir=args.ckpt_dir, adapters=parse_adapters(args.adapters),
            served_model_name=args.served_model_name, host=args.host, port=args.port, api_key_file=args.api_key_file,
            max_concurrent_requests=args.max_concurrent_requests, max_batch_size=args.max_batch_size, max_waiting_requests=args.max_waiting_requests, max_input_tokens=args.max_input_tokens,
            max_total_tokens=args.max_total_tokens, max_images=args.max_images, max_image_bytes=args.max_image_bytes, max_body_bytes=args.max_body_bytes,
            max_tiles=args.max_tiles, request_timeout=args.request_timeout, image_timeout=args.image_timeout,
            allow_private_image_urls=args.allow_private_image_urls, dtype=args.dtype, use_flash_attn=args.use_flash_attn,
            preprocess_workers=args.preprocess_workers, graceful_timeout=args.graceful_timeout, decode=args.decode,
            kv_cache_fraction=args.kv_cache_fraction, compile=args.compile, use_liger_kernel=args.use_liger_kernel, triton_decode=args.triton_decode, prefill_chunk_tokens=args.prefill_chunk_tokens,
            waiting_served_ratio=args.waiting_served_ratio, max_waiting_tokens=args.max_waiting_tokens, image_cache_mb=args.image_cache_mb,
        )  # fmt: skip
        cfg.validate()
    except (ValueError, OSError) as e:
        print(f"internvl serve: error: {e}", file=sys.stderr)
        return 2
    return run(cfg)


# ------------------------------------------------------------------------------------------ tiny, models


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint
    from .registry import get_model_spec

    if args.model_type:
        get_model_spec(args.model_type)
    path = convert_checkpoint(args.model_id_or_path, args.output_dir, model_type=args.model_type, dtype=args.dtype)
    print(f"native InternVL checkpoint written to {path}")
    return 0


def cmd_tiny(args) -> int:
    from .tiny import build_tiny_model

    from .registry import read_meta

    path = build_tiny_model(args.output_dir, seed=args.seed or 0, shape=args.shape)
    print(f"random InternVL ({args.shape}) written to {path} (model_type {read_meta(path)['model_type']})")
    return 0


def cmd_models(args) -> int:
    if args.json:
        from dataclasses import asdict

        print(json.dumps([asdict(s) for s in MODELS.values()], indent=2, ensure_ascii=False))
        return 0
    for spec in MODELS.values():
        flags = " native" if spec.native else ""
        flags += f" {spec.quantization}" if spec.quantization else ""
        print(f"{spec.model_type:28s} {spec.template:12s} tiles<={spec.max_tiles:<3d} {spec.hub_id or '(built locally by `internvl tiny`)'}{flags}")
    return 0


def cmd_demo(args) -> int:
    """The README's first run: build the tiny model and an image, then answer one question about it."""
    from PIL import Image, ImageDraw

    from .tiny import build_tiny_model

    home = Path(args.workdir or os.environ.get("INTERNVL_HOME", Path.home() / ".cache" / "internvl")).expanduser()
    model_dir = home / "tiny-model"
    if not (model_dir / "config.json").is_file():
        print(f"building a tiny random InternVL in {model_dir} ...")
        build_tiny_model(model_dir)
    image_path = home / "demo.png"
    img = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(img).rectangle((10, 10, 60, 50), fill="red")
    img.save(image_path)
    ns = build_parser().parse_args(["infer", "--model_id_or_path", str(model_dir), "--query", "What color is the square?", "--images", str(image_path), "--max_new_tokens", "24"])
    print(f"<<< What color is the square?\nInput a media path or URL <<< {image_path}")
    cmd_infer(ns)
    print("(a random tiny model answers noise; `internvl infer --model_type internvl3-1b --model_id_or_path DIR` chats with a real one)")
    return 0


# ----------------------------------------------------------------------------------------- sft, export


def launch_torchrun_if_asked(argv: list[str]) -> None:
    """NPROC_PER_NODE=N internvl sft ... re-runs itself under torchrun with N processes (as ms-swift)."""
    nproc = int(os.environ.get("NPROC_PER_NODE", "1") or 1)
    if nproc <= 1 or "LOCAL_RANK" in os.environ:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    for env, flag in (("NNODES", "--nnodes"), ("NODE_RANK", "--node_rank"), ("MASTER_ADDR", "--master_addr"), ("MASTER_PORT", "--master_port")):
        if os.environ.get(env):
            cmd.append(f"{flag}={os.environ[env]}")
    cmd += ["-m", "internvl_worker.cli", *argv]
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(sys.executable, cmd)


def cmd_sft(args) -> int:
    from .sft_args import from_namespace
    from .train import run_sft

    run_sft(from_namespace(args))
    return 0


def cmd_export(args) -> int:
    if not args.merge_lora:
        raise ModelLoadError("nothing to do: pass --merge_lora true")
    from .export import merge_lora

    path = merge_lora(args.ckpt_dir, output_dir=args.output_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model written to {path}", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internvl", description="Fine-tune, merge, chat with and serve InternVL vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("infer", help="chat with a model (interactive, or one-shot with --query)", description="Interactive chat as `swift infer`: type a query at `<<<`, then an image path/URL (or nothing) at `Input a media path or URL <<<`. `clear` forgets the conversation, `exit` quits.")
    add_model_args(p)
    g = p.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=positive_int, default=512)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top_p", type=float, default=None)
    g.add_argument("--top_k", type=int, default=None)
    g.add_argument("--repetition_penalty", type=float, default=None)
    g.add_argument("--system", default=None, help="system prompt (default: the model's)")
    g.add_argument("--seed", type=int, default=None)
    g = p.add_argument_group("one-shot mode")
    g.add_argument("--query", help="answer this query and exit (no interactive chat)")
    g.add_argument("--images", help="comma-separated image paths or URLs for --query")
    p.add_argument("--image_timeout", type=float, default=10.0, help="seconds to wait for an image URL")
    p.add_argument("--load_dataset_config", type=str2bool, default=False, metavar="BOOL", help="with --ckpt_dir: answer the run's held-out validation rows and report exact matches")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("sft", help="fine-tune (LoRA or full; one GPU, NPROC_PER_NODE=N for DDP, --deepspeed for ZeRO)", description="Supervised fine-tuning as `swift sft`. Several GPUs: NPROC_PER_NODE=2 internvl sft ... (DDP; add --deepspeed default-zero2), or torchrun ... -m internvl_worker.cli sft. Checkpoints go to <output_dir>/<model_type>/v<N>-<time>/checkpoint-<step>; one JSON progress line per logging step goes to stdout and logging.jsonl.")
    from .sft_args import add_sft_arguments

    add_sft_arguments(p, str2bool)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("export", help="merge a LoRA checkpoint into its base model", description="Merge LoRA weights as `swift export --merge_lora true`: writes <ckpt>-merged (or <output_dir>/merged) atomically.")
    p.add_argument("--ckpt_dir", required=True, help="a LoRA checkpoint directory, or `latest` (the newest under --output_dir)")
    p.add_argument("--merge_lora", type=str2bool, default=False, metavar="BOOL", help="must be true")
    p.add_argument("--output_dir", default=None, help="write <output_dir>/merged instead of <ckpt>-merged; with --ckpt_dir latest, the run to search")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="dtype of the merged weights (default bf16)")
    p.add_argument("--overwrite", type=str2bool, default=False, metavar="BOOL", help="merge again even if a complete merge exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    c = dsub.add_parser("check", help="report every bad row with its line number; exit 1 if any", description="Check dataset files (.jsonl or .json) row by row: JSON, fields, images exist and decode, <image> tags match images, and (with a model) the token length after tiling. Every bad row is reported as FILE:LINE: reason.")
    c.add_argument("files", nargs="+", help="dataset files")
    add_model_args(c, ckpt=False)
    c.add_argument("--report", help="also write the findings as JSON to this path")
    c.add_argument("--image_timeout", type=float, default=10.0, help="seconds to wait for an image URL")
    c.set_defaults(func=cmd_data_check)

    p = sub.add_parser("serve", help="serve a model over HTTP: the TGI and OpenAI chat-completions protocols", description="HTTP server for InternVL: TGI routes (/, /generate, /generate_stream, /info), OpenAI /v1/chat/completions with image_url parts, /v1/models, /health (liveness), /ready (readiness after a warm-up image+text request), /metrics. Concurrent requests share the model through continuous batching. See worker/internvl_worker/serve/README.md.")
    g = p.add_argument_group("model")
    g.add_argument("--model_id_or_path", help="local model directory (transformers-native InternVL), merged model, or hub id")
    g.add_argument("--model_type", help="a registered model type (`internvl models`); read from the checkpoint when omitted")
    g.add_argument("--ckpt_dir", help="a LoRA checkpoint (served as the default model on top of its base) or a merged/full model directory")
    g.add_argument("--adapters", default=None, help="more LoRA adapters, selectable per request: name=/path[,name2=/path2] (OpenAI `model`, TGI `parameters.adapter_id`)")
    g.add_argument("--served-model-name", dest="served_model_name", default=None, help="the name clients use for the base model (default: the model directory's name)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="weights dtype (default: bf16 on GPUs that have it, else fp16; fp32 on CPU)")
    g.add_argument("--use_flash_attn", type=str2bool, default=None, metavar="BOOL", help="flash-attn 2 when installed; SDPA otherwise (default)")
    g.add_argument("--max-tiles", "--max_num", dest="max_tiles", type=positive_int, default=None, help="max 448-px tiles per image (default: the model's, usually 12)")
    g.add_argument(
        "--decode", default="auto", choices=["auto", "graphs", "static", "eager"],
        help="how decode steps run. auto (default): on a GPU without LoRA adapters, a fixed KV slot per request and each step replayed "
        "as a CUDA graph (captured at start-up); otherwise eager. graphs: the same, but fail instead of falling back. static: fixed "
        "slots without graphs. eager: a growing batch cache, one Python call per layer per step (what adapters use)",
    )  # fmt: skip
    g.add_argument("--use_liger_kernel", type=str2bool, default=None, metavar="BOOL", help="Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) in the language model on the CUDA-graph path: fewer kernels a decode step (default: on when liger-kernel is installed)")
    g.add_argument(
        "--triton-decode", dest="triton_decode", type=str2bool, default=None, metavar="BOOL",
        help="our own Triton kernels in the fused decode step on a GPU: split-KV attention (each row reads only its own columns, "
        "spread over many SMs), RoPE with the KV write, SiLU x up (default: on where they run; false: SDPA attention)",
    )  # fmt: skip
    g.add_argument(
        "--prefill-chunk-tokens", dest="prefill_chunk_tokens", type=int, default=0, metavar="N",
        help="on the CUDA-graph path, a prompt longer than N tokens (e.g. many tiles) is prefilled N tokens at a time, with a decode "
        "step for the running requests between chunks (default 0: off; measured on an H100 with a 13-tile prompt arriving beside 16 "
        "streams, 1024-token chunks made the streams' worst pause longer, 71 ms against 58 ms)",
    )  # fmt: skip
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (fuses its small kernels) before capturing the CUDA graphs; start-up takes about a minute longer")
    g.add_argument("--image-cache-mb", dest="image_cache_mb", type=float, default=512, help="GPU memory (MiB) for the vision features of recent images, by content: an image sent again (chat clients resend the conversation each turn) skips decoding, tiling and the vision tower; 0: off. Off anyway when adapters touch the vision tower")
    g.add_argument("--kv-cache-fraction", dest="kv_cache_fraction", type=float, default=0.5, help="share of the GPU memory free after loading that the decode slots may take (each slot holds --max-total-tokens tokens); fewer slots than --max-batch-size fit -> the batch is capped, and /info says so")
    g = p.add_argument_group("network")
    g.add_argument("--host", default="0.0.0.0")
    g.add_argument("--port", type=int, default=8080)
    g.add_argument("--api-key-file", dest="api_key_file", default=None, help="require `Authorization: Bearer <key>` with a key from this file (one per line); /health, /ready, /metrics stay open")
    g = p.add_argument_group("limits")
    g.add_argument("--max-concurrent-requests", dest="max_concurrent_requests", type=positive_int, default=128, help="requests in flight (preparing, waiting, generating) before new ones get 429")
    g.add_argument("--max-batch-size", dest="max_batch_size", type=positive_int, default=32, help="requests decoded together in one step; the rest wait their turn")
    g.add_argument("--max-waiting-requests", dest="max_waiting_requests", type=int, default=None, help="requests that may wait for a batch row (or be preparing) while the batch is full; beyond, new ones get 429 at once instead of queueing (default: --max-batch-size, so an admitted request waits at most about one generation)")
    g.add_argument(
        "--waiting-served-ratio", dest="waiting_served_ratio", type=float, default=0.3,
        help="with a batch running, admit newcomers (a pause of decoding: vision tower + prefill) only once the waiting requests are at least "
        "this share of the running ones, or after --max-waiting-tokens steps; an admission round costs about the same for 1 or 20 newcomers (TGI's option)",
    )  # fmt: skip
    g.add_argument("--max-waiting-tokens", dest="max_waiting_tokens", type=int, default=20, help="decode steps a waiting request may wait for --waiting-served-ratio before it is admitted anyway (TGI's option; 0: admit at every step)")
    g.add_argument("--max-input-tokens", dest="max_input_tokens", type=positive_int, default=8192, help="prompt tokens, images included (256 per 448-px tile); longer prompts get 422")
    g.add_argument("--max-total-tokens", dest="max_total_tokens", type=positive_int, default=None, help="prompt + generated tokens (default: max input tokens + 2048)")
    g.add_argument("--max-images", dest="max_images", type=positive_int, default=8, help="images per request")
    g.add_argument("--max-image-bytes", dest="max_image_bytes", type=positive_int, default=20 * 1024 * 1024, help="bytes per image (data URL or fetched); larger gets 413")
    g.add_argument("--max-body-bytes", dest="max_body_bytes", type=positive_int, default=None, help="request body size (default: room for --max-images base64 images); larger gets 413")
    g.add_argument("--request-timeout", dest="request_timeout", type=float, default=600.0, help="seconds a request may take in all before it is cut off with 504")
    g.add_argument("--image-timeout", dest="image_timeout", type=float, default=10.0, help="seconds to fetch one image URL")
    g.add_argument("--allow-private-image-urls", dest="allow_private_image_urls", action="store_true", help="fetch image URLs that resolve to private, loopback or link-local addresses (refused by default: the server must not be a proxy into its cluster)")
    g.add_argument("--preprocess-workers", dest="preprocess_workers", type=positive_int, default=4, help="threads that fetch, decode and tile images and run the vision tower")
    g.add_argument("--graceful-timeout", dest="graceful_timeout", type=float, default=30.0, help="seconds in-flight requests get to finish after SIGTERM")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="convert an original-format (trust_remote_code) InternVL checkpoint to the native format", description="Reads the original config and safetensors as data (no remote code runs) and writes a transformers-native InternVL checkpoint that every other command loads.")
    p.add_argument("--model_id_or_path", required=True, help="the original checkpoint directory (config.json with model_type internvl_chat)")
    p.add_argument("--output_dir", required=True, help="where the native checkpoint goes (written atomically)")
    p.add_argument("--model_type", default=None, help="record this model type in the output (`internvl models`)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("tiny", help="write a tiny random InternVL checkpoint (for tests and trials)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", default="tiny", choices=["tiny", "internvl3-1b"], help="tiny (1 MB, CPU tests) or the real InternVL3-1B layout with random weights (benchmarks)")
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("models", help="list the registered model types")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="build the tiny model and answer a question about an image (no GPU, no cluster)")
    p.add_argument("--workdir", help="where to keep the tiny model (default: $INTERNVL_HOME or ~/.cache/internvl)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("INTERNVL_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sft"]:
        launch_torchrun_if_asked(argv)
    args = build_parser().parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"internvl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
