"""Atomic writes: a reader (or a resumed run) sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


class AtomicDir:
    """Build a directory under a temporary name next to `final`, rename it into place on success.

        with AtomicDir(out / "checkpoint-100") as tmp:
            model.save_pretrained(tmp)
    On an exception (or a kill) only the `.tmp-` directory is left, which readers never pick.
    """

    def __init__(self, final: str | Path):
        self.final = Path(final)
        self.tmp = self.final.parent / f".tmp-{self.final.name}-{os.getpid()}"

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        # A build killed earlier (another pid: a retried pod) left its `.tmp-` copy; it can only be
        # half of one, and a merged 26B model is 50 GB of the volume, so clear it before writing again.
        for stale in self.final.parent.glob(f".tmp-{self.final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.final.exists():
            # Replace: move the old one aside first so there is never a moment with neither.
            old = self.final.parent / f".old-{self.final.name}-{os.getpid()}"
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
