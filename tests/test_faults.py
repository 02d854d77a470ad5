"""qkvmean.faults: the fault points the crash tests kill runs at."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from qkvmean import faults

PASS = (
    "from qkvmean import faults\n"
    "for i in range({n}):\n"
    "    print(i, flush=True)\n"
    "    faults.point('journaled')\n"
)


def _passes(spec, n=5):
    """Pass the point ``journaled`` n times in a process of its own: (status, passages)."""
    env = {k: v for k, v in os.environ.items() if k != "QKVMEAN_FAULT"}
    if spec is not None:
        env["QKVMEAN_FAULT"] = spec
    cmd = [sys.executable, "-c", PASS.format(n=n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return proc.returncode, proc.stdout.split()


def test_the_nth_passage_kills_the_process_there():
    assert _passes("journaled:3") == (-signal.SIGKILL, ["0", "1", "2"])
    assert _passes("journaled:1") == (-signal.SIGKILL, ["0"])
    assert _passes(None) == (0, ["0", "1", "2", "3", "4"])
    assert _passes("means-journaled:1") == (0, ["0", "1", "2", "3", "4"])  # another point


def test_a_marker_fires_once_across_processes(tmp_path):
    marker = tmp_path / "fired"
    assert _passes(f"journaled:2@{marker}") == (-signal.SIGKILL, ["0", "1"])
    assert marker.exists()
    assert _passes(f"journaled:2@{marker}") == (0, ["0", "1", "2", "3", "4"])


def test_counts_start_again_when_the_variable_changes(monkeypatch, tmp_path):
    """A long-lived process (a cluster's worker) given a new spec counts from zero."""
    killed = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setenv("QKVMEAN_FAULT", f"worker-batch:2@{tmp_path / 'a'}")
    for _ in range(3):
        faults.point("worker-batch")
    assert killed == [signal.SIGKILL]
    monkeypatch.setenv("QKVMEAN_FAULT", f"worker-batch:2@{tmp_path / 'b'}")
    faults.point("worker-batch")
    assert killed == [signal.SIGKILL]
    faults.point("worker-batch")
    assert killed == [signal.SIGKILL, signal.SIGKILL]


@pytest.mark.parametrize("spec", ["journaled", "journaled:0", "nowhere:1", "journaled:x"])
def test_a_bad_spec_says_what_is_wrong(monkeypatch, spec):
    monkeypatch.setenv("QKVMEAN_FAULT", spec)
    with pytest.raises(ValueError, match="is not NAME:N"):
        faults.point("journaled")


def test_stop_stops_the_process_there_until_it_is_continued():
    cmd = [sys.executable, "-c", PASS.format(n=4)]
    env = {**os.environ, "QKVMEAN_FAULT": "journaled:2:stop"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
    proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate(timeout=60)
    assert out.split() == ["0", "1", "2", "3"]  # stopped after the 2nd passage, then went on
