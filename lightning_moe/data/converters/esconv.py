"""Convert ESConv (Emotional Support Conversation, Liu et al. 2021) into the project chat format.

Reads the JSON Lines split files (train.json, valid.json, test.json: one dialogue per line) and writes
one JSON line per dialogue. The domain comes from the problem-type table
(recipes/therapeutic/esconv_domains.yaml), so no problem types are hard-coded here.

Speakers: "usr" (the help-seeker) -> user, "sys" (the supporter) -> assistant. Per dialogue, in this order:
  1. turns whose text is empty after whitespace cleanup are dropped (counted);
  2. supporter turns before the first seeker turn are dropped (counted): there is no user message for
     them to answer, and a chat record must start with a user turn;
  3. seeker turns after the last supporter turn are dropped (counted): nothing answers them, so they
     carry no training signal;
  4. consecutive turns by the same speaker (frequent in ESConv: people send a message in pieces) are
     merged into one message, joined with "\\n" (counted);
  5. a dialogue left with no supporter turn is skipped (counted).
The turn counters cover the written dialogues only; the turns of skipped dialogues are counted apart,
so that turns_read = turns_kept + dropped turns + turns_in_skipped_dialogues.

source.strategies has one entry per assistant message: the list of the supporter strategies of the
turns merged into it, in order (one item per source turn, so repeats are kept).

The seeker's "situation" is kept in source only. It is never put into the prompt: it is a survey answer
the seeker wrote before the chat, which the supporter did not see, so a model trained with it would
learn to rely on context it will not have. Use a system prompt (--system-prompt) for instructions.

FailedESConv.json is not converted. Those are the 196 conversations the dataset authors rejected as
low quality (for example, seeker empathy and relevance ratings of 1): training on them would teach
poor support. The file also has another schema (a JSON array, "speaker"/"listener", "content",
annotation.strategy).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from lightning_moe.data.converters.common import ConversionError, clean_text, load_domain_table, write_text_atomic

SPLITS = ("train", "valid", "test")
ROLES = {"usr": "user", "sys": "assistant"}
SKIP_REASONS = ("unknown_type", "no_assistant_turn")
DROP_REASONS = ("empty", "leading_assistant", "trailing_user")

__all__ = ["ConversionError", "SPLITS", "convert_esconv", "load_problem_type_table", "write_text_atomic"]


def load_problem_type_table(path) -> tuple[list[str], dict[str, str]]:
    """Return (domains, problem_type -> domain) from the YAML table, after validating it."""
    return load_domain_table(path, "problem_types")


def _parse_line(line: str, where: str) -> dict:
    """One JSON line -> the dialogue record, checked enough that the conversion cannot crash on it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ConversionError(f"{where}: expected a JSON object (one dialogue), got {type(record).__name__}")
    if not isinstance(record.get("problem_type"), str):
        raise ConversionError(f"{where}: 'problem_type' is missing or not a string")
    dialog = record.get("dialog")
    if not isinstance(dialog, list):
        raise ConversionError(f"{where}: 'dialog' is missing or not a list")
    for i, turn in enumerate(dialog):
        if not isinstance(turn, dict):
            raise ConversionError(f"{where}: dialog turn {i} is not an object")
        if turn.get("speaker") not in ROLES:
            raise ConversionError(f"{where}: dialog turn {i} has speaker {turn.get('speaker')!r} (expected 'usr' or 'sys')")
        if not isinstance(turn.get("text"), str):
            raise ConversionError(f"{where}: dialog turn {i} has no 'text' string")
        if turn.get("strategy") is not None and not isinstance(turn["strategy"], str):
            raise ConversionError(f"{where}: dialog turn {i} has a 'strategy' that is not a string")
    return record


def _lines(path: Path):
    """(line number, line) for each line of a UTF-8 text file; a file that is not UTF-8 is bad input."""
    try:
        # split("\n"), not splitlines(): JSON strings may hold raw U+2028 or U+0085, which are not line ends here.
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{path}: not UTF-8 text: {exc}") from None
    return enumerate(lines, start=1)


def _build_messages(dialog: list[dict]) -> tuple[list[dict], list[list], Counter]:
    """dialog turns -> (user/assistant messages, strategies per assistant message, counters)."""
    counts = Counter()
    turns = []
    for turn in dialog:
        text = clean_text(turn["text"])
        if not text:
            counts["empty"] += 1
            continue
        turns.append((ROLES[turn["speaker"]], text, turn.get("strategy")))
    first_user = next((i for i, t in enumerate(turns) if t[0] == "user"), len(turns))
    last_assistant = max((i for i, t in enumerate(turns) if t[0] == "assistant"), default=-1)
    counts["leading_assistant"] = first_user  # every turn before the first user turn is an assistant turn
    if last_assistant < first_user:  # no assistant turn answers a user turn
        return [], [], counts
    counts["trailing_user"] = len(turns) - 1 - last_assistant
    turns = turns[first_user:last_assistant + 1]
    counts["kept"] = len(turns)

    messages, strategies = [], []
    for role, text, strategy in turns:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
            counts[f"merged_{role}"] += 1
        else:
            messages.append({"role": role, "content": text})
            if role == "assistant":
                strategies.append([])
        if role == "assistant":
            strategies[-1].append(strategy)
    return messages, strategies, counts


