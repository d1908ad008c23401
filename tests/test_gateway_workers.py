"""Several gateway worker processes: the association slots they share (flock on slot files, freed
by the kernel when a holder dies), the STOW mark their caches check, and the gateway at workers=2
in front of dcmqrscp (real processes, real sockets), and the embedded store written by both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import free_port
from omi_dsf.dicomweb.config import parse_config
from omi_dsf.dicomweb.multipart import dicom_body
from omi_dsf.dicomweb.slots import ChangeMark, Slots, SlotsBusy

HOLDER = """
import sys, time
from pathlib import Path
from omi_dsf.dicomweb.slots import Slots
slots = Slots(int(sys.argv[2]), Path(sys.argv[1]))
with slots.hold(10):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(folder: Path, limit: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(limit)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_slots_are_counted_across_processes_and_freed_when_a_holder_is_killed(tmp_path):
    holders = [_holder(tmp_path, 2), _holder(tmp_path, 2)]
    try:
        slots = Slots(2, tmp_path)
        with pytest.raises(SlotsBusy):
            with slots.hold(0.3):
                pass
        holders[0].send_signal(signal.SIGKILL)
        holders[0].wait(5)
        started = time.monotonic()
        with slots.hold(5):
            assert time.monotonic() - started < 2
            with pytest.raises(SlotsBusy):   # the other holder still has the second slot
                with Slots(2, tmp_path).hold(0.2):
                    pass
    finally:
        for p in holders:
            p.kill()
            p.wait(5)


IDLE_HOLDER = """
import sys, time
from pathlib import Path
from omi_dsf.dicomweb.slots import Slots
slots = Slots(int(sys.argv[2]), Path(sys.argv[1]))
idle = [slots.take() for _ in range(slots.limit)]
def give_one():
    if idle:
        slots.give(idle.pop())
        print("gave", flush=True)
slots.on_busy(give_one)
print("held", flush=True)
time.sleep(60)
"""


def test_idle_slots_of_another_process_are_given_back_when_someone_waits(tmp_path):
    """A worker whose pool holds every slot idle gives them back when another worker waits (the
    pressure file it watches); one that holds its slots for work does not (the first test)."""
    proc = subprocess.Popen([sys.executable, "-c", IDLE_HOLDER, str(tmp_path), "2"], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert proc.stdout.readline().strip() == "held"
        slots = Slots(2, tmp_path)
        assert slots.take(relieve=False) is None          # not asked: the idle holder keeps them
        started = time.monotonic()
        slot = slots.take(timeout=5)
        assert slot is not None and time.monotonic() - started < 2
        assert proc.stdout.readline().strip() == "gave"
        slots.give(slot)
    finally:
        proc.kill()
        proc.wait(5)


def test_idle_slots_in_the_same_process_are_given_back_at_once():
    slots = Slots(1)
    idle = [slots.take()]
    slots.on_busy(lambda: idle and slots.give(idle.pop()))
    assert slots.take(relieve=False) is None
    slot = slots.take(timeout=2)
    assert slot is not None and idle == []
    slots.give(slot)


def test_slots_within_one_process_never_exceed_the_limit(tmp_path):
    for folder in (None, tmp_path):
        slots, inside, most, lock = Slots(3, folder), [0], [0], threading.Lock()

        def work():
            for _ in range(20):
                with slots.hold(10):
                    with lock:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    time.sleep(0.001)
                    with lock:
                        inside[0] -= 1

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: work(), range(8)))
        assert most[0] == 3


def test_change_mark_tells_other_processes_once(tmp_path):
    mine, theirs = ChangeMark(tmp_path / "x.stow"), ChangeMark(tmp_path / "x.stow")
    assert not theirs.changed()
    mine.touch()
    assert theirs.changed() and not theirs.changed()
    assert not ChangeMark(None).changed()


def test_workers_default_and_move_destination():
    assert parse_config({"auth": {"anonymous": True}}).worker_count == max(1, min(4, os.cpu_count() or 1))
    moving = {"auth": {"anonymous": True}, "dimse": {"move_destination": {"port": 11114}}}
    assert parse_config(moving).worker_count == 1
    with pytest.raises(Exception, match="workers"):
        parse_config({**moving, "workers": 2})


# -- the gateway at workers=2 in front of dcmqrscp ---------------------------------------------

