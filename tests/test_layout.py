"""Imports run one way (README, Layout): read from the source with `ast`, so a new upward import fails here.

- The remote-code files (what `save_pretrained` copies beside a checkpoint) import only each other, torch,
  transformers and the standard library: a checkpoint must load where only those are installed.
- Every other part of the package imports only the parts listed for it in ALLOWED: nothing imports `cli`, the
  training code imports neither the study nor the benchmarks, the model files nothing of ours.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "acx_ramanujan"
REMOTE_CODE = {"configuration_ramanujan", "modeling_ramanujan", "initialization_ramanujan", "tokenization_ramanujan"}

# part of the package: the parts it may import (besides itself). "model" is the remote-code files.
ALLOWED = {
    "model": set(),
    "files": set(),
    "commands": set(),
    "reporting": {"files"},
    "cards": {"model", "files"},
    "hub": {"model", "files", "commands", "cards"},
    "training": {"model", "files", "commands", "cards", "hub"},
    "export": {"model", "files", "commands", "training"},  # the Llama export reuses the BPE's byte renumbering
    "study": {"model", "files", "commands", "reporting", "training"},
    "bench": {"model", "files", "reporting", "export"},  # gpu_check builds the Llama peer with export.llama's config
    "cli": {"commands"},  # the subcommands are imported by name (importlib) when asked for
    "root": {"model", "training"},  # __init__: public names and the Auto-class registration
}


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    if len(relative.parts) > 1:
        return relative.parts[0]
    name = relative.stem
    return "root" if name == "__init__" else "model" if name in REMOTE_CODE else name


def imported_modules(path: Path, source: str | None = None) -> list[str]:
    """Absolute names of everything `path` (or `source`, as if it were at `path`) imports, relative imports resolved
    against its package."""
    package = ["acx_ramanujan", *path.relative_to(PACKAGE).parent.parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from . import modeling_ramanujan` imports a module: name it, not its package.
            names += [f"{module}.{alias.name}" if not node.module else module for alias in node.names]
    return names


def part_of_module(name: str) -> str | None:
    """The package part a module name belongs to; None outside the package."""
    parts = name.split(".")
    if parts[0] != "acx_ramanujan":
        return None
    if len(parts) == 1:
        return "root"
    path = PACKAGE.joinpath(*parts[1:])
    if path.is_dir() or path.with_suffix(".py").is_file():
        return part_of(path / "__init__.py" if path.is_dir() else path.with_suffix(".py"))
    return part_of_module(".".join(parts[:-1]))  # `from package import name`: the name is not a module


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    part = part_of(path)
    for name in imported_modules(path):
        target = part_of_module(name)
        if target is None:
            if part == "model":
                top = name.split(".")[0]
                assert top in {"torch", "transformers"} or top in sys.stdlib_module_names, (
                    f"{path.name} (remote code) imports {name}: a checkpoint's code may need only torch and transformers")
            continue
        assert target == part or target in ALLOWED[part], f"{path.relative_to(PACKAGE)} ({part}) imports {name} ({target})"


def test_every_part_is_declared():
    assert {part_of(path) for path in SOURCES} == set(ALLOWED)


def test_the_check_sees_an_upward_import():
    """The resolver itself: relative imports at each depth land on the right part, and an upward one is refused."""
    pretrain = PACKAGE / "training" / "pretrain.py"
    assert {"acx_ramanujan.modeling_ramanujan", "acx_ramanujan.training.checkpoints"} <= set(imported_modules(pretrain))
    upward = imported_modules(pretrain, "from ..cli import main\nfrom ..study import compare_init\nimport acx_ramanujan.bench.speed\n")
    assert [part_of_module(name) for name in upward] == ["cli", "study", "bench"]
    assert not {"cli", "study", "bench"} & ALLOWED["training"]


def test_the_readme_data_flow_names_real_functions():
    """Every `acx_ramanujan....` name in README's Layout section resolves to an object in the code."""
    import importlib
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    names = sorted(set(re.findall(r"\bacx_ramanujan(?:\.\w+)+", layout)))
    assert len(names) >= 10, names
    for name in names:
        module_name, _, attribute = name.rpartition(".")
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            module = getattr(importlib.import_module(module_name), attribute)
        assert module is not None, name


def test_every_folder_of_python_files_is_a_package():
    """setuptools' find_packages (pyproject) ships only folders with an __init__.py: a sub-package without one works
    in an editable install and is missing from the wheel."""
    metric_scripts = PACKAGE / "training" / "metrics"  # evaluate modules, loaded by path: package data (pyproject)
    folders = {path.parent for path in SOURCES if metric_scripts not in path.parents}
    assert [folder for folder in folders if not (folder / "__init__.py").is_file()] == []