def _summary(values: list[int]) -> dict:
    if not values:
        return {"mean": 0, "median": 0, "max": 0}
    return {"mean": round(statistics.mean(values), 1), "median": statistics.median(values), "max": max(values)}


def convert_esconv(input_dir, out_path, table_path, splits=SPLITS, system_prompt=None, unknown_type="error") -> dict:
    """Convert the ESConv split files in input_dir to one chat JSONL at out_path and return the stats.

    splits: which of train/valid/test to read, in this order into the one output file.
    unknown_type: "error" (raise), "skip" (drop the dialogue, counted) or a domain name from the
    table (map the dialogue to it, counted).
    """
    domains, table = load_problem_type_table(table_path)
    if unknown_type not in ("error", "skip", *domains):
        raise ConversionError(
            f"unknown_type must be 'error', 'skip' or one of the domains {domains}, got {unknown_type!r}")
    splits = list(dict.fromkeys(splits))  # a split named twice would write every dialogue twice
    bad_splits = [s for s in splits if s not in SPLITS]
    if not splits or bad_splits:
        raise ConversionError(f"splits must be some of {list(SPLITS)}, got {splits}")
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ConversionError(f"ESConv directory not found: {input_dir}")
    files = {split: input_dir / f"{split}.json" for split in splits}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ConversionError(f"ESConv split file(s) not found: {', '.join(missing)}")

    records = []
    read_per_split, written_per_split = Counter(), Counter()
    skipped = Counter({reason: 0 for reason in SKIP_REASONS})
    dropped = Counter({reason: 0 for reason in DROP_REASONS})
    unknown_types = Counter()
    merged = Counter({"user": 0, "assistant": 0})
    turns_read = turns_kept = turns_in_skipped = 0

    for split, path in files.items():
        for lineno, line in _lines(path):
            if not line.strip():
                continue
            record = _parse_line(line, f"{path} line {lineno}")
            read_per_split[split] += 1
            turns_read += len(record["dialog"])
            problem_type = record["problem_type"].strip()
            domain = table.get(problem_type)
            # Checked before the other skips, so that a gap in the table is never hidden.
            if domain is None:
                if unknown_type == "error":
                    raise ConversionError(
                        f"unknown problem type {problem_type!r} at line {lineno} of {path}; "
                        f"add it to {table_path} or convert with --unknown-type=skip|DOMAIN")
                unknown_types[problem_type] += 1
                if unknown_type == "skip":
                    skipped["unknown_type"] += 1
                    turns_in_skipped += len(record["dialog"])
                    continue
                domain = unknown_type

            messages, strategies, counts = _build_messages(record["dialog"])
            if not messages:
                skipped["no_assistant_turn"] += 1
                turns_in_skipped += len(record["dialog"])
                continue
            for reason in DROP_REASONS:
                dropped[reason] += counts[reason]
            for role in merged:
                merged[role] += counts[f"merged_{role}"]
            turns_kept += counts["kept"]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            records.append({
                # The index is the dialogue's 0-based line in <split>.json, so an id leads back to its line.
                "id": f"esconv-{split}-{lineno - 1}",
                "domain": domain,
                "messages": messages,
                "source": {
                    "dataset": "esconv",
                    "split": split,
                    "problem_type": problem_type,
                    "emotion_type": record.get("emotion_type"),
                    "experience_type": record.get("experience_type"),
                    "strategies": strategies,
                    "situation": record.get("situation"),
                },
            })
            written_per_split[split] += 1

    # Everything is built in memory first (1,300 dialogues, ~6 MB), so a bad line leaves no output behind.
    write_text_atomic(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    by_domain = Counter(r["domain"] for r in records)
    chat = [[m for m in r["messages"] if m["role"] != "system"] for r in records]
    return {
        "input": str(input_dir),
        "out": str(out_path),
        "table": str(table_path),
        "splits": splits,
        "dialogues_read": sum(read_per_split.values()),
        "dialogues_read_per_split": {s: read_per_split[s] for s in splits},
        "dialogues_written": len(records),
        "dialogues_written_per_split": {s: written_per_split[s] for s in splits},
        "domains": {d: by_domain[d] for d in domains},
        "turns_read": turns_read,
        "turns_kept": turns_kept,
        "messages_written": sum(len(c) for c in chat),  # user + assistant, after merging
        "turns_merged": dict(merged),
        "turns_dropped": dict(dropped),
        "turns_in_skipped_dialogues": turns_in_skipped,
        "skipped": dict(skipped),
        "unknown_types": dict(unknown_types),
        "unknown_type_policy": unknown_type,
        "system_prompt": bool(system_prompt),
        # Token-free lengths of the written dialogues, user + assistant messages only (no system prompt).
        "lengths": {
            "messages_per_dialogue": _summary([len(c) for c in chat]),
            "chars_per_dialogue": _summary([sum(len(m["content"]) for m in c) for c in chat]),
        },
    }