def _established_to(port: int) -> dict[int, int]:
    """ESTABLISHED client sockets towards 127.0.0.1:port: local port → socket inode."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[2].split(":")[1], 16) == port and f[3] == "01":
            out[int(f[1].split(":")[1], 16)] = int(f[9])
    return out


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _owner(inode: int, pids: list[int]) -> int | None:
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
        except OSError:
            continue
    return None


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_workers_share_the_association_limit_and_survive_a_killed_worker(tmp_path):
    from omi_dsf.testkit.gateway import GatewayProcess
    from omi_dsf.testkit.legacy_pacs import Dcmqrscp
    from omi_dsf.testkit.phantom import write_ct_study

    files = write_ct_study(tmp_path / "ct", slices=30, seed=5, rows=512, cols=512)
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    with Dcmqrscp(tmp_path / "pacs", max_pdu=131072) as pacs:
        pacs.load(files)
        limit = 2
        gw = GatewayProcess({"listen": {"host": "127.0.0.1", "port": free_port()}, "auth": {"anonymous": True},
                             "workers": 2, "default": "PACS",
                             "backends": {"PACS": {"type": "dimse", "host": "127.0.0.1", "port": pacs.port,
                                                   "called_aet": "LEGACYPACS", "max_associations": limit,
                                                   "dimse_timeout": 20}}},
                            tmp_path / "gw")
        with gw:
            workers = _children(gw.proc.pid)
            assert len(workers) == 2
            seen, stop = [0], threading.Event()

            def sample():
                while not stop.is_set():
                    seen[0] = max(seen[0], len(_established_to(pacs.port)))
                    time.sleep(0.002)

            def fetch(_=None) -> int:
                with httpx.Client(timeout=60) as http:
                    r = http.get(f"{gw.url}/studies/{study}", headers={"Accept": "multipart/related; type=application/dicom"})
                    assert r.status_code == 200, r.text[:200]
                    return r.content.count(b"DICM")

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            with ThreadPoolExecutor(6) as pool:
                counts = list(pool.map(fetch, range(6)))
            stop.set()
            sampler.join()
            assert counts == [30] * 6
            assert 1 <= seen[0] <= limit, f"the PACS saw {seen[0]} associations at once (limit {limit})"

            # a STOW-RS through one worker: no worker serves the study's metadata from before it
            def metadata(_=None) -> int:
                with httpx.Client(timeout=60) as http:   # a new connection each: either worker
                    return len(http.get(f"{gw.url}/studies/{study}/metadata").json())

            assert set(ThreadPoolExecutor(4).map(metadata, range(12))) == {30}   # cached in both workers
            ds = pydicom.dcmread(files[0])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            buf = BytesIO()
            ds.save_as(buf)
            body, ctype = dicom_body([buf.getvalue()])
            assert httpx.post(f"{gw.url}/studies", content=body, headers={"Content-Type": ctype},
                              timeout=60).status_code == 200
            assert set(ThreadPoolExecutor(4).map(metadata, range(12))) == {31}

            # kill the worker that holds an association in the middle of a retrieval
            box: dict = {}
            busy = threading.Thread(target=lambda: box.setdefault("r", _try(fetch)), daemon=True)
            busy.start()
            deadline, victim = time.monotonic() + 20, None
            while victim is None and time.monotonic() < deadline:
                for inode in _established_to(pacs.port).values():
                    victim = _owner(inode, workers)
                    if victim:
                        break
                time.sleep(0.002)
            assert victim, "no worker held an association"
            os.kill(victim, signal.SIGKILL)
            busy.join(60)
            # the gateway keeps serving, the dead worker's slots are free again, and it is replaced
            with ThreadPoolExecutor(limit) as pool:
                assert list(pool.map(fetch, range(2 * limit))) == [31] * (2 * limit)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                now = _children(gw.proc.pid)
                if len(now) == 2 and victim not in now:
                    break
                time.sleep(0.1)
            assert len(now) == 2 and victim not in now
            # SIGTERM stops them all
            gw.stop()
            assert gw.proc.returncode is not None
            time.sleep(0.5)
            assert all(not Path(f"/proc/{p}").exists() or "zombie" in Path(f"/proc/{p}/status").read_text()
                       for p in now)


def _try(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the request the killed worker served may fail
        return exc


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_two_workers_store_into_one_embedded_store(tmp_path):
    from omi_dsf.testkit.gateway import GatewayProcess
    from pydicom.data import get_testdata_file

    study = generate_uid()

    def stow(_i) -> int:
        parts = []
        for _ in range(10):
            ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            ds.StudyInstanceUID = study
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            buf = BytesIO()
            ds.save_as(buf)
            parts.append(buf.getvalue())
        body, ctype = dicom_body(parts)
        with httpx.Client(timeout=60) as http:   # a new connection each: either worker
            return http.post(f"{gw.url}/studies", content=body, headers={"Content-Type": ctype}).status_code

    gw = GatewayProcess({"listen": {"host": "127.0.0.1", "port": free_port()}, "auth": {"anonymous": True},
                         "workers": 2, "backends": {"STORE": {"type": "store", "path": str(tmp_path / "store")}}},
                        tmp_path / "gw")
    with gw:
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(stow, range(16))) == [200] * 16
        assert len(httpx.get(f"{gw.url}/studies/{study}/instances", timeout=30).json()) == 160
    assert "Traceback" not in gw.log.read_text()
