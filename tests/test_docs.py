"""The Python examples in the README and docs run as written."""

from __future__ import annotations

import re
from pathlib import Path

from test_store import make_qkv

from qkvmean.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(path):
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, f"{path.name} has no python example"
    return blocks


def test_readme_python_blocks_run():
    for block in _python_blocks(ROOT / "README.md"):
        exec(compile(block, "README.md", "exec"), {})


def test_store_doc_examples_read_a_real_store(tmp_path, monkeypatch):
    make_qkv(tmp_path / "capture.h5", heads=6)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--qkv", "capture.h5", "--out", "run.h5", "--quiet"]) == 0
    for block in _python_blocks(ROOT / "docs" / "store.md"):
        exec(compile(block, "docs/store.md", "exec"), {})
