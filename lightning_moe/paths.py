"""Where the repository's bundled files live, and how relative paths in configs are resolved."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURES = Path(__file__).resolve().parent / "architectures"
BUNDLED_TOKENIZER = REPO_ROOT / "data" / "tokenizer"


def resolve_path(path: str | Path) -> Path:
    """Absolute paths stay; relative ones are tried against the working directory first (what a user
    typing an override means), then against the repository root (what the bundled configs mean)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO_ROOT / p).resolve()


def architecture_file(name_or_path: str) -> Path:
    """`tiny-mistral` -> lightning_moe/architectures/tiny-mistral.json; a path to a .json is taken as is."""
    if name_or_path.endswith(".json"):
        return resolve_path(name_or_path)
    return ARCHITECTURES / f"{name_or_path}.json"


def known_architectures() -> list[str]:
    return sorted(p.stem for p in ARCHITECTURES.glob("*.json"))
