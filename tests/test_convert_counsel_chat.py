"""Tests for scripts/convert_counsel_chat.py.

The real counsel-chat CSV is read from ../shared/datasets next to the repository
(it is third-party data and is never copied into the repo). The small CSVs below
are made up in the tests.
"""

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import read_jsonl, run_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "convert_counsel_chat.py"
TABLE = REPO / "recipes" / "therapeutic" / "topic_domains.yaml"
SHARED = REPO.parent / "shared" / "datasets"
REAL_CSV = SHARED / "counsel_chat" / "20200325_counsel_chat.csv"
DOMAINS = ["psychology", "mental_health", "bias_detection", "general_therapeutic"]
COLUMNS = ["", "questionID", "questionTitle", "questionText", "questionLink", "topic",
           "therapistInfo", "therapistURL", "answerText", "upvotes", "views", "split"]

needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared datasets directory {SHARED} is absent (the real CSV is not in the repo)")


def run(*args, cwd=REPO):
    return run_script(SCRIPT, *args, cwd=cwd)


def read_csv_rows(path):
    csv.field_size_limit(2**31 - 1)
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def table_topics():
    return yaml.safe_load(TABLE.read_text(encoding="utf-8"))["topics"]


def check_schema(conv, topics_table):
    assert set(conv) == {"id", "domain", "messages", "source"}
    assert re.fullmatch(r"counsel_chat-\d+-\d+", conv["id"]), conv["id"]
    assert conv["domain"] in DOMAINS
    roles = [m["role"] for m in conv["messages"]]
    assert roles in (["user", "assistant"], ["system", "user", "assistant"])
    for m in conv["messages"]:
        assert set(m) == {"role", "content"}
        assert isinstance(m["content"], str) and m["content"] == m["content"].strip() and m["content"]
    src = conv["source"]
    assert set(src) == {"dataset", "question_id", "topic", "topics", "split", "upvotes", "url"}
    assert src["dataset"] == "counsel_chat"
    assert conv["id"].startswith(f"counsel_chat-{src['question_id']}-")
    assert src["topics"][0] == src["topic"] and len(set(src["topics"])) == len(src["topics"])
    assert conv["domain"] == topics_table[src["topic"]]
    assert isinstance(src["upvotes"], int)


