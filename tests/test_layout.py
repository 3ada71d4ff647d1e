"""The layout's rules: the serving package never imports phi3flow (Azure runs it without it), and every module has
one import name (a second name would load it twice, with two sets of globals)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys

import pytest

from conftest import REPO

SERVING = sorted((REPO / "deploy" / "phi3serve").glob("*.py")) + [REPO / "deploy" / "score.py"]


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", SERVING, ids=lambda path: path.name)
def test_the_serving_package_never_imports_phi3flow(path):
    assert not {name for name in imported_modules(path) if name.split(".")[0] == "phi3flow"}


@pytest.mark.parametrize(
    ("second", "first"),
    [
        ("phi3flow.deploy.phi3serve", "phi3serve"),
        ("finetune", "phi3flow.finetune"),
        ("evaluation", "phi3flow.evaluation"),
        ("data", "phi3flow.data"),
        ("tools", "phi3flow.tools"),
        ("deploy", "phi3flow.deploy"),
    ],
)
def test_a_module_cannot_be_imported_under_a_second_name(second, first):
    """From the repository root (on sys.path here, as in `python -m`), a stage folder's bare name is refused."""
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import {second}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    refused = f"import {first}, not {second}" in result.stderr or f"No module named '{second}'" in result.stderr
    assert result.returncode != 0 and refused, result.stderr
    importlib.import_module(first)  # the one name works


def test_the_entry_script_holds_no_state_of_its_own():
    """azmlinfsrv loads deploy/score.py by path; the scoring state lives in phi3serve.scoring, imported once."""
    assert imported_modules(REPO / "deploy" / "score.py") == {"phi3serve.scoring"}
