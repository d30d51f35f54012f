"""An export folder that appears whole or not at all, and never over an existing one.

Written into a temporary sibling (`.NAME.tmp<pid>`) and renamed at the end; on any failure (losing the name to a
parallel export included) the temporary folder is removed, and one left by a killed export (its process is gone)
is removed by the next export to the same place. Every file gets the mode the user's umask gives new files
(safetensors writes 0600, which a server running as another user cannot read). Every format also gets the tokenizer with its chat template, and a generation_config.json whose EOS ids end
an assistant turn (the template's terminator: the most reported export failure is a model that never stops).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from transformers import GenerationConfig

from lightning_moe.config.schema import ConfigError
from lightning_moe.data.chat import end_of_turn_ids

log = logging.getLogger(__name__)


def refuse_existing(out: Path) -> None:
    if out.exists():
        raise ConfigError(f"out: {out} already exists; exports never replace a folder: give a new out=DIR")


class ExportFolder:
    def __init__(self, out: Path):
        refuse_existing(out)
        self.out = out
        self.tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")

    def __enter__(self) -> Path:
        remove_abandoned(self.out)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            readable_by_all(self.tmp)
            try:
                refuse_existing(self.out)  # nobody took the name meanwhile
                os.replace(self.tmp, self.out)
                return
            except (ConfigError, OSError):
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        shutil.rmtree(self.tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_abandoned(out: Path) -> None:
    """Temporary folders of earlier exports to `out` whose process is gone (a SIGKILL, a lost machine)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.tmp(\d+)$")
    if not out.parent.is_dir():
        return
    for path in out.parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by an export that did not finish", path)


def readable_by_all(folder: Path) -> None:
    """Every file the mode the umask gives new files (0644 under the usual 022), whatever the writer chose."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_tokenizer_and_stops(tokenizer, folder: Path) -> list[int]:
    """The tokenizer (with its chat template) and generation_config.json with the end-of-turn EOS ids."""
    tokenizer.save_pretrained(folder)
    stops = end_of_turn_ids(tokenizer)
    GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
    return stops


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
