"""omi_dsf.malloc: with its settings a process uses freed large blocks again instead of faulting in
fresh pages for every copy of a volume, also after a peak above what it keeps (the model's temporaries
between two requests); both ways of setting them (mallopt here, the environment of a started server)
work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from omi_dsf import malloc

# A 100 MB block allocated, written and freed; then a peak of 1.25 GiB freed; then the 100 MB block
# again: the page faults of that last time.
FAULTS_AFTER_A_PEAK = """
import resource, sys
from omi_dsf import malloc
if sys.argv[1] == "mallopt":
    assert malloc.keep_freed_memory()
def block(size):
    data = bytearray(size)          # zeroed: every page touched
    data[::4096] = b"x" * len(data[::4096])
block(100 << 20)
block(1280 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block(100 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(how: str, env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS_AFTER_A_PEAK, how], env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_settings_spare_the_page_faults_of_a_large_block_again():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    pages = (100 << 20) // 4096
    assert _faults("none", env) > pages // 2              # glibc's default: fresh pages each time
    assert _faults("mallopt", env) < pages // 20           # keep_freed_memory(): the freed block again
    assert _faults("none", {**env, **malloc.ENVIRONMENT}) < pages // 20   # the environment's settings
