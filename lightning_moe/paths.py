"""Where the bundled files live, and how relative paths in configs are resolved.

- Package assets (found through the package, wherever it is installed): the bundled tokenizer
  (`lightning_moe/assets/tokenizer/`, `model.tokenizer=bundled`) and the architecture configs
  (`lightning_moe/models/architectures/`, `model.arch=NAME`).
- The project root: the folder that holds conf/, data/ and the entry points. `$LIGHTNING_MOE_ROOT` if set, else
  the folder of the entry point that called `set_project_root` (train.py, evaluate.py, ...), else the working
  directory. A relative path in a config (`data/therapeutic_sample.jsonl`) is tried against the working directory
  first (what a user typing an override means), then against the project root (what the bundled configs mean).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

PACKAGE = Path(str(resources.files("lightning_moe")))
BUNDLED_TOKENIZER = PACKAGE / "assets" / "tokenizer"
ARCHITECTURES = PACKAGE / "models" / "architectures"

_root: Path | None = None


def set_project_root(path: str | Path) -> None:
    global _root
    _root = Path(path).resolve()


def project_root() -> Path:
    env = os.environ.get("LIGHTNING_MOE_ROOT")
    return Path(env).resolve() if env else (_root or Path.cwd())


def resolve_path(path: str | Path) -> Path:
    """Absolute paths stay; relative ones are tried against the working directory first, then the project root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (project_root() / p).resolve()


def architecture_file(name_or_path: str) -> Path:
    """`tiny-mistral` -> lightning_moe/models/architectures/tiny-mistral.json; a path to a .json is taken as is."""
    if name_or_path.endswith(".json"):
        return resolve_path(name_or_path)
    return ARCHITECTURES / f"{name_or_path}.json"


def known_architectures() -> list[str]:
    return sorted(p.stem for p in ARCHITECTURES.glob("*.json"))
