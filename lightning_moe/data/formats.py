"""Read conversation files, check every record, and load the good ones into a `datasets.Dataset`.

Accepted, per record (JSON array or JSON Lines):
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "domain": str (optional)}
  {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...], "domain": ...}   (ShareGPT)
Output columns: messages (role/content), domain_id (index into the domain list, -1 if unlabelled).

The file is parsed here rather than by `datasets.load_dataset("json")` so that every problem can be pinned to
its place in the file: `<path>: row <N>: <problem>`. Row N is, for JSON Lines, physical line N of the file
(1-based, so an editor's go-to-line finds it; blank lines are not records and are skipped, but still count as
lines); for a JSON array, the N-th element (1-based). Columns are 1-based too.

A bad record either stops the read with DataError (on_error="raise", the default) or, with on_error="skip",
is left out and counted under a short reason key (REASONS); the counts are logged once per file and returned
in a FileReport, which the DataModule puts into summary.json. Nothing is dropped silently. A JSON array that
is not valid UTF-8 or not valid JSON always raises: it is one value, so no single row can be skipped.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from lightning_moe.config.schema import ConfigError
from lightning_moe.paths import resolve_path

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
REASONS = (  # the keys skipped rows are counted under
    "not_utf8", "malformed_json", "not_an_object", "no_messages", "empty_conversation", "bad_turn", "unknown_role",
    "bad_content_type", "empty_content", "system_not_first", "no_assistant_turn", "unknown_domain",
)
FEATURES = datasets.Features({
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "domain_id": datasets.Value("int64"),
})
BOM = b"\xef\xbb\xbf"  # editors on Windows often write one; it is not part of the data
MAX_EXAMPLES = 3  # bad rows quoted in the log per file


class DataError(ConfigError):
    """A data file or row that cannot be used; the message says which and why."""


class BadRow(Exception):
    """One unusable record: `reason` is a REASONS key, the message is the problem in words."""

    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason = reason


@dataclass
class FileReport:
    """What reading one file found: records (non-blank lines or array elements), kept, and skipped by reason."""

    path: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "skipped": dict(self.skipped)}


def _normalise(record, domains: list[str]) -> dict:
    if not isinstance(record, dict):
        raise BadRow("not_an_object", f"not a JSON object (got {type(record).__name__})")
    if record.get("messages") is not None:
        key, role_key, content_key, role_map = "messages", "role", "content", {r: r for r in ROLES}
    elif record.get("conversations") is not None:
        key, role_key, content_key, role_map = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise BadRow("no_messages", "no 'messages' (or ShareGPT 'conversations') list")
    turns = record[key]
    if not isinstance(turns, list):
        raise BadRow("no_messages", f"'{key}' is not a list (got {type(turns).__name__})")
    if not turns:
        raise BadRow("empty_conversation", "the conversation is empty")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow("bad_turn", f"turn {i} is not an object (got {type(turn).__name__})")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in role_map:
            raise BadRow("unknown_role", f"turn {i} has unknown role {role!r} (allowed: {', '.join(role_map)})")
        if not isinstance(content, str):
            got = type(content).__name__
            raise BadRow("bad_content_type", f"turn {i} ({role}) content is not a string (got {got})")
        if not content.strip():
            raise BadRow("empty_content", f"turn {i} ({role}) has empty content")
        if role_map[role] == "system" and i != 0:
            raise BadRow("system_not_first", f"turn {i} is a system turn; only the first turn may be")
        messages.append({"role": role_map[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no_assistant_turn", "no assistant turn, so there is nothing to train on")
    domain = record.get("domain")
    if domain is None or domain == "":
        domain_id = -1
    elif isinstance(domain, str) and domain in domains:
        domain_id = domains.index(domain)
    else:
        raise BadRow("unknown_domain", f"unknown domain {domain!r} (known: {', '.join(domains) or 'none configured'})")
    return {"messages": messages, "domain_id": domain_id}


def jsonl_records(data: bytes):
    """(line number, value or BadRow) per non-blank line: a bad line is reported, never ends the file."""
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():  # blank lines (e.g. the final newline) are layout, not records
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, BadRow("not_utf8", f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
            continue
        try:
            yield n, json.loads(text)
        except json.JSONDecodeError as e:
            yield n, BadRow("malformed_json", f"malformed JSON: {e.msg} at column {e.colno}")


def _array_records(data: bytes, path: str):
    """(element number, value) for a JSON array; the whole file is one value, so its errors always raise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}: not UTF-8 (byte 0x{data[e.start]:02x} at line {line}, column {column})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    return enumerate(value, 1)


def _existing(path: str | Path) -> Path:
    file = resolve_path(path)
    if not file.is_file():
        hint = " (files in data/generated/ are written by scripts/convert_*.py)" if "generated" in file.parts else ""
        raise DataError(f"{path}: file not found (looked at {file}){hint}")
    return file


def read_file(path: str | Path, domains: list[str], on_error: str = "raise") -> tuple[datasets.Dataset, FileReport]:
    """One file -> (Dataset(messages, domain_id) of its good records, what was read and skipped). `on_error` is
    "raise" or "skip" (validated with the config: data.on_error)."""
    file = _existing(path)
    data = file.read_bytes().removeprefix(BOM)
    # A .json file may hold either layout; the first character tells which (JSON Lines never starts with '[').
    is_array = file.suffix != ".jsonl" and re.match(rb"\s*\[", data) is not None
    records = _array_records(data, str(path)) if is_array else jsonl_records(data)
    report, rows = FileReport(str(path)), []
    for n, value in records:
        report.rows += 1
        try:
            if isinstance(value, BadRow):
                raise value
            rows.append(_normalise(value, domains))
        except BadRow as bad:
            if on_error == "raise":
                raise DataError(f"{path}: row {n}: {bad}") from None
            report.skipped[bad.reason] += 1
            if len(report.examples) < MAX_EXAMPLES:
                report.examples.append(f"row {n}: {bad}")
    report.kept = len(rows)
    counts = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items()))
    if report.rows == 0:
        raise DataError(f"no conversations in {path} (it is empty, blank, or an empty array)")
    if not rows:
        raise DataError(f"{path}: all {report.rows} rows are unusable, nothing to train on ({counts}); "
                        f"e.g. {'; '.join(report.examples)}")
    if report.skipped:
        log.warning("%s: skipped %d of %d rows (%s), e.g. %s", path, report.rows - report.kept, report.rows,
                    counts, "; ".join(report.examples))
    return datasets.Dataset.from_list(rows, features=FEATURES), report


def read_conversations(path: str | Path, domains: list[str], on_error: str = "raise") -> datasets.Dataset:
    """One file -> Dataset(messages, domain_id); see read_file for the counts of what was skipped."""
    return read_file(path, domains, on_error)[0]


def read_many(paths: list[str], domains: list[str], on_error: str = "raise") -> tuple[datasets.Dataset, list]:
    """Several files -> one Dataset, and one FileReport per file (in order)."""
    parts = [read_file(p, domains, on_error) for p in paths]
    return datasets.concatenate_datasets([ds for ds, _ in parts]), [r for _, r in parts]


def read_stats(reports: list[FileReport]) -> dict:
    """The `read` section of summary.json's data stats: rows == kept + sum(skipped), in total and per file."""
    skipped = sum((r.skipped for r in reports), Counter())
    return {
        "rows": sum(r.rows for r in reports),
        "kept": sum(r.kept for r in reports),
        "skipped": dict(sorted(skipped.items())),
        "files": {r.path: r.as_dict() for r in reports},
    }
