"""Run directories and checkpoints: naming, finding the newest complete one, recording it.

A checkpoint is staged under `.staging/checkpoint-N` and renamed to `checkpoint-N` only when every
rank has finished writing, so a directory named `checkpoint-N` is always complete: a run killed
mid-save leaves only staging files, which resume never picks and the next save clears.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from pathlib import Path

from .fsutil import write_text_atomic

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RUN_RE = re.compile(r"^v(\d+)-\d{8}-\d{6}$")
LATEST_FILE = "latest_checkpoint"
STAGING = ".staging"
log = logging.getLogger(__name__)


WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")
WEIGHT_INDEX = "model.safetensors.index.json"
TRAINER_STATE = "trainer_state.json"


def incomplete_reason(path: str | Path) -> str | None:
    """Why a `checkpoint-N` directory cannot be resumed from or merged (None = complete).

    The staging rename makes a named checkpoint complete when we wrote it; this guards against what we
    did not write: a copy or restore cut short, a volume that lost files, a weight file truncated to 0.
    """
    p = Path(path)
    if not (p / TRAINER_STATE).is_file():
        return f"no {TRAINER_STATE}"
    weights = [p / n for n in WEIGHT_FILES if (p / n).is_file()]
    if (p / WEIGHT_INDEX).is_file():
        import json

        try:
            shards = set(json.loads((p / WEIGHT_INDEX).read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            return f"{WEIGHT_INDEX} is not readable"
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            return f"weight shard(s) missing: {', '.join(missing[:3])}"
        weights += [p / s for s in shards]
    if not weights:
        return f"no weights ({' / '.join(WEIGHT_FILES)} / {WEIGHT_INDEX})"
    empty = [w.name for w in weights if w.stat().st_size < 8]  # a safetensors file starts with an 8-byte header size
    if empty:
        return f"empty weight file(s): {', '.join(empty)}"
    return None


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by step); incomplete ones are skipped with a warning."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    complete = []
    for _, p in sorted(found):
        reason = incomplete_reason(p)
        if reason is None:
            complete.append(p)
        else:
            log.warning("skipping incomplete checkpoint %s: %s", p, reason)
    return complete


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, quota, I/O error); earlier checkpoints are untouched."""


def save_failed(run_dir: str | Path, step: int, exc: OSError) -> CheckpointSaveError:
    """Clear the half-written staging copy (it holds the space that ran out) and say what is still safe."""
    import errno
    import shutil

    run = Path(run_dir)
    shutil.rmtree(run / STAGING / f"checkpoint-{step}", ignore_errors=True)
    kept = latest_checkpoint(run)
    what = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    hint = "the volume is full: free space or raise its size, " if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    safe = f"{kept} is intact and `--resume_from_checkpoint latest` continues from it" if kept else "no earlier checkpoint exists"
    return CheckpointSaveError(f"could not save checkpoint-{step} in {run} ({what}: {exc.strerror or exc}); {hint}{safe}")


def record_latest(run_dir: str | Path, checkpoint: Path) -> None:
    write_text_atomic(Path(run_dir) / LATEST_FILE, str(checkpoint) + "\n")


def new_run_dir(output_dir: str | Path, model_type: str, now: datetime | None = None) -> Path:
    """output/<model_type>/v<N>-<YYYYmmdd-HHMMSS>, N one more than the highest there."""
    base = Path(output_dir) / model_type
    versions = [int(m.group(1)) for p in base.glob("v*") if (m := RUN_RE.match(p.name))] if base.is_dir() else []
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return base / f"v{max(versions, default=-1) + 1}-{stamp}"


def latest_run_dir(output_dir: str | Path, model_type: str) -> Path | None:
    """The newest run that has a complete checkpoint (what `--resume_from_checkpoint latest` continues)."""
    base = Path(output_dir) / model_type
    runs = sorted(
        ((int(m.group(1)), p) for p in base.glob("v*") if (m := RUN_RE.match(p.name)) and checkpoints(p)),
        reverse=True,
    ) if base.is_dir() else []
    return runs[0][1] if runs else None


def resolve_checkpoint_arg(value: str, output_dir: str | Path) -> Path:
    """`latest` -> the newest complete checkpoint under output_dir (a run dir, or runs below it)."""
    if value != "latest":
        path = Path(value)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {value!r} does not exist")
        if CHECKPOINT_RE.match(path.name) and (reason := incomplete_reason(path)):
            raise FileNotFoundError(f"checkpoint {value!r} is incomplete ({reason}); pick another or use `latest`")
        return path
    out = Path(output_dir)
    found = latest_checkpoint(out)
    if found is None:
        runs = sorted(out.glob("*/v*-*")) if out.is_dir() else []
        candidates = [c for r in runs if (c := latest_checkpoint(r))]
        found = max(candidates, key=lambda c: c.stat().st_mtime) if candidates else None
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {out}")
    return found
