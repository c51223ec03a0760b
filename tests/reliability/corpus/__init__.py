"""The bad-input corpus: text cases live in files here, binary ones (images) are generated at test time.

Layers and their files:
- dataset: rows.jsonl (one bad row per line) + rows.expected (the reason each must be refused with, a
  literal text per line, `a|b` for either), GENERATED_ROWS below (bytes that cannot sit in a text file, or are large), and
  good_rows.jsonl (odd but valid images that must be accepted and normalised to RGB).
- http: http.json (requests to the server: status, error type and words of the message).
- crs: crs/*.yaml (one invalid custom resource per file; `# expect:` and `# refused-by:` headers).

`counts()` is what the README's reliability table shows; tests/reliability/test_readme_table.py checks it.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import yaml
from PIL import Image

HERE = Path(__file__).resolve().parent

# Rows written at test time: (raw line bytes, expected reason).
GENERATED_ROWS = [
    (b'{"query": "caf\xe9", "response": "latin-1, not UTF-8"}', "line is not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (json.dumps({"query": "word " * 3000, "response": "too long"}).encode(), "over max_length 512"),
    (json.dumps({"query": "q", "response": "r", "images": ["sparse-huge.png"]}).encode(), "-byte limit"),
]


def matches(reason: str, expected: str) -> bool:
    """An expected reason is literal text; `a|b` accepts either."""
    return any(alt in reason for alt in expected.split("|"))


def dataset_cases() -> list[tuple[bytes, str]]:
    """(line bytes, expected reason regex) for every bad dataset row."""
    lines = (HERE / "rows.jsonl").read_bytes().splitlines()
    expected = (HERE / "rows.expected").read_text().splitlines()
    assert len(lines) == len(expected), "rows.jsonl and rows.expected must have one line per case"
    return list(zip(lines, expected)) + GENERATED_ROWS


def good_rows() -> list[bytes]:
    return (HERE / "good_rows.jsonl").read_bytes().splitlines()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grey pixels, with one row of real data (a few hundred bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b"")


def write_images(folder: Path) -> None:
    """Every image the dataset rows name: bad ones (refused) and odd-but-valid ones (normalised)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = _png(Image.new("RGB", (40, 30), (220, 20, 20)))
    (folder / "good.png").write_bytes(good)
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    jpg = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(jpg, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 3])
    corrupt = bytearray(good)
    corrupt[40:] = bytes((b * 7 + 13) % 256 for b in corrupt[40:])  # valid signature and header, garbage after
    (folder / "corrupt.png").write_bytes(bytes(corrupt))
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "empty.png").write_bytes(b"")
    # A decompression bomb: a header claiming 30000 x 30000 pixels (900 M, 0.9 GB decoded) in a few hundred bytes.
    # The header alone must be enough to refuse it: nothing may try to decode it.
    (folder / "bomb.png").write_bytes(png_bomb(30_000, 30_000))
    # Over the 20 MB byte limit: a PNG header followed by a hole (sparse, so nothing is written to disk).
    with open(folder / "huge.png", "wb") as f:
        f.write(good)
        f.truncate(21 * 1024 * 1024)
    with open(folder / "sparse-huge.png", "wb") as f:
        f.write(good)
        f.truncate(64 * 1024 * 1024)
    # Odd but valid: each must come out as an RGB image of the same size.
    Image.new("I;16", (32, 32), 40000).save(folder / "gray16.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(folder / "cmyk.jpg", format="JPEG")
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([255, 255, 255, 220, 20, 20] + [0] * (256 * 3 - 6))
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    frames = [Image.new("RGB", (32, 32), c) for c in ((220, 20, 20), (20, 220, 20), (20, 20, 220))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    Image.new("LA", (32, 32), (255, 0)).save(folder / "la.png")  # fully transparent grey -> white
    rotated = Image.new("RGB", (40, 20), (220, 20, 20))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 on display: 40x20 is shown as 20x40
    rotated.save(folder / "rotated.jpg", format="JPEG", exif=exif)
    (folder / "imgs").mkdir(exist_ok=True)


GOOD_IMAGES = {  # file -> size after EXIF orientation
    "good.png": (40, 30), "gray16.png": (32, 32), "cmyk.jpg": (32, 32), "palette.png": (32, 32),
    "animated.gif": (32, 32), "la.png": (32, 32), "rotated.jpg": (20, 40),
}


def http_cases() -> list[dict]:
    return json.loads((HERE / "http.json").read_text())


def cr_cases() -> list[dict]:
    """{file, manifest, expect (regex), refused_by (schema | operator)} for every crs/*.yaml."""
    out = []
    for path in sorted((HERE / "crs").glob("*.yaml")):
        text = path.read_text()
        header = dict(re.findall(r"^# (expect|refused-by): (.+)$", text, flags=re.M))
        assert {"expect", "refused-by"} <= header.keys(), f"{path.name}: needs '# expect:' and '# refused-by:' lines"
        out.append({"file": path.name, "manifest": yaml.safe_load(text), "expect": header["expect"].strip(),
                    "refused_by": header["refused-by"].strip()})
    return out


def cluster_fault_counts() -> dict[str, int]:
    """From tests/reliability/test_cluster_faults.py itself: its tests, and the request faults (inject_fault calls)
    and watch faults (forced 410s on new watches, expiries of open ones, compactions) its API test injects."""
    import ast

    tree = ast.parse((HERE.parent / "test_cluster_faults.py").read_text())
    tests = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")]
    (api,) = [f for f in tests if f.name == "test_api_errors_timeouts_and_410s_while_reconciling"]
    calls = [n.func.attr for n in ast.walk(api) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    gone = sum(n.args[0].value for n in ast.walk(api) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and n.func.attr == "gone_on_next_watches")
    return {"tests": len(tests), "request_faults": calls.count("inject_fault"), "gone_watches": gone,
            "expiries": calls.count("expire_watches"), "compactions": calls.count("compact")}


def counts() -> dict[str, dict[str, int]]:
    """Inputs per layer, as the README table shows them."""
    crs = cr_cases()
    return {
        "dataset": {"refused": len(dataset_cases()), "accepted": len(good_rows())},
        "http": {"refused": len(http_cases())},
        "crs": {"refused": len(crs), "schema": sum(c["refused_by"] == "schema" for c in crs),
                "operator": sum(c["refused_by"] == "operator" for c in crs)},
        "cluster_faults": cluster_fault_counts(),
    }
