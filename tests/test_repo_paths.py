"""Every repository path named in docs, configs, comments and messages exists: a file moved without updating what
points at it (a user-facing hint, a recipe's header, a script's override) fails here instead of misleading a reader.

A path counts when it starts at a top-level folder of the repository (`conf/moe/switch.yaml`), inside the package
(`routers/base.py`, `moe/layer.py`: some file of lightning_moe/ ends with it), or is a markdown link relative to its
page. Placeholders (`conf/recipe/NAME.yaml`, `routers/myrouter.py`) and what is never committed (`data/generated/`,
run outputs) are not paths to check.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lightning_moe"
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ".jinja"}
TEXT_NAMES = {"Makefile", "run"}  # the Makefile and .ci/run
SKIP_DIRS = {"__pycache__", "runs", "outputs", "multirun", "lightning_logs", "wandb", "generated"}
NOT_COMMITTED = ("data/generated/", "cache/", "exports/")  # converted data (licences), models, exports: written on demand, ignored
# Words that stand for a name the reader picks (CONTRIBUTING's recipes, a script's usage line)
PLACEHOLDER = re.compile(r"^my[a-z_]*\b|(?<![A-Za-z])(NAME|VARIANT|OUT|FAMILY|SCOPE|DIR|EXPORT_DIR)(?![A-Za-z])")
PACKAGE_RELATIVE_SUFFIXES = (".py", ".json")  # `moe/layer0/entropy` is a metric, `export/x.safetensors` a run's


def _text_files() -> list[Path]:
    out = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")
                   and (not d.startswith(".") or d == ".ci")]
        rel = Path(root).relative_to(REPO)
        for name in files:
            path = Path(root) / name
            if rel.parts[:1] == ("benchmarks",) and path.suffix != ".md":
                continue  # raw measurements: logs and tables as the tools wrote them
            if path.suffix in TEXT_SUFFIXES or name in TEXT_NAMES:
                out.append(path)
    return out


def _first_segments() -> tuple[set[str], set[str]]:
    """Where a checked path may start: the repository's top-level folders, and the package's subfolders (for
    package-relative files)."""
    top = {p.name for p in REPO.iterdir() if p.is_dir() and p.name not in SKIP_DIRS
           and (not p.name.startswith(".") or p.name == ".ci")}
    return top | {p.name for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"}, top


def _candidates(text: str, starts: set[str], top: set[str]):
    first = "|".join(re.escape(s) for s in sorted(starts, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./~$<{{@:-])((?:{first})/[\w.*/-]*)")
    for match in pattern.finditer(text):
        path = match.group(1).rstrip(".-")
        if path.endswith("/") and path.count("/") == 1 and path[:-1] not in {"lightning_moe", "conf", "data"}:
            continue  # a bare `routers/` or `tests/` is prose about a folder, not a path to look up
        if path.split("/", 1)[0] not in top and not path.endswith(PACKAGE_RELATIVE_SUFFIXES):
            continue
        yield path


def _markdown_links(text: str):
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"^(https?:|mailto:|#)", target):
            yield target.split("#", 1)[0]


def _exists(path: str, page: Path, package_files: list[str]) -> bool:
    if any(PLACEHOLDER.search(part) for part in path.rstrip("/").split("/")):
        return True
    if (path.rstrip("/") + "/").startswith(NOT_COMMITTED) or "<" in path:  # a fresh clone has none of them
        return True
    if "*" in path:
        return any(REPO.glob(path)) or any(PACKAGE.rglob(path))
    bare = path.rstrip("/")
    if (REPO / bare).exists() or (page.parent / bare).exists():
        return True
    return any(f == bare or f.endswith("/" + bare) for f in package_files)


def test_every_repository_path_named_in_docs_configs_comments_and_messages_exists():
    starts, top = _first_segments()
    package_files = [p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*") if "__pycache__" not in p.parts]
    stale = []
    for page in _text_files():
        if page == Path(__file__).resolve():
            continue  # names stale paths on purpose, below
        text = page.read_text(errors="replace")
        named = set(_candidates(text, starts, top))
        if page.suffix == ".md":
            named |= {t for t in _markdown_links(text) if not t.startswith("../shared")}
        for path in sorted(named):
            if not _exists(path, page, package_files):
                stale.append(f"{page.relative_to(REPO)}: {path}")
    assert not stale, "paths that do not exist:\n  " + "\n  ".join(stale)


def test_the_check_finds_a_stale_path():
    """The check itself: a moved folder, a package-relative file and a broken link are each caught."""
    starts, top = _first_segments()
    package_files = [p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*.py")]
    text = ("see lightning_moe/architectures/ and generation/routing.py; [x](../../conf/recipe/gone.yaml); "
            "but conf/recipe/NAME.yaml, scripts/convert_NAME.py, routers/base.py, the metric moe/layer0/entropy "
            "and `tests/test_convert_*.py` are fine")
    page = REPO / "recipes" / "therapeutic" / "README.md"
    named = set(_candidates(text, starts, top)) | set(_markdown_links(text))
    missing = {p for p in named if not _exists(p, page, package_files)}
    assert missing == {"lightning_moe/architectures/", "generation/routing.py", "../../conf/recipe/gone.yaml"}
