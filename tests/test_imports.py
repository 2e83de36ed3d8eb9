"""The five files import only the standard library, numpy, torch and pillow, and nothing runs on import.
The import checker itself is tested on small source strings, so a forbidden line cannot slip past it."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ("data", "augment", "vae", "probe", "main")
ALLOWED = set(sys.stdlib_module_names) | {"numpy", "torch", "PIL"} | set(FILES)


def imported_modules(source):
    """Top-level names of every module that `source` imports, at any depth (inside functions and try blocks too):
    `import a.b` and `from a.b import c` both give 'a'. A relative import gives '.', which no allow-list holds."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


@pytest.mark.parametrize("name", FILES)
def test_imports_only_stdlib_numpy_torch_pillow(name):
    imported = imported_modules((ROOT / f"{name}.py").read_text())
    assert imported <= ALLOWED, imported - ALLOWED


def test_checker_reads_both_import_forms():
    source = "import os.path, json\nfrom torch.nn import functional as F\nfrom PIL import Image\nimport numpy as np\n"
    assert imported_modules(source) == {"os", "json", "torch", "PIL", "numpy"}


@pytest.mark.parametrize("line", [
    "from torchvision import transforms",
    "from kornia.augmentation import RandomRotation",
    "import torchvision.transforms as T",
    "from . import vae",  # relative: these are flat files, not a package
    "def f():\n    from tqdm import tqdm",  # hidden inside a function
])
def test_checker_rejects_a_forbidden_line(line):
    source = f"import torch\nfrom torch import nn\n{line}\n"
    assert imported_modules(source) - ALLOWED


def test_probe_does_not_import_vae():
    assert "vae" not in imported_modules((ROOT / "probe.py").read_text())


def test_importing_prints_nothing():
    code = "import data, augment, vae, probe, main"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
