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


def test_output_into_a_closed_pipe_stops_quietly():
    """``qkvmean --version --verbose | head -1``: no BrokenPipeError traceback. The pipe is
    closed before the process writes (it takes a moment to start), so the write fails."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "qkvmean", "--version", "--verbose"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait() == 0, err
    assert err == ""


def test_help_imports_no_command_and_no_plotting():
    """The commands import what they need when they run: ``qkvmean --help`` loads none of
    them (no matplotlib, no run or render layer, no progress bar)."""
    code = (
        "import sys\nfrom qkvmean.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: qkvmean" in proc.stdout, proc.stderr
    loaded = proc.stderr.split()
    heavy = ("matplotlib", "tqdm", "qkvmean.render", "qkvmean.run", "qkvmean.io.models")
    assert not [m for m in loaded if m.startswith(heavy)]
    assert "qkvmean.cli.run" in loaded  # (what loads is the parser of every command)
