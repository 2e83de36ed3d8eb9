"""The five files import only the standard library, numpy, torch and pillow, and nothing runs on import."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ("data", "augment", "vae", "probe", "main")
ALLOWED = set(sys.stdlib_module_names) | {"numpy", "torch", "PIL"} | set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_imports_only_stdlib_numpy_torch_pillow(name):
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: these are flat files"
            imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED, imported - ALLOWED


def test_probe_does_not_import_vae():
    tree = ast.parse((ROOT / "probe.py").read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "vae" not in names


def test_importing_prints_nothing():
    code = "import data, augment, vae, probe, main"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
