"""Datasets: read jsonl/json rows in the three formats users have, and check them before any GPU is held.

Row formats (one JSON object per line in .jsonl, or a JSON array in .json):
- ms-swift (the seed): {"query", "response", "history": [[q, r], ...], "images": [...], "system"}
- InternVL official:   {"image": str | [...], "conversations": [{"from": "human"|"gpt"|"system", "value"}]}
- messages (ms-swift 3): {"messages": [{"role": "system"|"user"|"assistant", "content"}], "images": [...]}
Relative image paths are resolved against the dataset file's folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .images import ImageError, image_size
from .templates import IMAGE_TAG, Conversation, PromptTooLong, TemplateError, count_image_tags


class RowError(ValueError):
    """A row that cannot be used; str() is the reason, without the location."""


@dataclass
class Row:
    source: Path
    line: int  # 1-based line in a .jsonl file, or 1-based item number in a .json array
    conversation: Conversation

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _as_str(value, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def _as_images(value, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RowError(f"field {field!r} must be a path/URL or a list of them")
    return list(value)


def _from_swift(obj: dict) -> Conversation:
    if "query" not in obj:
        raise RowError("missing field 'query'")
    if "response" not in obj:
        raise RowError("missing field 'response'")
    turns = []
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RowError("field 'history' must be a list of [query, response] pairs")
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError(f"history[{k}] must be a [query, response] pair")
        turns.append((_as_str(pair[0], f"history[{k}][0]"), _as_str(pair[1], f"history[{k}][1]")))
    turns.append((_as_str(obj["query"], "query"), _as_str(obj["response"], "response")))
    system = obj.get("system")
    return Conversation(turns=turns, images=_as_images(obj.get("images"), "images"), system=None if system is None else _as_str(system, "system"))


def _pair_turns(messages: list[tuple[str, str]], field: str) -> tuple[str | None, list[tuple[str, str]]]:
    system = None
    if messages and messages[0][0] == "system":
        system = messages[0][1]
        messages = messages[1:]
    if not messages or len(messages) % 2:
        raise RowError(f"{field} must alternate user/assistant turns and end with the assistant's")
    turns = []
    for k in range(0, len(messages), 2):
        (r1, q), (r2, a) = messages[k], messages[k + 1]
        if r1 != "user" or r2 != "assistant":
            raise RowError(f"{field}[{k}]/[{k + 1}] are {r1}/{r2}; expected user then assistant")
        turns.append((q, a))
    return system, turns


def _from_official(obj: dict) -> Conversation:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    convs = obj["conversations"]
    if not isinstance(convs, list):
        raise RowError("field 'conversations' must be a list")
    messages = []
    for k, m in enumerate(convs):
        if not isinstance(m, dict) or not isinstance(m.get("from"), str) or m["from"] not in roles or "value" not in m:
            raise RowError(f"conversations[{k}] needs 'from' (human/gpt/system) and 'value'")
        messages.append((roles[m["from"]], _as_str(m["value"], f"conversations[{k}].value")))
    system, turns = _pair_turns(messages, "conversations")
    return Conversation(turns=turns, images=_as_images(obj.get("image", obj.get("images")), "image"), system=system)


def _from_messages(obj: dict) -> Conversation:
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise RowError("field 'messages' must be a list")
    messages = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ("system", "user", "assistant") or "content" not in m:
            raise RowError(f"messages[{k}] needs 'role' (system/user/assistant) and 'content'")
        messages.append((m["role"], _as_str(m["content"], f"messages[{k}].content")))
    system, turns = _pair_turns(messages, "messages")
    return Conversation(turns=turns, images=_as_images(obj.get("images"), "images"), system=system)


def parse_row(obj) -> Conversation:
    """A Conversation from one decoded JSON row, or RowError naming the field at fault."""
    if not isinstance(obj, dict):
        raise RowError(f"row must be a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        conv = _from_official(obj)
    elif "messages" in obj:
        conv = _from_messages(obj)
    else:
        conv = _from_swift(obj)
    tags = count_image_tags(conv)
    if tags and tags != len(conv.images):
        raise RowError(f"{tags} {IMAGE_TAG} tag(s) but {len(conv.images)} image(s)")
    return conv


TOO_DEEP = "not valid JSON (nested too deeply)"


def iter_raw_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line or item number, decoded JSON or a RowError) for every row of a .jsonl or .json file."""
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            yield getattr(e, "lineno", 1), RowError(f"not valid JSON: {e}")
            return
        except RecursionError:
            yield 1, RowError(TOO_DEEP)
            return
        if not isinstance(items, list):
            yield 1, RowError("a .json dataset must be a JSON array of rows")
            return
        yield from enumerate(items, start=1)
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                yield lineno, RowError("line is not UTF-8 text")
                continue
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                obj = RowError(f"not valid JSON ({e.msg} at column {e.colno})")
            except RecursionError:  # `[[[[...` thousands deep: the decoder's own limit, not a crash
                obj = RowError(TOO_DEEP)
            yield lineno, obj


