"""Every third-party module the package imports is declared in pyproject.toml.

A test run on a machine where some other package pulled a dependency in (OpenCV, say) would
pass while a new user's install fails; this test reads the imports themselves. Modules
imported at module level must be core dependencies; optional ones (an extra) may only be
imported inside a function, where a missing one fails at the feature that needs it.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "densedet"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0])


def declared() -> tuple[set[str], set[str]]:
    """``(core, optional)`` distribution names from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    optional = {_requirement_name(r) for reqs in project.get("optional-dependencies", {}).values()
                for r in reqs}
    return core, optional


def third_party_imports() -> list[tuple[str, Path, int, bool]]:
    """``(top-level module, file, line, at_module_level)`` for each import outside the stdlib
    and the package itself. Imports under ``if TYPE_CHECKING`` do not run and are left out."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        module_level = {id(n) for n in tree.body}
        for node in tree.body:  # imports nested in module-level try/if still run at import
            if isinstance(node, (ast.Try, ast.If)) and not _is_type_checking(node):
                module_level |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "densedet":
                    continue
                found.append((top, path.relative_to(ROOT), node.lineno, id(node) in module_level))
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def test_every_import_is_declared():
    core, optional = declared()
    dists = md.packages_distributions()
    problems = []
    for top, path, line, at_module_level in third_party_imports():
        # a module that is not installed here (an optional extra) is known by its own name
        names = {_norm(d) for d in dists.get(top, [])} or {_norm(top)}
        if names & core:
            continue
        if names & optional and not at_module_level:
            continue
        where = f"{path}:{line}: import {top}"
        if names & optional:
            problems.append(f"{where} is optional (an extra) but imported at module level")
        else:
            problems.append(f"{where} comes from {sorted(names)}, not declared in pyproject.toml")
    assert not problems, "\n".join(problems)


def test_the_scan_sees_the_core_imports():
    """The scan itself works: it finds the imports every layer makes."""
    tops = {top for top, *_ in third_party_imports()}
    assert {"torch", "torchvision", "numpy", "cv2", "yaml", "pydantic"} <= tops


def test_torchvision_ops_load_with_the_pinned_torch():
    """torchvision's compiled ops need the torch release they were built for."""
    torch = pytest.importorskip("torch")
    from torchvision.ops import batched_nms

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 0]), 0.5)
    assert keep.tolist() == [0, 2]
