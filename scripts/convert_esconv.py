#!/usr/bin/env python
"""Convert ESConv into the project's chat JSONL (logic: lightning_moe/data/converters/esconv.py).

ESConv is CC BY-NC 4.0 (non-commercial use only): it is read from ../shared/datasets/esconv and
never copied into the repository; the output under data/generated/ is derived data under the same terms.

Example:
    python scripts/convert_esconv.py --stats-json data/generated/esconv.stats.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from lightning_moe.data.converters.common import add_common_arguments, run_cli
from lightning_moe.data.converters.esconv import SPLITS, convert_esconv

DEFAULT_INPUT = REPO.parent / "shared" / "datasets" / "esconv"
DEFAULT_OUT = REPO / "data" / "generated" / "esconv.jsonl"
DEFAULT_TABLE = REPO / "recipes" / "therapeutic" / "esconv_domains.yaml"


def format_report(stats: dict) -> str:
    def pairs(mapping):
        return ", ".join(f"{k} {n}" for k, n in mapping.items())

    lengths = stats["lengths"]
    msgs, chars = lengths["messages_per_dialogue"], lengths["chars_per_dialogue"]
    lines = [
        f"dialogues read:        {stats['dialogues_read']}  ({pairs(stats['dialogues_read_per_split'])}; {stats['input']})",
        f"dialogues written:     {stats['dialogues_written']}  -> {stats['out']}",
        f"per domain:            {pairs(stats['domains'])}",
        f"per split written:     {pairs(stats['dialogues_written_per_split'])}",
        f"turns read:            {stats['turns_read']}  (kept {stats['turns_kept']} -> "
        f"{stats['messages_written']} user/assistant messages)",
        f"turns merged:          {sum(stats['turns_merged'].values())}  ({pairs(stats['turns_merged'])})",
        f"turns dropped:         {pairs(stats['turns_dropped'])}",
        f"skipped dialogues:     {pairs(stats['skipped'])}  ({stats['turns_in_skipped_dialogues']} turns)",
        f"messages per dialogue: mean {msgs['mean']}, median {msgs['median']}, max {msgs['max']}  (no system prompt)",
        f"chars per dialogue:    mean {chars['mean']}, median {chars['median']}, max {chars['max']}  (no system prompt)",
    ]
    if stats["unknown_types"]:
        lines.append(f"unknown problem types ({stats['unknown_type_policy']}): {stats['unknown_types']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT,
                        help="directory with train.json/valid.json/test.json (default: %(default)s)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                        help="splits to convert, all into the one output file (default: all)")
    add_common_arguments(parser, DEFAULT_OUT, DEFAULT_TABLE, "problem_type -> domain", "dialogue")
    parser.add_argument("--unknown-type", default="error", metavar="error|skip|DOMAIN",
                        help="problem type missing from the table: fail (default), skip the dialogue, or map it to DOMAIN")
    args = parser.parse_args(argv)
    return run_cli("convert_esconv", args, lambda prompt: convert_esconv(
        args.input, args.out, args.table, args.splits, prompt, args.unknown_type), format_report)


if __name__ == "__main__":
    sys.exit(main())
