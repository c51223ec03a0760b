"""Run directories and checkpoints: naming, finding the newest complete one, recording it.

A checkpoint is staged under `.staging/checkpoint-N` and renamed to `checkpoint-N` only when every
rank has finished writing, so a directory named `checkpoint-N` is always complete: a run killed
mid-save leaves only staging files, which resume never picks and the next save clears.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from .fsutil import write_text_atomic

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RUN_RE = re.compile(r"^v(\d+)-\d{8}-\d{6}$")
LATEST_FILE = "latest_checkpoint"
STAGING = ".staging"


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by step)."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


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
