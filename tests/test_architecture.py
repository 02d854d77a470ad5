"""The layering of docs/architecture.md, checked by tools/check_layers.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "check_layers.py"


def _checker(root: Path):
    spec = importlib.util.spec_from_file_location("check_layers", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.ROOT = root
    return module


def test_every_import_points_down_and_none_cycles():
    proc = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert "every import points down, no cycle" in proc.stdout


def _tree(tmp_path, files: dict) -> Path:
    root = tmp_path / "qkvmean"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_an_upward_import_a_cycle_and_io_reaching_into_the_store(tmp_path):
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "files.py": "",
            "engine/__init__.py": "",
            "engine/api.py": "def f():\n    from ..run import local\n",  # lazy, still an arrow
            "io/__init__.py": "",
            "io/qkv.py": "from ..store.schema import X\n",
            "store/__init__.py": "",
            "store/schema.py": "from ..files import InputError\nX = 1\n",
            "run/__init__.py": "",
            "run/local.py": "from . import cluster\n",
            "run/cluster.py": "from .local import run\n",
        },
    )
    checker = _checker(root)
    found = checker.violations(checker.graph())
    assert "qkvmean.engine.api (qkvmean.engine) imports qkvmean.run.local (qkvmean.run): " \
        "not below it" in found  # fmt: skip
    assert "qkvmean.io.qkv (qkvmean.io) imports qkvmean.store.schema (qkvmean.store): " \
        "not below it" in found  # fmt: skip
    assert "import cycle among qkvmean.run.cluster, qkvmean.run.local" in found
    assert len(found) == 3  # store.schema -> files points down: fine
