"""One benchmark result record, as ../shared/DESIGN.md fixes it: a JSON file in bench/results/ named
`<train|serve>-<what>-<card>-<date>.json` holding card (as nvidia-smi names it), command, git_commit, date,
config, baselines (measured in the same run), ours (the same metric names) and ratios.

    from record import card_name, write_record
    path = write_record(results_dir, "train", "speed", config={...}, baselines={...}, ours={...}, ratios={...})

Scripts rewrite their record after every measured config, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("train", "serve")
KEYS = ("card", "command", "git_commit", "date", "config", "baselines", "ours", "ratios")


def card_name() -> str:
    """The first GPU's name as nvidia-smi gives it ("NVIDIA H100 80GB HBM3"), or "cpu" where there is none."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=True).stdout.splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "cpu"


def git_commit() -> str:
    """$GIT_COMMIT when the command sets it (the device machine's copy of the tree may have no .git), else
    the short hash of HEAD, else "unknown"."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        out = ""
    return out or "unknown"


def command_line(argv: list[str] | None = None) -> str:
    """How the script was started, as a reader would retype it: `python bench/<script> <arguments>`."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0])
    shown = f"bench/{script.name}" if script.parent.name == "bench" or not script.parent.name else str(script)
    return " ".join(["python", shown, *argv[1:]])


def record_path(results_dir: str | Path, kind: str, what: str, card: str, day: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"record kind {kind!r}: use one of {', '.join(KINDS)}")
    return Path(results_dir) / f"{kind}-{what}-{card.replace(' ', '-')}-{day}.json"


def build_record(*, card: str, config: dict, baselines: dict, ours: dict, ratios: dict, command: str | None = None, commit: str | None = None, day: str | None = None, **extra) -> dict:
    """The record's fields in DESIGN.md's order; `extra` keys (e.g. per-phase detail) follow them."""
    clash = set(extra) & set(KEYS)
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} would overwrite the record's own")
    return {
        "card": card,
        "command": command or command_line(),
        "git_commit": commit or git_commit(),
        "date": day or date.today().isoformat(),
        "config": config,
        "baselines": baselines,
        "ours": ours,
        "ratios": ratios,
        **extra,
    }


def write_record(results_dir: str | Path, kind: str, what: str, *, config: dict, baselines: dict, ours: dict, ratios: dict, card: str | None = None, **fields) -> Path:
    """Write (or rewrite) `<results_dir>/<kind>-<what>-<card>-<date>.json`; returns its path."""
    record = build_record(card=card or card_name(), config=config, baselines=baselines, ours=ours, ratios=ratios, **fields)
    return save_record(results_dir, kind, what, record)


def save_record(results_dir: str | Path, kind: str, what: str, record: dict) -> Path:
    """Write a built record to `<results_dir>/<kind>-<what>-<card>-<date>.json` atomically (a temporary file
    renamed into place: a run killed mid-write leaves the last complete record)."""
    path = record_path(results_dir, kind, what, record["card"], record["date"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path
