"""The package's shape, enforced: import-linter's layer contract (pyproject.toml), no import inside
a function except optional extras, and no module over ~400 lines without a reason at its top."""

from __future__ import annotations

import ast
import os
import shutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "eosbranch"
MAX_LINES = 400
# Imported lazily on purpose: optional extras (installed by `pip install eosbranch[...]`) and the
# peer tools of the benchmarks; importing them at the top would make them hard dependencies.
OPTIONAL = {"ray", "submitit", "scipy", "pyhessian", "curvlinops"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_import_linter_contracts_hold():
    exe = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "broken" not in res.stdout.lower().replace("0 broken", "")


def _function_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                if name.split(".")[0] not in OPTIONAL:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return found


def test_no_import_inside_a_function_except_optional_extras():
    found = [hit for p in _modules() for hit in _function_imports(p)]
    assert not found, "imports inside functions hide cycles from the linter:\n" + "\n".join(found)


def test_function_import_scan_sees_one():
    # The scan above must be able to fail: a function-level import of a package module is found.
    probe = ROOT / "tests" / "_probe_fn_import.py"
    try:
        probe.write_text("def f():\n    from eosbranch import spec\n    return spec\n")
        assert _function_imports(probe) == ["tests/_probe_fn_import.py:2 eosbranch"]
    finally:
        probe.unlink()


def test_no_module_over_400_lines_without_a_stated_reason():
    long = []
    for p in _modules():
        text = p.read_text()
        n = text.count("\n")
        head = "\n".join(text.splitlines()[:30])
        if n > MAX_LINES and not re.search(r"^(# )?Size:", head, re.M):
            long.append(f"{p.relative_to(ROOT)}: {n} lines")
    assert not long, "split these along their concepts, or say why not in a 'Size:' line at the top:\n" + "\n".join(long)


def test_the_contract_catches_an_upward_import(tmp_path):
    # A copy of the package whose lowest module imports the command line: the linter must refuse it.
    shutil.copytree(PACKAGE, tmp_path / "eosbranch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    errors = tmp_path / "eosbranch" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom . import cli as _cli  # noqa\n")
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    res = subprocess.run([str(exe), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode != 0
    assert "eosbranch.errors is not allowed to import eosbranch.cli" in res.stdout
