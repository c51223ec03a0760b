"""A learnable synthetic task: "what is the dominant color?" over generated images."""

import json
import random
from pathlib import Path

from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


def color_dataset(folder: Path, n: int, *, seed: int = 0, name: str = "train.jsonl", text_only_every: int = 0) -> Path:
    """n rows of {query, response, images}: a colored image (random size, some noise) -> its color.
    With text_only_every=k, every k-th row is a text-only question instead."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        if text_only_every and i % text_only_every == text_only_every - 1:
            lines.append(json.dumps({"query": "Say yes.", "response": "yes"}))
            continue
        color = rng.choice(sorted(COLORS))
        w, h = rng.randint(24, 80), rng.randint(24, 80)
        img = Image.new("RGB", (w, h), COLORS[color])
        for _ in range(10):  # a few off-color specks so images differ beyond their size
            img.putpixel((rng.randrange(w), rng.randrange(h)), tuple(rng.randrange(256) for _ in range(3)))
        path = folder / f"img_{seed}_{i}.png"
        img.save(path)
        lines.append(json.dumps({"query": "What is the dominant color?", "response": color, "images": [path.name]}))
    out = folder / name
    out.write_text("\n".join(lines) + "\n")
    return out
