"""Read conversation files with `datasets` and normalise them to one schema.

Accepted, per record (JSON array or JSON Lines):
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "domain": str (optional)}
  {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...], "domain": ...}   (ShareGPT)
Output columns: messages (role/content), domain_id (index into the domain list, -1 if unlabelled).
A record that cannot be used raises DataError naming the file, the row and the problem: nothing is dropped
silently.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from lightning_moe.paths import resolve_path

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """A data file or row that cannot be used; the message says which and why."""


def _normalise(record: dict, where: str, domains: list[str]) -> dict:
    if record.get("messages") is not None:
        turns = [(m.get("role"), m.get("content")) for m in record["messages"]]
        role_map = {r: r for r in ROLES}
    elif record.get("conversations") is not None:
        turns = [(m.get("from"), m.get("value")) for m in record["conversations"]]
        role_map = SHAREGPT_ROLES
    else:
        raise DataError(f"{where}: no 'messages' (or ShareGPT 'conversations') list")
    if not turns:
        raise DataError(f"{where}: the conversation is empty")
    messages = []
    for i, (role, content) in enumerate(turns):
        if role not in role_map:
            raise DataError(f"{where}: turn {i} has unknown role {role!r} (allowed: {', '.join(role_map)})")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: turn {i} ({role}) has empty content")
        if role_map[role] == "system" and i != 0:
            raise DataError(f"{where}: turn {i} is a system turn; only the first turn may be")
        messages.append({"role": role_map[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so there is nothing to train on")
    domain = record.get("domain")
    if domain is None or domain == "":
        domain_id = -1
    elif domain in domains:
        domain_id = domains.index(domain)
    else:
        raise DataError(f"{where}: unknown domain {domain!r} (known: {', '.join(domains) or 'none configured'})")
    return {"messages": messages, "domain_id": domain_id}


def read_conversations(path: str | Path, domains: list[str]) -> datasets.Dataset:
    """One file -> Dataset(messages, domain_id)."""
    file = resolve_path(path)
    if not file.is_file():
        hint = " (files in data/generated/ are written by scripts/convert_*.py)" if "generated" in file.parts else ""
        raise DataError(f"{path}: file not found (looked at {file}){hint}")
    try:
        raw = datasets.load_dataset("json", data_files=str(file), split="train")
    except Exception as e:  # datasets wraps JSON errors in several exception types
        raise DataError(f"{file}: cannot be read as JSON or JSON Lines: {e}") from e
    if "messages" not in raw.column_names and "conversations" not in raw.column_names:
        raise DataError(f"{file}: has neither a 'messages' nor a 'conversations' field (columns: {raw.column_names})")
    return raw.map(
        lambda rec, i: _normalise(rec, f"{file.name}: row {i + 1}", domains),
        with_indices=True,
        remove_columns=raw.column_names,
        desc=f"reading {file.name}",
    )


def read_many(paths: list[str], domains: list[str]) -> datasets.Dataset:
    return datasets.concatenate_datasets([read_conversations(p, domains) for p in paths])
