"""What every dataset converter shares: its error type, text cleaning, atomic writes, the source -> domain
table, and the command-line frame of scripts/convert_*.py (common options, error handling, the report)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable

import yaml


class ConversionError(ValueError):
    """Bad input. The CLI prints it on one line and exits with status 2."""


def clean_text(text: str | None) -> str:
    # Scraped text has non-breaking spaces and indented continuation lines.
    # Collapse spaces inside each line but keep line and paragraph breaks.
    lines = [" ".join(line.split()) for line in (text or "").splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def write_text_atomic(path, text: str) -> None:
    """Write via a temp file in the same directory, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600, which would be a surprise for a data file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_domain_table(path, key: str) -> tuple[list[str], dict[str, str]]:
    """Return (domains, source label -> domain) from a YAML table with 'domains' and `key` (e.g. 'topics':
    topic -> domain), after validating it."""
    path = Path(path)
    item = key.removesuffix("s")  # topics -> topic, problem_types -> problem_type
    what = f"{item.replace('_', '-')} table"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{what} not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConversionError(f"{what} {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConversionError(f"{what} {path} must be a mapping with 'domains' and '{key}'")
    domains, table = data.get("domains"), data.get(key)
    if not isinstance(domains, list) or not domains or not all(isinstance(d, str) for d in domains):
        raise ConversionError(f"{what} {path}: 'domains' must be a non-empty list of names")
    if not isinstance(table, dict) or not table:
        raise ConversionError(f"{what} {path}: '{key}' must be a non-empty mapping {item} -> domain")
    bad = {t: d for t, d in table.items() if d not in domains}
    if bad:
        raise ConversionError(f"{what} {path}: {key.replace('_', ' ')} mapped to undeclared domains: {bad}")
    return list(domains), {str(t): d for t, d in table.items()}


# ---- the scripts' command line ---------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser, out: Path, table: Path, table_help: str,
                         unit: str) -> None:
    """--out, --table, --system-prompt / --system-prompt-file and --stats-json."""
    parser.add_argument("--out", type=Path, default=out, help="output JSONL (default: %(default)s)")
    parser.add_argument("--table", type=Path, default=table, help=f"{table_help} YAML (default: %(default)s)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", help=f"add this system turn to every {unit}")
    prompt.add_argument("--system-prompt-file", type=Path, help="read the system turn from this file")
    parser.add_argument("--stats-json", type=Path, help="also write the report as JSON here")


def run_cli(name: str, args: argparse.Namespace, convert: Callable[[str | None], dict],
            report: Callable[[dict], str]) -> int:
    """Run `convert(system_prompt)`, write --stats-json, print the report; bad input: one line, exit 2."""
    try:
        system_prompt = args.system_prompt
        if args.system_prompt_file:
            system_prompt = args.system_prompt_file.read_text(encoding="utf-8").strip()
        stats = convert(system_prompt)
        if args.stats_json:
            write_text_atomic(args.stats_json, json.dumps(stats, indent=2) + "\n")
    except (ConversionError, OSError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    print(report(stats))
    return 0
