"""An export folder that appears whole or not at all, and never over an existing one.

Written into a temporary sibling (`.NAME.tmp<pid>`) and renamed at the end; on any failure the temporary folder is
removed. Every format also gets the tokenizer with its chat template, and a generation_config.json whose EOS ids end
an assistant turn (the template's terminator: the most reported export failure is a model that never stops).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers import GenerationConfig

from lightning_moe.config.schema import ConfigError
from lightning_moe.data.chat import end_of_turn_ids


def refuse_existing(out: Path) -> None:
    if out.exists():
        raise ConfigError(f"out: {out} already exists; exports never replace a folder: give a new out=DIR")


class ExportFolder:
    def __init__(self, out: Path):
        refuse_existing(out)
        self.out = out
        self.tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")

    def __enter__(self) -> Path:
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        refuse_existing(self.out)  # nobody took the name meanwhile
        os.replace(self.tmp, self.out)


def write_tokenizer_and_stops(tokenizer, folder: Path) -> list[int]:
    """The tokenizer (with its chat template) and generation_config.json with the end-of-turn EOS ids."""
    tokenizer.save_pretrained(folder)
    stops = end_of_turn_ids(tokenizer)
    GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
    return stops


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
