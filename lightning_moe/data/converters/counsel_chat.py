"""Convert counsel-chat (20200325_counsel_chat.csv) into the project chat format.

Writes one JSON line per unique conversation (question + one therapist answer).
The domain comes from the topic table (recipes/therapeutic/topic_domains.yaml),
so no topic names are hard-coded here.

Duplicates are found by content (cleaned question + answer), not by questionID.
In the 2020-03-25 file, questionID is not a unique key: some IDs are reused for
different questions, and a question filed under a second topic gets a new ID
(for example "How does counseling end?" is ID 853 under professional-ethics and
ID 14 under counseling-fundamentals). A content key merges the real duplicates
and keeps questions that only share an ID apart.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

from lightning_moe.data.converters.common import ConversionError, clean_text, load_domain_table, write_text_atomic

__all__ = ["ConversionError", "convert_counsel_chat", "load_topic_table", "write_text_atomic"]

REQUIRED_COLUMNS = (
    "questionID", "questionTitle", "questionText", "questionLink",
    "topic", "answerText", "upvotes", "split",
)
SKIP_REASONS = ("unknown_topic", "empty_answer", "empty_question")


def load_topic_table(path) -> tuple[list[str], dict[str, str]]:
    """Return (domains, topic -> domain) from the YAML table, after validating it."""
    return load_domain_table(path, "topics")


def convert_counsel_chat(csv_path, out_path, table_path, system_prompt=None, unknown_topic="error") -> dict:
    """Convert the CSV to chat JSONL at out_path and return the stats.

    unknown_topic: "error" (raise), "skip" (drop the row, counted) or a domain
    name from the table (map the row to it, counted).
    """
    domains, table = load_topic_table(table_path)
    if unknown_topic not in ("error", "skip", *domains):
        raise ConversionError(
            f"unknown_topic must be 'error', 'skip' or one of the domains {domains}, got {unknown_topic!r}")
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ConversionError(f"CSV not found: {csv_path}")
    # The sibling counsel-chat scrape has answers of up to 224k characters,
    # above the csv module's default limit of 128k.
    csv.field_size_limit(2**31 - 1)

    conversations: dict[tuple[str, str], dict] = {}  # content key -> record; keeps file order
    per_question = Counter()  # the <n> in the id, counted per questionID
    skipped = Counter({reason: 0 for reason in SKIP_REASONS})
    unknown_topics = Counter()
    merged = merged_across_splits = rows_read = 0

    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConversionError(f"{csv_path}: missing required column(s): {', '.join(missing)}")
        last_line = reader.line_num
        for rows_read, row in enumerate(reader, start=1):
            # Fields contain newlines, so a row's first line is one past the previous row's last.
            first_line, last_line = last_line + 1, reader.line_num
            topic = (row["topic"] or "").strip()
            domain = table.get(topic)
            # Checked before the empty-field checks, so that a gap in the table is never hidden.
            if domain is None:
                if unknown_topic == "error":
                    raise ConversionError(
                        f"unknown topic {topic!r} at CSV row {rows_read} (line {first_line}) of {csv_path}; "
                        f"add it to {table_path} or convert with --unknown-topic=skip|DOMAIN")
                unknown_topics[topic] += 1
                if unknown_topic == "skip":
                    skipped["unknown_topic"] += 1
                    continue
                domain = unknown_topic

            title, text, answer = (clean_text(row[c]) for c in ("questionTitle", "questionText", "answerText"))
            if not answer:
                skipped["empty_answer"] += 1
                continue
            if not (title or text):
                skipped["empty_question"] += 1
                continue
            user = "\n\n".join(part for part in (title, text) if part)

            previous = conversations.get((user, answer))
            if previous is not None:
                merged += 1
                if topic not in previous["source"]["topics"]:
                    previous["source"]["topics"].append(topic)
                # The same conversation under two splits leaks across train/val/test; keeping
                # only the first copy fixes that, and the count shows how often it happened.
                if (row["split"] or "").strip() != previous["source"]["split"]:
                    merged_across_splits += 1
                continue

            qid = (row["questionID"] or "").strip()
            upvotes = (row["upvotes"] or "").strip()
            try:
                upvotes = int(float(upvotes)) if upvotes else 0
            except ValueError:
                raise ConversionError(
                    f"bad upvotes {upvotes!r} at CSV row {rows_read} (line {first_line}) of {csv_path}") from None
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            conversations[(user, answer)] = {
                "id": f"counsel_chat-{qid}-{per_question[qid]}",
                "domain": domain,
                "messages": messages,
                "source": {
                    "dataset": "counsel_chat",
                    "question_id": int(qid) if qid.isdigit() else qid,
                    "topic": topic,
                    "topics": [topic],
                    "split": (row["split"] or "").strip(),
                    "upvotes": upvotes,
                    "url": (row["questionLink"] or "").strip(),
                },
            }
            per_question[qid] += 1

    # Everything is built in memory first (about 2k rows), so a bad row leaves no output behind.
    write_text_atomic(out_path, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations.values()))
    by_domain = Counter(c["domain"] for c in conversations.values())
    return {
        "csv": str(csv_path),
        "out": str(out_path),
        "table": str(table_path),
        "rows_read": rows_read,
        "conversations_written": len(conversations),
        "domains": {d: by_domain[d] for d in domains},
        "merged_duplicates": merged,
        "merged_across_splits": merged_across_splits,
        "skipped": dict(skipped),
        "unknown_topics": dict(unknown_topics),
        "unknown_topic_policy": unknown_topic,
    }
