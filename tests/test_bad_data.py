"""Bad data: each kind is a clear error (file, row, problem) by default, or with on_error=skip left out,
counted per reason and reported (log, DataModule stats, summary.json). No row is dropped silently."""

from __future__ import annotations

import json
import logging
import re

import pytest
from conftest import FAST, REPO, read_summary, run_train

from lightning_moe.config.schema import DataConfig
from lightning_moe.data.formats import DataError
from lightning_moe.data.datamodule import ChatDataModule
from lightning_moe.data.formats import read_file, read_many, read_stats

DOMAINS = ["psychology", "mental_health", "bias_detection", "general_therapeutic"]


def conv(text: str, **extra) -> dict:
    """A short good conversation whose assistant answer identifies it."""
    turns = [{"role": "user", "content": "How do I start?"}, {"role": "assistant", "content": text}]
    return {"messages": turns, **extra}


def line(record) -> bytes:
    return json.dumps(record).encode()


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    return path


def answers(ds) -> list[str]:
    return [m[-1]["content"] for m in ds["messages"]]


USER = {"role": "user", "content": "hi"}
BAD = {  # reason -> (the bad line, a phrase its message must contain)
    "malformed_json": (b'{"messages": [{"role": "user", "content": "hi"}', "malformed JSON: Expecting"),
    "not_utf8": (b'{"messages": [{"role": "user", "content": "caf\xff"}]}', "not UTF-8 (byte 0xff at column 47)"),
    "not_an_object": (b'["user", "hi"]', "not a JSON object (got list)"),
    "no_messages": (line({"text": "hi"}), "no 'messages' (or ShareGPT 'conversations') list"),
    "empty_conversation": (line({"messages": []}), "the conversation is empty"),
    "no_assistant_turn": (line({"messages": [USER]}), "no assistant turn"),
    "unknown_role": (line({"messages": [USER, {"role": "robot", "content": "x"}]}), "turn 1 has unknown role 'robot'"),
    "unknown_domain": (line(conv("x", domain="astrology")), "unknown domain 'astrology'"),
    "empty_content": (line({"messages": [USER, {"role": "assistant", "content": ""}]}),
                      "turn 1 (assistant) has empty content"),
    "bad_content_type": (line({"messages": [USER, {"role": "assistant", "content": 7}]}),
                         "turn 1 (assistant) content is not a string (got int)"),
    "system_not_first": (line({"messages": [USER, {"role": "system", "content": "x"}, conv("y")["messages"][1]]}),
                         "turn 1 is a system turn"),
}
WHITESPACE = (line({"messages": [USER, {"role": "assistant", "content": " \t\n "}]}),
              "turn 1 (assistant) has empty content")
CASES = [(reason, *bad) for reason, bad in BAD.items()] + [("empty_content", *WHITESPACE)]
IDS = [*BAD, "whitespace_content"]


@pytest.mark.parametrize("reason, bad, problem", CASES, ids=IDS)
def test_bad_row_raises_naming_file_row_and_problem(tmp_path, reason, bad, problem):
    path = write_lines(tmp_path / "conv.jsonl", [line(conv("one")), line(conv("two")), bad, line(conv("four"))])
    with pytest.raises(DataError, match=re.escape(f"{path}: row 3: ")) as err:
        read_file(path, DOMAINS)
    assert problem in str(err.value)


@pytest.mark.parametrize("reason, bad, problem", CASES, ids=IDS)
def test_bad_row_is_skipped_counted_and_logged(tmp_path, caplog, reason, bad, problem):
    path = write_lines(tmp_path / "conv.jsonl", [line(conv("one")), line(conv("two")), bad, line(conv("four"))])
    with caplog.at_level(logging.WARNING, logger="lightning_moe.data.formats"):
        ds, report = read_file(path, DOMAINS, on_error="skip")
    assert answers(ds) == ["one", "two", "four"]  # every good row, in order, including the one after the bad line
    assert report.as_dict() == {"rows": 4, "kept": 3, "skipped": {reason: 1}}
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert f"{path}: skipped 1 of 4 rows ({reason}=1)" in warning[0] and f"row 3: {problem}" in warning[0]


