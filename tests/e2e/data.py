"""The e2e dataset: "what is the dominant color?" rows whose images are inline data: URLs.

Inline images keep a whole dataset in one JSONL file, so it fits a ConfigMap (no image files to copy onto
a PVC) and the same file works on the emulator and on a real cluster. examples/data/tiny-colors.jsonl is
`python -m tests.e2e.data examples/data/tiny-colors.jsonl` (a test keeps the two equal).
"""
from __future__ import annotations

import base64
import io
import json
import random
import sys
from pathlib import Path

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
QUESTION = "What is the dominant color?"


def png_data_url(rgb: tuple[int, int, int], size: tuple[int, int] = (32, 32), *, specks: int = 0, seed: int = 0) -> str:
    from PIL import Image

    rng = random.Random(seed)
    img = Image.new("RGB", size, rgb)
    for _ in range(specks):  # a few off-color pixels so images differ beyond their size
        img.putpixel((rng.randrange(size[0]), rng.randrange(size[1])), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def color_rows(n: int = 32, *, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        color = rng.choice(sorted(COLORS))
        size = (rng.randint(24, 64), rng.randint(24, 64))
        rows.append({"query": QUESTION, "response": color, "images": [png_data_url(COLORS[color], size, specks=6, seed=seed * 1000 + i)]})
    return rows


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def bad_jsonl(n: int = 32, *, bad_lines: dict[int, str]) -> str:
    """color_rows with some lines (1-based) replaced by raw text, e.g. {7: '{"query": "no answer"}'}."""
    lines = to_jsonl(color_rows(n)).splitlines()
    for line_no, text in bad_lines.items():
        lines[line_no - 1] = text
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/data/tiny-colors.jsonl")
    out.write_text(to_jsonl(color_rows()))
    print(f"wrote {out} ({out.stat().st_size} bytes)")
