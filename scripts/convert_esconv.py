#!/usr/bin/env python
"""Convert ESConv into the project's chat JSONL (logic: lightning_moe/converters/esconv.py).

ESConv is CC BY-NC 4.0 (non-commercial use only): it is read from ../shared/datasets/esconv and
never copied into the repository; the output under data/generated/ is derived data under the same terms.

Example:
    python scripts/convert_esconv.py --stats-json data/generated/esconv.stats.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

try:
    from lightning_moe.converters.esconv import SPLITS, ConversionError, convert_esconv, write_text_atomic
except ModuleNotFoundError as exc:
    # Run from a fresh clone without installing: put the repo root on the path.
    if not (exc.name or "").startswith("lightning_moe"):
        raise
    sys.path.insert(0, str(REPO))
    from lightning_moe.converters.esconv import SPLITS, ConversionError, convert_esconv, write_text_atomic

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
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSONL (default: %(default)s)")
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE,
                        help="problem_type -> domain YAML (default: %(default)s)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", help="add this system turn to every dialogue")
    prompt.add_argument("--system-prompt-file", type=Path, help="read the system turn from this file")
    parser.add_argument("--unknown-type", default="error", metavar="error|skip|DOMAIN",
                        help="problem type missing from the table: fail (default), skip the dialogue, or map it to DOMAIN")
    parser.add_argument("--stats-json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)

    try:
        system_prompt = args.system_prompt
        if args.system_prompt_file:
            system_prompt = args.system_prompt_file.read_text(encoding="utf-8").strip()
        stats = convert_esconv(args.input, args.out, args.table, args.splits, system_prompt, args.unknown_type)
        if args.stats_json:
            write_text_atomic(args.stats_json, json.dumps(stats, indent=2) + "\n")
    except (ConversionError, OSError) as exc:
        print(f"convert_esconv: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
