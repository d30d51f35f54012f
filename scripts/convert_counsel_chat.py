#!/usr/bin/env python
"""Convert counsel-chat into the project's chat JSONL (logic: lightning_moe/converters/counsel_chat.py).

Example:
    python scripts/convert_counsel_chat.py --stats-json data/generated/counsel_chat.stats.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

try:
    from lightning_moe.converters.counsel_chat import ConversionError, convert_counsel_chat, write_text_atomic
except ModuleNotFoundError as exc:
    # Run from a fresh clone without installing: put the repo root on the path.
    if not (exc.name or "").startswith("lightning_moe"):
        raise
    sys.path.insert(0, str(REPO))
    from lightning_moe.converters.counsel_chat import ConversionError, convert_counsel_chat, write_text_atomic

DEFAULT_CSV = REPO.parent / "shared" / "datasets" / "counsel_chat" / "20200325_counsel_chat.csv"
DEFAULT_OUT = REPO / "data" / "generated" / "counsel_chat.jsonl"
DEFAULT_TABLE = REPO / "recipes" / "therapeutic" / "topic_domains.yaml"


def format_report(stats: dict) -> str:
    domains = ", ".join(f"{d} {n}" for d, n in stats["domains"].items())
    skipped = ", ".join(f"{reason} {n}" for reason, n in stats["skipped"].items())
    lines = [
        f"rows read:             {stats['rows_read']}  ({stats['csv']})",
        f"conversations written: {stats['conversations_written']}  -> {stats['out']}",
        f"per domain:            {domains}",
        f"merged duplicates:     {stats['merged_duplicates']}  ({stats['merged_across_splits']} across splits)",
        f"skipped:               {skipped}",
    ]
    if stats["unknown_topics"]:
        lines.append(f"unknown topics ({stats['unknown_topic_policy']}): {stats['unknown_topics']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="counsel-chat CSV (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSONL (default: %(default)s)")
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="topic -> domain YAML (default: %(default)s)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", help="add this system turn to every conversation")
    prompt.add_argument("--system-prompt-file", type=Path, help="read the system turn from this file")
    parser.add_argument("--unknown-topic", default="error", metavar="error|skip|DOMAIN",
                        help="topic missing from the table: fail (default), skip the row, or map it to DOMAIN")
    parser.add_argument("--stats-json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)

    try:
        system_prompt = args.system_prompt
        if args.system_prompt_file:
            system_prompt = args.system_prompt_file.read_text(encoding="utf-8").strip()
        stats = convert_counsel_chat(args.csv, args.out, args.table, system_prompt, args.unknown_topic)
        if args.stats_json:
            write_text_atomic(args.stats_json, json.dumps(stats, indent=2) + "\n")
    except (ConversionError, OSError) as exc:
        print(f"convert_counsel_chat: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
