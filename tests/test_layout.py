"""The package layout stays what CONTRIBUTING.md says: one concern per folder, imports flowing one way, an
installable package whose dependencies agree with requirements.txt, recipes found from their front pages, and
measured figures kept out of config comments (they live in the guide's tables)."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "lightning_moe"
# Lower ranks never import higher ones; packages of equal rank do not import each other.
RANKS = {"paths": 0, "upstream": 0, "config": 1, "moe": 2, "models": 3, "data": 3, "reporting": 4,
         "checkpointing": 5, "training": 6, "evaluation": 7, "generation": 7, "export": 8, "cli": 9}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):  # inside functions too: a lazy import is still a dependency
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_moe."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lightning_moe.")}
    return found


def test_every_package_module_sits_in_a_known_folder_and_imports_only_downwards():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        module = ".".join(rel.parts)
        if module == "lightning_moe.__init__":
            continue
        part = _part(module)
        assert part in RANKS, f"{module}: a new top-level part of the package needs a rank in this test"
        for target in _imports(path):
            other = _part(target)
            assert other in RANKS, (module, target)
            allowed = other == part or RANKS[other] < RANKS[part]
            assert allowed, f"{module} (rank {RANKS[part]}) imports {target} (rank {RANKS[other]})"


def test_each_folder_says_what_it_holds():
    for folder in [p for p in PACKAGE.rglob("*") if p.is_dir() and list(p.glob("*.py"))]:
        init = folder / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{folder}: no docstring"


def test_entry_points_are_thin():
    for entry in ("train.py", "evaluate.py", "generate.py", "chat.py", "export.py"):
        if (REPO / entry).exists():
            assert len((REPO / entry).read_text().splitlines()) < 90, entry


def _requirement_names(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        spec = line.split("#")[0].strip()
        if spec:
            # extras stay in the name: `transformers[serving]` (the serve extra) is a requirement of its own beside
            # `transformers`, not a second spelling of it
            name = re.split(r"[<>=!~ ]", spec, maxsplit=1)[0].lower()
            out[name] = spec.replace(" ", "")
    return out


# extras the test install leaves out (their tests skip without them), each with its reason in pyproject.toml
NOT_IN_TEST_INSTALL = {"harness"}


def test_pyproject_dependencies_agree_with_requirements_txt():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    for name, extra in project["optional-dependencies"].items():
        if name not in NOT_IN_TEST_INSTALL:
            declared |= _requirement_names(extra)
    required = {}
    for name in ("requirements.txt", "requirements-gpu.txt"):
        required |= _requirement_names((REPO / name).read_text().splitlines())
    assert declared == required


def test_every_recipe_has_a_front_page_that_links_it():
    recipes = sorted(p.stem for p in (REPO / "conf" / "recipe").glob("*.yaml"))
    pages = {p: p.read_text() for p in (REPO / "recipes").glob("*/README.md")}
    for name in recipes:
        linked = [p for p, text in pages.items() if f"conf/recipe/{name}.yaml" in text]
        assert len(linked) == 1, f"{name}: linked from {linked} (want exactly one recipes/*/README.md)"
        assert f"recipes/{linked[0].parent.name}/" in (REPO / "conf" / "recipe" / f"{name}.yaml").read_text(), \
            f"conf/recipe/{name}.yaml should point to its front page"


@pytest.mark.parametrize("path", sorted((REPO / "conf").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_config_comments_point_to_measured_figures_instead_of_copying_them(path):
    """A measured speed or memory figure lives in the guide (or benchmarks/); a config comment points there."""
    figure = re.compile(r"\d[\d,.]*\s*(tokens/s|GiB|GB of|x the|% MFU)")
    for n, line in enumerate(path.read_text().splitlines(), 1):
        comment = line.split("#", 1)[1] if "#" in line else ""
        assert not figure.search(comment), f"{path.name}:{n}: {comment.strip()}"
