"""Tests for scripts/convert_esconv.py.

The real ESConv split files are read from ../shared/datasets next to the repository (CC BY-NC 4.0
data, never copied into the repo). The small JSONL files below are made up in the tests.
"""

import json
import re
from collections import Counter
from itertools import groupby
from pathlib import Path

import pytest
import yaml
from conftest import read_jsonl, run_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "convert_esconv.py"
TABLE = REPO / "recipes" / "therapeutic" / "esconv_domains.yaml"
SHARED = REPO.parent / "shared" / "datasets"
REAL_DIR = SHARED / "esconv"
SPLITS = ("train", "valid", "test")
DOMAINS = ["psychology", "mental_health", "bias_detection", "general_therapeutic"]

needs_shared = pytest.mark.skipif(
    not REAL_DIR.is_dir(), reason=f"{REAL_DIR} is absent (the real ESConv data is not in the repo)")


def run(*args, cwd=REPO):
    return run_script(SCRIPT, *args, cwd=cwd)


def read_raw(split):
    return [json.loads(line) for line in (REAL_DIR / f"{split}.json").read_text(encoding="utf-8").split("\n")
            if line.strip()]


def table():
    return yaml.safe_load(TABLE.read_text(encoding="utf-8"))


def check_dialogue(conv, types_table, system_prompt=None):
    assert set(conv) == {"id", "domain", "messages", "source"}
    assert re.fullmatch(r"esconv-(train|valid|test)-\d+", conv["id"]), conv["id"]
    assert conv["domain"] in DOMAINS
    messages = conv["messages"]
    if system_prompt is not None:
        assert messages[0] == {"role": "system", "content": system_prompt}
        messages = messages[1:]
    roles = [m["role"] for m in messages]
    assert len(roles) >= 2 and len(roles) % 2 == 0
    assert roles == ["user", "assistant"] * (len(roles) // 2)  # starts with user, alternates, ends with assistant
    for m in conv["messages"]:
        assert set(m) == {"role", "content"}
        assert isinstance(m["content"], str) and m["content"] and m["content"] == m["content"].strip()
    src = conv["source"]
    assert set(src) == {"dataset", "split", "problem_type", "emotion_type", "experience_type", "strategies",
                        "situation"}
    assert src["dataset"] == "esconv" and conv["id"].startswith(f"esconv-{src['split']}-")
    assert conv["domain"] == types_table[src["problem_type"]]
    assert len(src["strategies"]) == roles.count("assistant")
    assert all(isinstance(s, list) and s for s in src["strategies"])


def write_jsonl(path, dialogues):
    """dialogues: dicts with some of the fields; the rest are filled with made-up defaults.
    A "turns" list of (speaker, text) is turned into the dialog; a str entry is written as the raw line."""
    lines = []
    for d in dialogues:
        if isinstance(d, str):
            lines.append(d)
            continue
        full = {"experience_type": "Current Experience", "emotion_type": "anxiety", "problem_type": "job crisis",
                "situation": "A made-up situation.", "survey_score": {}, "seeker_question1": "",
                "seeker_question2": "", "supporter_question1": "", "supporter_question2": ""}
        turns = d.pop("turns", [("usr", "Made-up question?"), ("sys", "Made-up answer.")])
        full["dialog"] = [{"text": text, "speaker": speaker, **({"strategy": "Question"} if speaker == "sys" else {})}
                          for speaker, text in turns]
        full.update(d)
        lines.append(json.dumps(full))
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def make_input(tmp_path, train, valid=(), test=()):
    d = tmp_path / "esconv"
    d.mkdir()
    for split, dialogues in zip(SPLITS, (train, valid, test)):
        write_jsonl(d / f"{split}.json", list(dialogues))
    return d


def convert(tmp_path, input_dir, *args, name="out"):
    out, stats = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.stats.json"
    proc = run("--input", input_dir, "--out", out, "--stats-json", stats, *args)
    assert proc.returncode == 0, proc.stderr
    return proc, read_jsonl(out), json.loads(stats.read_text())


# ---------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    if not REAL_DIR.is_dir():
        pytest.skip(f"{REAL_DIR} is absent (the real ESConv data is not in the repo)")
    tmp = tmp_path_factory.mktemp("real")
    out, stats_path = tmp / "nested" / "esconv.jsonl", tmp / "stats.json"
    proc = run("--out", out, "--stats-json", stats_path, cwd=tmp)  # default input, from outside the repo
    assert proc.returncode == 0, proc.stderr
    return proc, read_jsonl(out), json.loads(stats_path.read_text())


@needs_shared
def test_real_counts_add_up(real_run):
    _, convs, stats = real_run
    raw = {split: read_raw(split) for split in SPLITS}
    assert stats["dialogues_read_per_split"] == {"train": 910, "valid": 195, "test": 195}
    assert stats["dialogues_read"] == 1300
    assert stats["dialogues_written"] == len(convs)
    assert stats["dialogues_written"] + sum(stats["skipped"].values()) == stats["dialogues_read"]
    assert stats["dialogues_written_per_split"] == dict(Counter(c["source"]["split"] for c in convs))

    turns = [d["dialog"] for split in SPLITS for d in raw[split]]
    assert stats["turns_read"] == sum(map(len, turns)) == 38365
    # Independent counts of the dropped turns, straight from the raw speakers (the real data has no empty texts).
    speakers = ["".join("u" if t["speaker"] == "usr" else "s" for t in dialog) for dialog in turns]
    assert stats["turns_dropped"]["empty"] == 0
    assert stats["turns_dropped"]["leading_assistant"] == sum(len(s) - len(s.lstrip("s")) for s in speakers) > 0
    assert stats["turns_dropped"]["trailing_user"] == sum(len(s) - len(s.rstrip("u")) for s in speakers) > 0
    kept = [s.lstrip("s").rstrip("u") for s in speakers]
    assert stats["turns_kept"] == sum(map(len, kept))
    # A run of n same-speaker turns becomes one message: n - 1 merges.
    runs = Counter(k for s in kept for k, _ in groupby(s))
    letters = Counter("".join(kept))
    assert stats["turns_merged"] == {"user": letters["u"] - runs["u"], "assistant": letters["s"] - runs["s"]}
    assert stats["messages_written"] == sum(len(c["messages"]) for c in convs) == stats["turns_kept"] - sum(
        stats["turns_merged"].values())
    assert stats["turns_read"] == (stats["turns_kept"] + sum(stats["turns_dropped"].values())
                                   + stats["turns_in_skipped_dialogues"])


@needs_shared
def test_real_output_schema_and_domains(real_run):
    proc, convs, stats = real_run
    types_table = table()["problem_types"]
    for conv in convs:
        check_dialogue(conv, types_table)
    assert len({c["id"] for c in convs}) == len(convs)

    counts = Counter(c["domain"] for c in convs)
    assert set(counts) == set(DOMAINS)
    assert stats["domains"] == dict(counts)
    report_line = next(line for line in proc.stdout.splitlines() if line.startswith("per domain:"))
    assert {d: int(n) for d, n in re.findall(r"(\w+) (\d+)", report_line)} == dict(counts)

    # Each id leads back to its line; merged messages keep one strategy per source turn
    # (no real text has a newline, so the "\n" joins count the merged turns).
    raw = {split: read_raw(split) for split in SPLITS}
    for conv in convs:
        src = conv["source"]
        record = raw[src["split"]][int(conv["id"].rsplit("-", 1)[1])]
        assert (src["problem_type"], src["emotion_type"], src["situation"]) == (
            record["problem_type"], record["emotion_type"], record["situation"])
        first_user = next(t["text"] for t in record["dialog"] if t["speaker"] == "usr")
        assert conv["messages"][0]["content"].startswith(" ".join(first_user.split()))
        answers = [m["content"] for m in conv["messages"] if m["role"] == "assistant"]
        assert [len(s) for s in src["strategies"]] == [a.count("\n") + 1 for a in answers]

    lengths = stats["lengths"]["messages_per_dialogue"]
    assert lengths["max"] == max(len(c["messages"]) for c in convs)
    assert lengths["mean"] == round(stats["messages_written"] / len(convs), 1)
    assert "messages per dialogue:" in proc.stdout and "chars per dialogue:" in proc.stdout


@needs_shared
def test_every_real_problem_type_is_in_the_table():
    t = table()
    assert t["domains"] == DOMAINS
    assert set(t["problem_types"].values()) == set(DOMAINS)
    data_types = {d["problem_type"] for split in SPLITS for d in read_raw(split)}
    assert len(data_types) == 13
    assert data_types - set(t["problem_types"]) == set()


@needs_shared
def test_real_train_split_only(tmp_path):
    proc, convs, stats = convert(tmp_path, REAL_DIR, "--splits", "train")
    assert stats["dialogues_read"] == 910 and stats["splits"] == ["train"]
    assert {c["source"]["split"] for c in convs} == {"train"}
    assert len(convs) == stats["dialogues_written"]


# ---------------------------------------------------------------- made-up data

def test_same_speaker_turns_are_merged(tmp_path):
    input_dir = make_input(tmp_path, [{"turns": [
        ("usr", "Made-up part one."), ("usr", "  Made-up   part two. "),
        ("sys", "Answer one."), ("sys", "Answer two."), ("sys", "Answer three."),
        ("usr", "Thanks."), ("sys", "Bye.")]}])
    proc, convs, stats = convert(tmp_path, input_dir)
    (conv,) = convs
    check_dialogue(conv, table()["problem_types"])
    assert conv["id"] == "esconv-train-0" and conv["domain"] == table()["problem_types"]["job crisis"]
    assert conv["messages"] == [
        {"role": "user", "content": "Made-up part one.\nMade-up part two."},
        {"role": "assistant", "content": "Answer one.\nAnswer two.\nAnswer three."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "Bye."},
    ]
    assert conv["source"]["strategies"] == [["Question"] * 3, ["Question"]]
    assert stats["turns_merged"] == {"user": 1, "assistant": 2}
    assert stats["messages_written"] == 4 and stats["turns_kept"] == 7
    assert "turns merged:          3  (user 1, assistant 2)" in proc.stdout


def test_leading_trailing_and_empty_turns_are_dropped(tmp_path):
    input_dir = make_input(tmp_path, [
        {"turns": [("sys", "Hello, made-up greeting."), ("sys", "Anyone there?"), ("usr", "Hi."),
                   ("sys", "   "), ("sys", "How can I help?"), ("usr", "Made-up ending."), ("usr", "Bye.")]},
    ], valid=[{}])
    proc, convs, stats = convert(tmp_path, input_dir)
    assert [c["id"] for c in convs] == ["esconv-train-0", "esconv-valid-0"]
    assert convs[0]["messages"] == [{"role": "user", "content": "Hi."},
                                    {"role": "assistant", "content": "How can I help?"}]
    assert convs[0]["source"]["strategies"] == [["Question"]]
    assert stats["turns_dropped"] == {"empty": 1, "leading_assistant": 2, "trailing_user": 2}
    assert stats["turns_read"] == 9 and stats["turns_kept"] == 4
    assert "turns dropped:         empty 1, leading_assistant 2, trailing_user 2" in proc.stdout


def test_dialogue_without_assistant_turn_is_skipped(tmp_path):
    input_dir = make_input(tmp_path, [
        {"turns": [("usr", "Made-up question?"), ("usr", "Still there?")]},
        {"turns": [("sys", "Only the supporter talks.")]},
        {"turns": []},
        {},
    ])
    proc, convs, stats = convert(tmp_path, input_dir)
    assert [c["id"] for c in convs] == ["esconv-train-3"]
    assert stats["dialogues_read"] == 4 and stats["dialogues_written"] == 1
    assert stats["skipped"] == {"unknown_type": 0, "no_assistant_turn": 3}
    assert stats["turns_in_skipped_dialogues"] == 3
    assert stats["turns_dropped"] == {"empty": 0, "leading_assistant": 0, "trailing_user": 0}
    assert "skipped dialogues:     unknown_type 0, no_assistant_turn 3  (3 turns)" in proc.stdout


def test_unknown_problem_type_errors_by_default(tmp_path):
    input_dir = make_input(tmp_path, [{}, {"problem_type": "made-up problem"}])
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    proc = run("--input", input_dir, "--out", out)
    assert proc.returncode == 2
    message = proc.stderr.strip()
    assert "\n" not in message
    assert "'made-up problem'" in message and "line 2" in message and "train.json" in message
    assert "esconv_domains.yaml" in message and "--unknown-type" in message
    assert out.read_text() == "old\n"  # nothing is half-written on error


def test_unknown_problem_type_skip_or_map(tmp_path):
    input_dir = make_input(tmp_path, [{}, {"problem_type": "made-up problem"}])
    proc, convs, stats = convert(tmp_path, input_dir, "--unknown-type=skip", name="a")
    assert [c["id"] for c in convs] == ["esconv-train-0"]
    assert stats["skipped"]["unknown_type"] == 1 and stats["unknown_types"] == {"made-up problem": 1}
    assert stats["turns_in_skipped_dialogues"] == 2
    assert "unknown problem types (skip): {'made-up problem': 1}" in proc.stdout

    proc, convs, stats = convert(tmp_path, input_dir, "--unknown-type=bias_detection", name="b")
    assert convs[1]["domain"] == "bias_detection" and convs[1]["source"]["problem_type"] == "made-up problem"
    assert stats["skipped"]["unknown_type"] == 0 and stats["unknown_types"] == {"made-up problem": 1}

    proc = run("--input", input_dir, "--out", tmp_path / "c.jsonl", "--unknown-type=not-a-domain")
    assert proc.returncode == 2 and "not-a-domain" in proc.stderr


def test_system_prompt_comes_first(tmp_path):
    input_dir = make_input(tmp_path, [{}])
    _, convs, _ = convert(tmp_path, input_dir, "--system-prompt", "You are a made-up helper.", name="a")
    check_dialogue(convs[0], table()["problem_types"], system_prompt="You are a made-up helper.")
    assert [m["role"] for m in convs[0]["messages"]] == ["system", "user", "assistant"]

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Prompt from a file.\n")
    _, convs, stats = convert(tmp_path, input_dir, "--system-prompt-file", prompt_file, name="b")
    assert convs[0]["messages"][0] == {"role": "system", "content": "Prompt from a file."}
    assert stats["lengths"]["messages_per_dialogue"]["max"] == 2  # lengths leave the system prompt out


def test_bad_input_exits_2_with_one_line(tmp_path):
    input_dir = make_input(tmp_path, [{}], valid=[{}, {}, '{"problem_type": "job crisis", "dialog": [}'])
    out = tmp_path / "out.jsonl"
    proc = run("--input", input_dir, "--out", out)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "valid.json line 3" in proc.stderr and "not valid JSON" in proc.stderr
    assert not out.exists()

    (input_dir / "valid.json").write_text('{"problem_type": "job crisis", "dialog": [{"text": "Hi", "speaker": "x"}]}\n')
    proc = run("--input", input_dir, "--out", out)
    assert proc.returncode == 2 and "valid.json line 1" in proc.stderr and "'x'" in proc.stderr

    (input_dir / "test.json").unlink()
    proc = run("--input", input_dir, "--out", out)
    assert proc.returncode == 2 and "test.json" in proc.stderr and proc.stderr.count("\n") == 1
    assert run("--input", input_dir, "--out", out, "--splits", "train").returncode == 0  # test.json is not needed

    proc = run("--input", tmp_path / "missing", "--out", out)
    assert proc.returncode == 2 and "missing" in proc.stderr and proc.stderr.count("\n") == 1
