"""The command line as a user meets it."""

from __future__ import annotations

import subprocess
import sys

import qkvmean


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "qkvmean", *args], capture_output=True, text=True, timeout=120
    )


def test_version():
    proc = _run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"qkvmean {qkvmean.__version__}"


def test_help_and_unknown_verb():
    proc = _run("--help")
    assert proc.returncode == 0 and "usage: qkvmean" in proc.stdout
    proc = _run("no-such-verb")
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr and "Traceback" not in proc.stderr