def test_mixed_bad_rows_each_counted_and_blank_lines_are_not_rows(tmp_path):
    lines = [line(conv("a", domain="psychology")), b"", BAD["malformed_json"][0], b"   \r", BAD["not_utf8"][0],
             line(conv("b")), BAD["unknown_role"][0], BAD["unknown_domain"][0], BAD["malformed_json"][0],
             WHITESPACE[0], line(conv("c", domain="mental_health")), b""]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    ds, report = read_file(path, DOMAINS, on_error="skip")
    assert answers(ds) == ["a", "b", "c"] and ds["domain_id"] == [0, -1, 1]
    assert report.skipped == {
        "malformed_json": 2, "not_utf8": 1, "unknown_role": 1, "unknown_domain": 1, "empty_content": 1,
    }
    assert report.rows == 9 == report.kept + sum(report.skipped.values())  # 12 lines, 3 of them blank
    # row numbers stay physical line numbers despite the blank lines before them
    assert report.examples[0].startswith("row 3: malformed JSON") and report.examples[1].startswith("row 5: not UTF-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: row 3: malformed JSON")):
        read_file(path, DOMAINS)


def test_utf8_bom_crlf_and_json_lines_in_a_dot_json_file_are_accepted(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line(conv("one")) + b"\r\n" + line(conv("two")) + b"\r\n")
    assert answers(read_file(path, DOMAINS)[0]) == ["one", "two"]
    lines_in_json = write_lines(tmp_path / "lines.json", [line(conv("one")), BAD["unknown_role"][0]])  # layout by content
    with pytest.raises(DataError, match=re.escape(f"{lines_in_json}: row 2: turn 1 has unknown role")):
        read_file(lines_in_json, DOMAINS)


def test_json_array_with_one_bad_element(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([conv("one"), conv("two", domain="astrology"), conv("three")], indent=2))
    with pytest.raises(DataError, match=re.escape(f"{path}: row 2: unknown domain 'astrology'")):
        read_file(path, DOMAINS)
    ds, report = read_file(path, DOMAINS, on_error="skip")
    assert answers(ds) == ["one", "three"]
    assert report.as_dict() == {"rows": 3, "kept": 2, "skipped": {"unknown_domain": 1}}


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_broken_json_array_always_raises_with_line_and_column(tmp_path, on_error):
    """A JSON array is one value: a syntax error or bad byte has no row to skip, so it stops even with skip."""
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}: malformed JSON at line 3, column 17")):
        read_file(path, DOMAINS, on_error=on_error)
    path.write_bytes(b'[\n  {"messages": [{"role": "user", "content": "caf\xff"}]}\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}: not UTF-8 (byte 0xff at line 2, column 49)")):
        read_file(path, DOMAINS, on_error=on_error)


def test_sharegpt_rows_get_the_same_checks(tmp_path):
    def sg(*turns, **extra):
        return line({"conversations": [{"from": f, "value": v} for f, v in turns], **extra})

    path = write_lines(tmp_path / "sg.jsonl", [
        sg(("human", "hi"), ("gpt", "one")),
        sg(("human", "hi"), ("bot", "x")),
        sg(("human", "hi")),
        sg(("human", "hi"), ("gpt", "  ")),
        sg(("system", "be kind"), ("user", "hi"), ("assistant", "five"), domain="psychology"),
        sg(("human", "hi"), ("gpt", "x"), domain="astrology"),
    ])
    with pytest.raises(DataError, match=re.escape(f"{path}: row 2: turn 1 has unknown role 'bot'")):
        read_file(path, DOMAINS)
    ds, report = read_file(path, DOMAINS, on_error="skip")
    assert answers(ds) == ["one", "five"] and ds[1]["messages"][0] == {"role": "system", "content": "be kind"}
    assert report.skipped == {"unknown_role": 1, "no_assistant_turn": 1, "empty_content": 1, "unknown_domain": 1}


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_empty_all_bad_and_missing_files_raise(tmp_path, on_error):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=re.escape(f"no conversations in {empty}")):
        read_file(empty, DOMAINS, on_error=on_error)
    array = tmp_path / "empty.json"
    array.write_text("[]")
    with pytest.raises(DataError, match=re.escape(f"no conversations in {array}")):
        read_file(array, DOMAINS, on_error=on_error)
    with pytest.raises(DataError, match="file not found"):
        read_file(tmp_path / "nope.jsonl", DOMAINS, on_error=on_error)


def test_skip_with_no_good_row_left_is_an_error_with_the_counts(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [BAD["malformed_json"][0], BAD["unknown_role"][0]])
    with pytest.raises(DataError, match=re.escape(f"{path}: all 2 rows are unusable")) as err:
        read_file(path, DOMAINS, on_error="skip")
    assert "malformed_json=1, unknown_role=1" in str(err.value)


