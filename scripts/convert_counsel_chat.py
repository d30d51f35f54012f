#!/usr/bin/env python
"""Convert counsel-chat into the project's chat JSONL (logic: lightning_moe/data/converters/counsel_chat.py).

Example:
    python scripts/convert_counsel_chat.py --stats-json data/generated/counsel_chat.stats.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from lightning_moe.data.converters.common import add_common_arguments, run_cli
from lightning_moe.data.converters.counsel_chat import convert_counsel_chat

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
    add_common_arguments(parser, DEFAULT_OUT, DEFAULT_TABLE, "topic -> domain", "conversation")
    parser.add_argument("--unknown-topic", default="error", metavar="error|skip|DOMAIN",
                        help="topic missing from the table: fail (default), skip the row, or map it to DOMAIN")
    args = parser.parse_args(argv)
    return run_cli("convert_counsel_chat", args, lambda prompt: convert_counsel_chat(
        args.csv, args.out, args.table, prompt, args.unknown_topic), format_report)


if __name__ == "__main__":
    sys.exit(main())
