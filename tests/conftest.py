"""Shared test helpers. Parts keep their own fixtures in their own test modules."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def artifacts_dir() -> Path:
    """Where tests keep things worth looking at after the run (screenshots, reports)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# -- the real DSF test bed, shared by every test module that needs it -------------------------

import os  # noqa: E402
import time  # noqa: E402


@pytest.fixture(scope="session")
def dsf_testbed():
    """A two-site DSF 1.9.0 test bed (requester DIC + AI provider) with the OMI plugin deployed.

    Started once per test session in test-artifacts/testbed/ (OMI_TESTBED_TEST_DIR to change it) on the
    first free base port from 8400, and stopped at the end; if one is already running there it is
    used and left running. Skips when no DSF 1.9 distribution is found (DSF_HOME): the DSF server
    artifacts are not served by the Maven registry reachable here (see docs/testbed.md).
    """
    from omi_dsf.cli import UserError
    from omi_dsf.testbed.bed import State, TestBed, find_dsf_home, free_base_port, pid_alive

    try:
        find_dsf_home()
    except UserError as exc:
        pytest.skip(str(exc))
    folder = Path(os.environ.get("OMI_TESTBED_TEST_DIR", ARTIFACTS / "testbed"))
    old = State.load(folder)
    was_running = old is not None and all(pid_alive(s.pid) for s in old.servers)
    base = int(old.servers[0].port) - 1 if was_running else free_base_port(2, start=8400)
    bed = TestBed(folder, base_port=base, out=print)
    if not was_running and folder.exists():
        bed.down(purge=True)   # fresh per run; the folder with the logs stays afterwards
    t0 = time.monotonic()
    try:
        bed.up(timeout=900)
    except BaseException:
        bed.down()   # leave no PostgreSQL or JVM behind when the test bed does not come up
        raise
    print(f"test bed ready after {time.monotonic() - t0:.0f} s")
    state = State.load(folder)
    state.bed = bed
    yield state
    if not was_running:
        bed.down()