def test_read_many_reports_per_file_and_in_total(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [line(conv("one")), BAD["malformed_json"][0]])
    b = write_lines(tmp_path / "b.jsonl", [BAD["malformed_json"][0], line(conv("two")), BAD["no_assistant_turn"][0]])
    ds, reports = read_many([str(a), str(b)], DOMAINS, on_error="skip")
    assert answers(ds) == ["one", "two"]
    assert read_stats(reports) == {
        "rows": 5,
        "kept": 2,
        "skipped": {"malformed_json": 2, "no_assistant_turn": 1},
        "files": {
            str(a): {"rows": 2, "kept": 1, "skipped": {"malformed_json": 1}},
            str(b): {"rows": 3, "kept": 1, "skipped": {"malformed_json": 1, "no_assistant_turn": 1}},
        },
    }


def test_datamodule_accounts_for_every_row(tokenizer, tmp_path):
    """rows read == skipped at read time + dropped at rendering (overlong) + kept for training, over both splits."""
    good = [line(conv(f"answer {i}", domain=DOMAINS[i % 4])) for i in range(8)]
    overlong = line({"messages": [{"role": "user", "content": "ok " * 100}, {"role": "assistant", "content": "long"}]})
    bad = [BAD["malformed_json"][0], BAD["unknown_domain"][0], overlong]
    path = write_lines(tmp_path / "d.jsonl", good[:3] + bad + good[3:])
    cfg = DataConfig(train_files=[str(path)], max_length=64, val_fraction=0.5, batch_size=2, on_error="skip",
                     overlong="drop")
    dm = ChatDataModule(cfg, tokenizer, DOMAINS)
    dm.setup()
    read, splits = dm.stats["read"], [dm.stats["train"], dm.stats["val"]]
    assert read["skipped"] == {"malformed_json": 1, "unknown_domain": 1}
    assert read["files"] == {str(path): {"rows": 11, "kept": 9, "skipped": {"malformed_json": 1, "unknown_domain": 1}}}
    assert sum(s["overlong"] for s in splits) == 1
    assert sum(s["dropped"].get("overlong", 0) for s in splits) == 1
    dropped = sum(n for s in splits for n in s["dropped"].values())
    kept = sum(s["kept"] for s in splits)
    assert kept == len(dm.train_set) + len(dm.val_set) == 8
    assert read["rows"] == 11 == kept + sum(read["skipped"].values()) + dropped
    assert sum(s["conversations"] for s in splits) == read["kept"]
    # the default stops at the first bad row instead
    with pytest.raises(DataError, match=re.escape(f"{path}: row 4: malformed JSON")):
        ChatDataModule(DataConfig(train_files=[str(path)], max_length=64), tokenizer, DOMAINS).setup()


def test_datamodule_counts_val_files_too(tokenizer, tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [line(conv(f"t{i}")) for i in range(4)] + [BAD["unknown_role"][0]])
    val = write_lines(tmp_path / "val.jsonl", [BAD["not_utf8"][0], line(conv("v"))])
    cfg = DataConfig(train_files=[str(train)], val_files=[str(val)], max_length=64, on_error="skip")
    dm = ChatDataModule(cfg, tokenizer, DOMAINS)
    dm.setup()
    assert dm.stats["read"]["skipped"] == {"not_utf8": 1, "unknown_role": 1}
    assert set(dm.stats["read"]["files"]) == {str(train), str(val)}
    assert (len(dm.train_set), len(dm.val_set)) == (4, 1)


@pytest.mark.slow
def test_train_py_names_the_bad_row_or_skips_and_reports_it(tmp_path):
    """End to end: the default stops before training with file, row and problem; skip trains and reports."""
    good = (REPO / "data" / "therapeutic_sample.jsonl").read_bytes().splitlines()[:30]
    path = write_lines(tmp_path / "bad.jsonl", good + [BAD["malformed_json"][0], BAD["unknown_role"][0]])
    args = [f"data.train_files=[{path}]", *FAST]

    out = run_train(*args, f"hydra.run.dir={tmp_path / 'raise'}", timeout=180)
    assert out.returncode == 2, out.stdout[-3000:]
    assert f"{path}: row 31: malformed JSON: Expecting" in out.stdout

    out = run_train(*args, "data.on_error=skip", f"hydra.run.dir={tmp_path / 'skip'}", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert f"{path}: skipped 2 of 32 rows (malformed_json=1, unknown_role=1)" in out.stdout  # the log line
    data = read_summary(tmp_path / "skip")["data"]
    assert data["read"]["skipped"] == {"malformed_json": 1, "unknown_role": 1}
    assert data["read"]["files"][str(path)] == {
        "rows": 32, "kept": 30, "skipped": {"malformed_json": 1, "unknown_role": 1},
    }
    assert data["train"]["conversations"] + data["val"]["conversations"] == 30