# Relative image paths must stay inside the dataset's folder: a row saying `../../etc/passwd` (or
# `imgs/../../../var/run/secrets/...`) is refused unless this is set. The check is lexical (`..` segments),
# so symlinks a dataset's owner put inside the folder keep working. Absolute paths are the writer's explicit
# choice (ms-swift datasets often use them) and are allowed; every path is only ever decoded as an image.
ALLOW_OUTSIDE_ENV = "INTERNVL_ALLOW_PATHS_OUTSIDE_DATASET"


def allow_paths_outside_dataset() -> bool:
    return os.environ.get(ALLOW_OUTSIDE_ENV, "").strip().lower() in ("1", "true", "yes")


def resolve_image_paths(conv: Conversation, base_dir: Path, *, allow_outside: bool | None = None) -> Conversation:
    """Relative image paths joined to base_dir; RowError for one that climbs out of it (see ALLOW_OUTSIDE_ENV)."""
    if allow_outside is None:
        allow_outside = allow_paths_outside_dataset()
    images = []
    for src in conv.images:
        if src.startswith(("http://", "https://", "data:")) or Path(src).is_absolute():
            images.append(src)
            continue
        joined = os.path.normpath(os.path.join(base_dir, src))
        root = os.path.normpath(str(base_dir))
        if not allow_outside and os.path.commonpath([root, joined]) != root:
            shown = src if len(src) <= 80 else src[:60] + "..." + src[-12:]
            raise RowError(
                f"image path {shown!r} points outside the dataset folder {root}; "
                f"use a path inside it, an absolute path, or set {ALLOW_OUTSIDE_ENV}=1"
            )
        images.append(joined)
    return Conversation(turns=conv.turns, images=images, system=conv.system)


def read_dataset(paths: str | Path | list) -> list[Row]:
    """All rows of one or more files (comma-separated string or list); raises on the first bad row.

    Run `internvl data check` first to see every bad row at once.
    """
    rows = []
    for path in split_paths(paths):
        for line, obj in iter_raw_rows(path):
            if isinstance(obj, RowError):
                raise RowError(f"{path}:{line}: {obj}")
            try:
                conv = resolve_image_paths(parse_row(obj), path.parent)
            except RowError as e:
                raise RowError(f"{path}:{line}: {e}") from None
            rows.append(Row(path, line, conv))
    return rows


def split_paths(paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [p for p in str(paths).split(",") if p.strip()]
    out = [Path(p).expanduser() for p in paths]
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"dataset file(s) not found: {', '.join(missing)}")
    return out


@dataclass
class Problem:
    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


@dataclass
class CheckReport:
    rows: int
    good: int
    problems: list[Problem]
    max_tokens: int = 0

    def to_json(self) -> dict:
        return {
            "rows": self.rows,
            "good": self.good,
            "bad": len(self.problems),
            "max_tokens": self.max_tokens,
            "errors": [{"file": p.source, "line": p.line, "reason": p.reason} for p in self.problems],
        }


def check_row(obj, base_dir: Path, *, template=None, image_kwargs: dict | None = None) -> int:
    """Validate one decoded row; returns its token count (0 without a template); raises RowError."""
    conv = resolve_image_paths(parse_row(obj), base_dir)
    sizes = []
    for src in conv.images:
        try:
            sizes.append(image_size(src, **(image_kwargs or {})))
        except ImageError as e:
            raise RowError(str(e)) from None
    if template is None:
        return 0
    tiles = [template.tiler.num_tiles(w, h) for w, h in sizes]
    try:
        return len(template.encode(conv, tiles))
    except PromptTooLong as e:
        raise RowError(f"{e.length} tokens after tiling ({e.image_tokens} image tokens), over max_length {e.max_length}") from None
    except TemplateError as e:
        raise RowError(str(e)) from None


def check_dataset(paths, *, template=None, image_kwargs: dict | None = None, progress: bool = False) -> CheckReport:
    """Check every row of every file; never stops at the first problem."""
    from tqdm import tqdm

    problems: list[Problem] = []
    rows = good = max_tokens = 0
    for path in split_paths(paths):
        raw_rows = iter_raw_rows(path)
        if progress:
            raw_rows = tqdm(raw_rows, desc=f"checking {path.name}", unit="row", leave=False)
        for line, obj in raw_rows:
            rows += 1
            try:
                if isinstance(obj, RowError):
                    raise obj
                max_tokens = max(max_tokens, check_row(obj, path.parent, template=template, image_kwargs=image_kwargs))
                good += 1
            except RowError as e:
                problems.append(Problem(str(path), line, str(e)))
    return CheckReport(rows=rows, good=good, problems=problems, max_tokens=max_tokens)
