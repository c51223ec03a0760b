"""Layer: dataset rows. Every bad row of the corpus is refused with its own reason and line number, by
`internvl data check` (all at once, exit 1, no traceback) and by training's reader (the first, with
FILE:LINE); odd but valid images (16-bit, CMYK, palette, animated, EXIF-rotated, LA) are accepted as RGB."""

from __future__ import annotations

import json
import re

import pytest

from internvl_worker.cli import main
from internvl_worker.data import RowError, check_dataset, read_dataset
from internvl_worker.images import load_image

from .corpus import GOOD_IMAGES, dataset_cases, good_rows, matches, write_images


TEMPLATE_LEVEL = ("over max_length", "reserved image token", "not valid Unicode")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One dataset folder: bad rows first (line k = case k), then the good rows."""
    folder = tmp_path_factory.mktemp("corpus") / "data"
    write_images(folder)
    cases = dataset_cases()
    lines = [raw for raw, _ in cases] + good_rows()
    (folder / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return folder / "train.jsonl", cases


def test_every_bad_row_is_refused_with_its_reason(dataset, tiny):
    path, cases = dataset
    tiny.template.max_length = 512
    try:
        report = check_dataset(path, template=tiny.template)
    finally:
        tiny.template.max_length = None
    by_line = {p.line: p.reason for p in report.problems}
    missing = [(k, want) for k, (_, want) in enumerate(cases, start=1) if k not in by_line]
    assert not missing, f"bad rows that were accepted: {missing}"
    wrong = [(k, by_line[k], want) for k, (_, want) in enumerate(cases, start=1) if not matches(by_line[k], want)]
    assert not wrong, "rows refused for the wrong reason:\n" + "\n".join(map(str, wrong))
    assert all("Traceback" not in r and len(r) < 400 for r in by_line.values())
    assert report.rows == len(cases) + len(good_rows())
    assert report.good == len(good_rows()), [p for p in report.problems if p.line > len(cases)]
    print(f"\n[reliability] dataset: {len(cases)} bad rows refused, {len(good_rows())} odd-but-valid rows accepted")


def test_data_check_cli_reports_every_row_and_exits_1(dataset, tiny_model_dir, tmp_path, capsys):
    path, cases = dataset
    report = tmp_path / "report.json"
    code = main(["data", "check", str(path), "--model_id_or_path", str(tiny_model_dir), "--max_length", "512", "--report", str(report)])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert f"{len(cases) + len(good_rows())} rows: {len(good_rows())} good, {len(cases)} bad" in out
    lines = {int(m.group(1)) for m in re.finditer(rf"{re.escape(str(path))}:(\d+): ", out)}
    assert lines == set(range(1, len(cases) + 1))
    saved = json.loads(report.read_text())
    assert saved["bad"] == len(cases) and saved["good"] == len(good_rows())


@pytest.mark.parametrize("k", range(1, len(dataset_cases()) + 1))
def test_training_reader_stops_at_the_bad_row_with_file_and_line(dataset, tmp_path, k):
    """What `internvl sft` reads: a file of good rows with case k planted on line 3 fails there, clearly."""
    path, cases = dataset
    raw, want = cases[k - 1]
    good = good_rows()
    planted = path.parent / f"planted-{k}.jsonl"
    planted.write_bytes(b"\n".join([good[0], good[1], raw, good[2]]) + b"\n")
    if any(w in want for w in TEMPLATE_LEVEL):
        # Needs the model's template: training measures every row with it before the first step
        # (train.measure_rows), which drops rows over max_length and stops at the others with FILE:LINE.
        assert len(read_dataset(planted)) == 4
        return
    try:
        rows = read_dataset(planted)
    except RowError as e:
        assert str(e).startswith(f"{planted}:3: ") and matches(str(e), want), str(e)
        return
    # Image problems surface when training loads the image: the same clean ImageError, never a crash.
    from internvl_worker.images import ImageError, image_size

    with pytest.raises(ImageError) as exc:
        for src in rows[2].conversation.images:
            image_size(src)
            load_image(src)
    assert matches(str(exc.value), want), str(exc.value)


def test_paths_outside_the_dataset_are_allowed_only_when_asked(dataset, monkeypatch):
    path, _ = dataset
    escape = path.parent / "escape.jsonl"
    escape.write_text(json.dumps({"query": "q", "response": "r", "images": ["../outside.png"]}) + "\n")
    (path.parent.parent / "outside.png").write_bytes((path.parent / "good.png").read_bytes())
    with pytest.raises(RowError, match="points outside the dataset folder"):
        read_dataset(escape)
    monkeypatch.setenv("INTERNVL_ALLOW_PATHS_OUTSIDE_DATASET", "1")
    (row,) = read_dataset(escape)
    assert load_image(row.conversation.images[0]).size == (40, 30)


@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
def test_odd_images_become_rgb(dataset, name):
    img = load_image(dataset[0].parent / name)
    assert img.mode == "RGB" and img.size == GOOD_IMAGES[name]
    if name == "la.png":
        assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    if name == "gray16.png":
        assert img.getpixel((0, 0))[0] == 40000 // 256  # scaled to 8 bits, not clipped to white
