"""The benchmarks' CPU accounting (omi_dsf/testkit/cputime.py) on real processes."""

from __future__ import annotations

import subprocess
import sys
import time

from omi_dsf.testkit import cputime

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_a_tree_counts_its_children_live_and_ended():
    # a parent that runs one child to its end (reaped: counted in the parent's cutime), then
    # starts another that burns while we look (live: counted as itself), then sleeps
    code = (f"import subprocess, sys, time\n"
            f"subprocess.run([sys.executable, '-c', {BURN.format(s=0.4)!r}])\n"
            f"p = subprocess.Popen([sys.executable, '-c', {BURN.format(s=0.4) + 'time.sleep(30)'!r}])\n"
            f"time.sleep(30)\n")
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        before = cputime.snapshot({"tree": [parent.pid], "idle": [idle.pid]})
        deadline = time.monotonic() + 30
        while cputime.tree_seconds([parent.pid]) < 0.8 and time.monotonic() < deadline:
            time.sleep(0.1)
        after = cputime.snapshot({"tree": [parent.pid], "idle": [idle.pid]})
        got = cputime.spent(before, after)
        assert 0.7 <= got["tree"] < 3, got          # both children's 0.4 s, and the interpreters' start-up
        assert got["idle"] < 0.3, got
        assert got["machine"] >= got["tree"] - 0.05
        assert cputime.tree_seconds([999_999_999]) == 0.0   # a process that is not there
    finally:
        for p in (parent, idle):
            p.kill()
            p.wait()
