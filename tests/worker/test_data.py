"""Datasets: every format parses, and `internvl data check` finds every planted bad row, and only those."""

import json

import pytest
from PIL import Image

from internvl_worker.cli import main
from internvl_worker.data import RowError, check_dataset, parse_row, read_dataset


def test_three_formats_give_the_same_conversation():
    swift = {"query": "<image>\nq2", "response": "r2", "history": [["q1", "r1"]], "images": ["a.png"], "system": "S"}
    official = {
        "image": "a.png",
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "r1"},
            {"from": "human", "value": "<image>\nq2"},
            {"from": "gpt", "value": "r2"},
        ],
    }
    messages = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "r1"},
            {"role": "user", "content": "<image>\nq2"},
            {"role": "assistant", "content": "r2"},
        ],
        "images": ["a.png"],
    }
    convs = [parse_row(r) for r in (swift, official, messages)]
    for c in convs:
        assert (c.turns, c.images, c.system) == ([("q1", "r1"), ("<image>\nq2", "r2")], ["a.png"], "S")


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"response": "r"}, "missing field 'query'"),
        ({"query": "q"}, "missing field 'response'"),
        ({"query": 3, "response": "r"}, "'query' must be a string"),
        ({"query": "q", "response": "r", "images": [1]}, "'images' must be a path/URL"),
        ({"query": "q", "response": "r", "history": [["only one"]]}, "history\\[0\\] must be a \\[query, response\\] pair"),
        ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}, "expected user then assistant"),
        ({"messages": [{"role": "user", "content": "x"}]}, "end with the assistant"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_rows_name_the_field(row, reason):
    with pytest.raises(RowError, match=reason):
        parse_row(row)


@pytest.fixture()
def planted(tmp_path):
    """A dataset with good rows and bad rows at known lines."""
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    Image.new("RGB", (900, 100), "blue").save(tmp_path / "wide.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = {"query": "What color?", "response": "red", "images": ["red.png"]}
    lines = [
        json.dumps(good),  # 1 good
        '{"query": "oops", "response": ',  # 2 not JSON
        json.dumps({"query": "q"}),  # 3 missing response
        json.dumps({"query": "q", "response": "r", "images": ["nope.png"]}),  # 4 missing image
        json.dumps({"query": "q", "response": "r", "images": ["broken.png"]}),  # 5 unreadable image
        json.dumps({"query": "<image> and <image>", "response": "r", "images": ["red.png"]}),  # 6 tag count
        json.dumps({"query": "long", "response": "r", "images": ["wide.png", "wide.png", "wide.png"]}),  # 7 too long
        "",  # 8 blank: skipped
        json.dumps({"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nc?"}, {"from": "gpt", "value": "red"}]}),  # 9 good
        json.dumps({"messages": [{"role": "user", "content": "text only"}, {"role": "assistant", "content": "ok"}]}),  # 10 good
        json.dumps({"query": "q", "response": "r", "images": [str(tmp_path / "red.png")]}),  # 11 good (absolute path)
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


BAD_LINES = {2: "not valid JSON", 3: "missing field 'response'", 4: "not found", 5: "corrupt or truncated", 6: "2 <image> tag(s) but 1 image(s)", 7: "over max_length 200"}


def test_check_finds_every_planted_row_and_no_others(planted, tiny):
    template = tiny.template
    template.max_length = 200
    try:
        report = check_dataset([planted], template=template)
    finally:
        template.max_length = None
    assert report.rows == 10 and report.good == 4
    found = {p.line: p.reason for p in report.problems}
    assert sorted(found) == sorted(BAD_LINES)
    for line, reason in BAD_LINES.items():
        assert reason in found[line], (line, found[line])
    # Three 900x100 images: 3 x (4 tiles + thumbnail) x 16 tokens = 240 image tokens (tiny: max 4 tiles).
    assert "240 image tokens" in found[7]


def test_check_cli_prints_file_line_and_writes_report(planted, tiny_model_dir, tmp_path, capsys):
    report_path = tmp_path / "out" / "report.json"
    rc = main(["data", "check", str(planted), "--model_id_or_path", str(tiny_model_dir), "--max_length", "200", "--report", str(report_path)])
    out = capsys.readouterr().out
    assert rc == 1
    for line in BAD_LINES:
        assert f"{planted}:{line}: " in out
    assert "10 rows: 4 good, 6 bad" in out
    report = json.loads(report_path.read_text())
    assert report["bad"] == 6 and [e["line"] for e in report["errors"]] == sorted(BAD_LINES)
    # Without a model the length check is skipped (row 7 passes) and the summary says so.
    assert main(["data", "check", str(planted)]) == 1
    assert "token lengths not checked" in capsys.readouterr().out


def test_clean_file_passes_and_read_dataset_resolves_paths(planted, tmp_path):
    good_lines = [line for k, line in enumerate(planted.read_text().splitlines(), 1) if k in (1, 9, 10, 11)]
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(good_lines))
    assert main(["data", "check", str(clean)]) == 0
    rows = read_dataset(str(clean))
    assert [r.line for r in rows] == [1, 2, 3, 4]
    assert rows[0].conversation.images == [str(tmp_path / "red.png")]
    with pytest.raises(RowError, match=f"{planted}:2: not valid JSON"):
        read_dataset(planted)


def test_json_array_files(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    (tmp_path / "d.json").write_text(json.dumps([{"query": "q", "response": "r", "images": ["i.png"]}, {"query": "q"}]))
    report = check_dataset(tmp_path / "d.json")
    assert report.rows == 2 and [(p.line, p.reason) for p in report.problems] == [(2, "missing field 'response'")]
