"""omi_dsf/processes.py: whether a started server still runs, as the test bed and the demo ask it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omi_dsf.processes import pid_alive


def test_a_process_just_started_counts_as_running():
    """Right after Popen returns, /proc/<pid>/cmdline is empty for a few milliseconds (the new image
    is still being set up; longer on a loaded machine): the process runs and must count as such (the
    test bed took a DSF server restarted so for one that had exited and failed the test)."""
    java = shutil.which("java")   # its launcher sets itself up again after Popen returns
    if java is None:
        pytest.skip("no java on PATH (the DSF servers' launcher is what shows the gap)")
    for _ in range(100):
        proc = subprocess.Popen([java, "-Xmx32m", "-Domi.needle=1", "-version"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert pid_alive(proc.pid, "-Domi.needle=1")
        finally:
            proc.kill()
            proc.wait()


def test_an_ended_process_or_another_program_does_not_count():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)", "omi-needle"])
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    end = time.monotonic() + 5
    while not cmdline.read_bytes() and time.monotonic() < end:   # past the gap the test above shows
        time.sleep(0.01)
    try:
        assert not pid_alive(proc.pid, "another-server")      # the pid now names another program
    finally:
        proc.kill()
    proc.wait()
    assert not pid_alive(proc.pid, "omi-needle")
    assert not pid_alive(None)