def write_csv(path, rows):
    """rows: dicts with some of the columns; the rest are filled with made-up defaults."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for i, row in enumerate(rows):
            full = {"": i, "questionID": 1, "questionTitle": "Made-up title?", "questionText": "Made-up text.",
                    "questionLink": "https://example.org/q/1", "topic": "anxiety", "therapistInfo": "T",
                    "therapistURL": "https://example.org/t", "answerText": "Made-up answer.", "upvotes": 0,
                    "views": 0, "split": "train"}
            full.update(row)
            writer.writerow(full)
    return path


# ---------------------------------------------------------------- real CSV

@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    if not SHARED.is_dir():
        pytest.skip(f"shared datasets directory {SHARED} is absent (the real CSV is not in the repo)")
    tmp = tmp_path_factory.mktemp("real")
    out, stats_path = tmp / "nested" / "counsel_chat.jsonl", tmp / "stats.json"
    proc = run("--out", out, "--stats-json", stats_path, cwd=tmp)  # from outside the repo
    assert proc.returncode == 0, proc.stderr
    return proc, read_jsonl(out), json.loads(stats_path.read_text())


@needs_shared
def test_real_csv_counts_add_up(real_run):
    _, convs, stats = real_run
    rows = read_csv_rows(REAL_CSV)
    assert stats["rows_read"] == len(rows) == 2129
    skipped = sum(stats["skipped"].values())
    assert stats["conversations_written"] == len(convs) == stats["rows_read"] - stats["merged_duplicates"] - skipped
    # Independent check of the merge: the same answer to the same question URL repeated under
    # another topic (questionID differs between such copies, so it cannot be the key).
    seen, repeats = set(), 0
    for r in rows:
        key = (r["questionLink"], " ".join(r["answerText"].split()))
        repeats += key in seen
        seen.add(key)
    assert stats["merged_duplicates"] == repeats > 0
    assert sum(len(c["source"]["topics"]) - 1 for c in convs) == repeats


@needs_shared
def test_real_csv_output_schema_and_domains(real_run):
    proc, convs, stats = real_run
    topics_table = table_topics()
    for conv in convs:
        check_schema(conv, topics_table)
        assert len(conv["messages"]) == 2  # no system prompt was given
    assert len({c["id"] for c in convs}) == len(convs)
    assert len({(c["messages"][0]["content"], c["messages"][1]["content"]) for c in convs}) == len(convs)

    counts = Counter(c["domain"] for c in convs)
    assert set(counts) == set(DOMAINS)
    assert all(n >= 0.05 * len(convs) for n in counts.values()), counts
    assert stats["domains"] == dict(counts)
    report_line = next(line for line in proc.stdout.splitlines() if line.startswith("per domain:"))
    assert {d: int(n) for d, n in re.findall(r"(\w+) (\d+)", report_line)} == dict(counts)

    title_by_url = {r["questionLink"]: " ".join(r["questionTitle"].split()) for r in read_csv_rows(REAL_CSV)}
    for conv in convs:
        assert conv["messages"][0]["content"].startswith(title_by_url[conv["source"]["url"]])
        assert conv["source"]["split"] in {"train", "val", "test"}


@needs_shared
def test_every_real_topic_is_in_the_table():
    table = yaml.safe_load(TABLE.read_text(encoding="utf-8"))
    assert table["domains"] == DOMAINS
    assert set(table["topics"].values()) == set(DOMAINS)
    csv_topics = {r["topic"] for r in read_csv_rows(REAL_CSV)}
    assert len(csv_topics) == 31
    assert csv_topics - set(table["topics"]) == set()


# ---------------------------------------------------------------- made-up CSVs

def test_duplicate_is_merged_and_reused_id_is_not(tmp_path):
    csv_path = write_csv(tmp_path / "in.csv", [
        {"topic": "anxiety", "answerText": "Answer A."},
        {"topic": "anxiety", "answerText": "Answer B.", "upvotes": 3},
        {"topic": "parenting", "answerText": "Answer A.", "split": "test"},  # same question+answer, second topic
        # Same questionID and answer, but a different question: the ID was reused, not a duplicate.
        {"topic": "parenting", "answerText": "Answer A.", "questionTitle": "Another made-up question?",
         "questionLink": "https://example.org/q/other"},
    ])
    out = tmp_path / "out.jsonl"
    proc = run("--csv", csv_path, "--out", out, "--stats-json", tmp_path / "s.json")
    assert proc.returncode == 0, proc.stderr
    convs, stats = read_jsonl(out), json.loads((tmp_path / "s.json").read_text())
    for conv in convs:
        check_schema(conv, table_topics())
    assert [c["id"] for c in convs] == ["counsel_chat-1-0", "counsel_chat-1-1", "counsel_chat-1-2"]
    first = convs[0]
    assert first["source"]["topics"] == ["anxiety", "parenting"]
    assert first["source"]["split"] == "train" and first["domain"] == table_topics()["anxiety"]
    assert convs[1]["source"]["upvotes"] == 3
    assert convs[2]["messages"][0]["content"].startswith("Another made-up question?")
    assert convs[2]["source"]["topics"] == ["parenting"]
    assert stats["rows_read"] == 4 and stats["merged_duplicates"] == 1 and stats["merged_across_splits"] == 1
    assert "merged duplicates:     1" in proc.stdout


def test_empty_fields_are_skipped_and_counted(tmp_path):
    csv_path = write_csv(tmp_path / "in.csv", [
        {"answerText": "  \n "},
        {"questionTitle": "", "questionText": " ", "answerText": "Answer to nothing."},
        {"questionTitle": "Only a title?", "questionText": ""},
        {"questionTitle": "", "questionText": "Only a text."},
        {"questionTitle": "Spaces?", "questionText": "line one\n   line two",
         "answerText": "  First para.\n\n\n\nSecond\u00a0 para  here.  "},
    ])
    out = tmp_path / "out.jsonl"
    proc = run("--csv", csv_path, "--out", out, "--stats-json", tmp_path / "s.json")
    assert proc.returncode == 0, proc.stderr
    convs, stats = read_jsonl(out), json.loads((tmp_path / "s.json").read_text())
    assert stats["skipped"] == {"unknown_topic": 0, "empty_answer": 1, "empty_question": 1}
    assert stats["conversations_written"] == len(convs) == 3
    assert [c["messages"][0]["content"] for c in convs] == [
        "Only a title?", "Only a text.", "Spaces?\n\nline one\nline two"]
    assert convs[2]["messages"][1]["content"] == "First para.\n\nSecond para here."
    assert "empty_answer 1, empty_question 1" in proc.stdout


def test_unknown_topic_errors_by_default(tmp_path):
    csv_path = write_csv(tmp_path / "in.csv", [
        {"questionText": "line one\nline two"},  # multi-line fields: CSV row 1 is file lines 2-3,
        {"topic": "made-up-topic", "questionText": "line one\nline two"},  # row 2 is lines 4-5
    ])
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    proc = run("--csv", csv_path, "--out", out)
    assert proc.returncode == 2
    message = proc.stderr.strip()
    assert "\n" not in message
    assert "'made-up-topic'" in message and "row 2" in message and "line 4" in message
    assert "topic_domains.yaml" in message
    assert out.read_text() == "old\n"  # nothing is half-written on error


def test_unknown_topic_skip_or_map(tmp_path):
    csv_path = write_csv(tmp_path / "in.csv", [{"topic": "anxiety"}, {"topic": "made-up-topic", "answerText": "B."}])
    proc = run("--csv", csv_path, "--out", tmp_path / "a.jsonl", "--unknown-topic=skip", "--stats-json", tmp_path / "a.json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "a.json").read_text())
    assert stats["skipped"]["unknown_topic"] == 1 and stats["unknown_topics"] == {"made-up-topic": 1}
    assert len(read_jsonl(tmp_path / "a.jsonl")) == 1

    proc = run("--csv", csv_path, "--out", tmp_path / "b.jsonl", "--unknown-topic=bias_detection",
               "--stats-json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr
    convs, stats = read_jsonl(tmp_path / "b.jsonl"), json.loads((tmp_path / "b.json").read_text())
    assert convs[1]["domain"] == "bias_detection" and convs[1]["source"]["topic"] == "made-up-topic"
    assert stats["unknown_topics"] == {"made-up-topic": 1} and stats["skipped"]["unknown_topic"] == 0

    proc = run("--csv", csv_path, "--out", tmp_path / "c.jsonl", "--unknown-topic=not-a-domain")
    assert proc.returncode == 2 and "not-a-domain" in proc.stderr


def test_bad_input_exits_2_with_one_line(tmp_path):
    no_answer = tmp_path / "no_answer.csv"
    no_answer.write_text("questionID,questionTitle,questionText,questionLink,topic,upvotes,split\n"
                         "1,Made-up?,Text.,https://example.org/q/1,anxiety,0,train\n")
    proc = run("--csv", no_answer, "--out", tmp_path / "out.jsonl")
    assert proc.returncode == 2 and "answerText" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out.jsonl").exists()

    proc = run("--csv", tmp_path / "missing.csv", "--out", tmp_path / "out.jsonl")
    assert proc.returncode == 2 and "missing.csv" in proc.stderr and proc.stderr.count("\n") == 1


def test_system_prompt_comes_first(tmp_path):
    csv_path = write_csv(tmp_path / "in.csv", [{}])
    proc = run("--csv", csv_path, "--out", tmp_path / "a.jsonl", "--system-prompt", "You are a made-up helper.")
    assert proc.returncode == 0, proc.stderr
    (conv,) = read_jsonl(tmp_path / "a.jsonl")
    assert conv["messages"][0] == {"role": "system", "content": "You are a made-up helper."}
    assert [m["role"] for m in conv["messages"]] == ["system", "user", "assistant"]

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Prompt from a file.\n")
    proc = run("--csv", csv_path, "--out", tmp_path / "b.jsonl", "--system-prompt-file", prompt_file)
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(tmp_path / "b.jsonl")[0]["messages"][0] == {"role": "system", "content": "Prompt from a file."}
