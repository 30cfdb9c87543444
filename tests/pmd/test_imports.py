"""`pmd` is the library: importing any of its modules must not import Ray, torch or the `pipelines` executors
(a Ray worker, a DataLoader worker or a notebook imports pmd for one function and must not pay for, or depend on,
the rest). Checked twice: in a fresh interpreter that imports every module of the package, and by reading every
module's import statements, function-level ones included (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pmd

BANNED = ("ray", "torch", "pipelines")
# Packages above the library, which only the commands' composition root may import.
ABOVE = (*BANNED, "pmd_demo", "flava")

_IMPORT_ALL = """
import importlib, json, pkgutil, sys
import pmd
names = sorted(m.name for m in pkgutil.walk_packages(pmd.__path__, "pmd."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "banned": [b for b in %r if b in sys.modules or
                                                 any(m.startswith(b + ".") for m in sys.modules)]}))
"""


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(pmd.__path__, "pmd."))


def test_importing_every_pmd_module_imports_neither_ray_torch_nor_pipelines():
    result = subprocess.run([sys.executable, "-c", _IMPORT_ALL % (BANNED,)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["modules"] == _modules() and len(found["modules"]) > 40
    assert found["banned"] == []


def _imported(path: Path) -> set[str]:
    """Top-level package names of every import statement in a module, at any depth."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_pmd_module_imports_a_package_above_the_library():
    """The commands' composition root (pmd_cli/) is the only code that imports library, pipelines, demo and
    trainer together; no library module may, not even inside a function."""
    root = Path(pmd.__file__).parent
    offenders = {}
    for name in _modules():
        relative = name.split(".")[1:]
        path = root.joinpath(*relative).with_suffix(".py")
        if not path.exists():
            path = root.joinpath(*relative, "__init__.py")
        above = sorted(_imported(path) & set(ABOVE))
        if above:
            offenders[name] = above
    assert offenders == {}
