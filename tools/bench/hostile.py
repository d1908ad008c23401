#!/usr/bin/env python3
"""Benchmark: one gateway under attack while a normal client keeps working (issue 16).

A gateway process (``python -m omi_dsf gateway``, default limits) serves a small CT study from its
store and, under ``/aets/PACS``, the same data from dcmqrscp. A normal client does QIDO-RS
(``/studies/{S}/instances``) and WADO-RS (one instance) in turn, first alone (baseline), then while,
all at once, each attack from a process of its own (at nice 19: an attacker's CPU is not the
gateway's machine's), on 127.0.0.1 only:

* **slow clients**: ``--slow-clients`` (1,000) connections that send half a request line or
  header and wait; when the gateway closes one (408 after header_timeout) it is opened again;
* **deflate bombs**: STOW-RS of 4 parts in Deflated Explicit VR Little Endian, ``--bomb-mb``
  (500) MB of zeros inflated each, about 2 MB on the wire, one after the other;
* **wildcard queries**: ``*?*?*?*?*?*?*?*?*?*?*?*?x`` and ``*a*a*a*a*a*a*a*b`` against 64-character
  values, in the store and through dcmqrscp;
* **frame lists**: ``…/frames/1,1,1,…`` (2,000 times).

Every loop is bounded by the attack's duration and stops by itself. Measured: the normal client's
latencies before and during the attack (p50/p95/max), the gateway's peak RSS (VmHWM) and RSS over
time, every response's status (no 5xx anywhere), what each attack got back, the machine's load
average. Targets: p95 during ≤ 2 × before, peak RSS ≤ 300 MB, 0 responses 5xx. The last line is
one JSON object with the figures, the targets and "met".

    python tools/bench/hostile.py [--baseline 30] [--attack 60] [--slow-clients 1000] [--attacks slow,bombs,...]
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import selectors
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from io import BytesIO
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_dataset, write_file_meta_info  # noqa: E402
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid  # noqa: E402

from gateway import log, vm  # noqa: E402  (tools/bench/gateway.py)
from omi_dsf.dicomweb.multipart import dicom_body  # noqa: E402
from omi_dsf.testkit.gateway import GatewayProcess  # noqa: E402
from omi_dsf.testkit.legacy_pacs import Dcmqrscp  # noqa: E402
from omi_dsf.testkit.phantom import cached_ct_study  # noqa: E402
from omi_dsf.testkit.procs import free_port  # noqa: E402

TARGETS = {"p95_ratio_max": 2.0, "peak_rss_mb_max": 300.0, "responses_5xx_max": 0}
WILDCARDS = [("/series", {"InstitutionName": "*?*?*?*?*?*?*?*?*?*?*?*?x"}),
             ("/studies", {"StudyDescription": "*a*a*a*a*a*a*a*b"}),
             ("/aets/PACS/studies", {"StudyDescription": "*a*a*a*a*a*a*a*b"}),
             ("/aets/PACS/series", {"InstitutionName": "*?*?*?*?*?*?*?*?*?*?*?*?x"})]


class Tally:
    """Statuses and latencies, shared by the threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: dict[str, dict[int, int]] = {}
        self.seconds: dict[str, list[float]] = {}

    def add(self, what: str, status: int, seconds: float) -> None:
        with self.lock:
            by = self.status.setdefault(what, {})
            by[status] = by.get(status, 0) + 1
            self.seconds.setdefault(what, []).append(seconds)

    def merge(self, status: dict, seconds: dict) -> None:
        for what, by in status.items():
            for code, n in by.items():
                self.status.setdefault(what, {})[code] = self.status.get(what, {}).get(code, 0) + n
        for what, values in seconds.items():
            self.seconds.setdefault(what, []).extend(values)

    def count_5xx(self) -> int:
        return sum(n for by in self.status.values() for s, n in by.items() if s >= 500)


def timed(tally: Tally, what: str, call) -> httpx.Response | None:
    t = time.perf_counter()
    try:
        r = call()
    except httpx.HTTPError as exc:      # a transport failure is counted as such, not as a 5xx
        tally.add(what, -1, time.perf_counter() - t)
        log(f"{what}: {type(exc).__name__}")
        return None
    tally.add(what, r.status_code, time.perf_counter() - t)
    return r


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary_ms(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": round(statistics.median(values) * 1000, 2),
            "p95_ms": round(percentile(values, 0.95) * 1000, 2), "max_ms": round(max(values) * 1000, 2)}


# -- what the attackers send ----------------------------------------------------------------------

def deflate_bomb(template: pydicom.Dataset, inflated_mb: int, pieces: int = 1) -> bytes:
    """One instance in Deflated Explicit VR Little Endian holding ``inflated_mb`` MB of zeros,
    compressed as it is made (the bench never holds the inflated data): as one Pixel Data element
    (its declared length gives it away), or as ``pieces`` private OB elements of a few MB each
    (only counting the inflated bytes finds those)."""
    ds = copy.deepcopy(template)
    ds.SOPInstanceUID = generate_uid()
    del ds.PixelData
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [squeeze.compress(head.getvalue())]
    zeros = bytes(1 << 20)
    for i in range(pieces):
        tag = (0x7FE0, 0x0010) if pieces == 1 else (0x0029, 0x1000 + i)
        out.append(squeeze.compress(struct.pack("<HH2sHL", *tag, b"OB", 0, (inflated_mb << 20) // pieces)))
        out += [squeeze.compress(zeros) for _ in range(inflated_mb // pieces)]
    out.append(squeeze.flush())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buf.getvalue() + b"".join(out)


def slow_clients(port: int, n: int, until: float, tally: Tally) -> dict:
    """``n`` connections that send half a request and wait; each one the gateway closes is counted
    (408 or not) and opened again, until ``until``."""
    halves = [b"GET /studies?PatientID=1 HTTP/1.1\r\nHost: x\r\n", b"POST /studies HTTP/1.1\r\nContent-Le", b"GE"]
    sel = selectors.DefaultSelector()
    opened = closed_by_server = answered_408 = refused = 0

    def open_one(i: int) -> None:
        nonlocal opened, refused
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(halves[i % len(halves)])
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, [i, b""])
            opened += 1
        except OSError:
            refused += 1

    for i in range(n):
        open_one(i)
    while time.monotonic() < until:
        for key, _ in sel.select(timeout=0.2):
            try:
                chunk = key.fileobj.recv(4096)
            except OSError:
                chunk = b""
            key.data[1] += chunk
            if chunk:
                continue
            sel.unregister(key.fileobj)
            key.fileobj.close()
            closed_by_server += 1
            if key.data[1].startswith(b"HTTP/1.1 408"):
                answered_408 += 1
            status = int(key.data[1][9:12]) if key.data[1][:5] == b"HTTP/" else -1
            tally.add("slow client", status, 0.0)
            if time.monotonic() < until:
                open_one(key.data[0])
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()
    return {"connections_opened": opened, "closed_by_gateway": closed_by_server, "answered_408": answered_408,
            "connect_failures": refused}


def loop(until: float, step) -> int:
    n = 0
    while time.monotonic() < until:
        step()
        n += 1
    return n


# Each attacker runs in a process of its own at nice 19: attackers are not the normal client's
# threads (sharing its GIL would slow it down on the bench's side), and their own CPU would be on
# other machines (here it would come off the two cores the gateway has). Each returns its tally
# and what it saw.

def attack_bombs(url: str, until: float, bodies: dict) -> tuple:
    tally, outcome = Tally(), {}
    with httpx.Client(base_url=url, timeout=120) as c:
        outcome["bomb_requests"] = loop(until, lambda: [timed(
            tally, f"deflate bomb, {shape}", lambda: c.post("/studies", content=body, headers={"Content-Type": ctype}))
            for shape, (body, ctype) in bodies.items()])
    return tally.status, tally.seconds, outcome


def attack_wildcards(url: str, until: float) -> tuple:
    tally, outcome = Tally(), {}
    with httpx.Client(base_url=url, timeout=120) as c:
        outcome["wildcard_requests"] = loop(until, lambda: [timed(
            tally, f"wildcard {path}", lambda: c.get(path, params=params)) for path, params in WILDCARDS])
    return tally.status, tally.seconds, outcome


def attack_frames(url: str, until: float, path: str) -> tuple:
    tally, outcome = Tally(), {}
    with httpx.Client(base_url=url, timeout=120) as c:
        def one():
            r = timed(tally, "frame list", lambda: c.get(path))
            if r is not None:
                outcome["frame_list_bytes"] = len(r.content)
        outcome["frame_list_requests"] = loop(until, one)
    return tally.status, tally.seconds, outcome


def attack_slowly(port: int, n: int, until: float) -> tuple:
    tally = Tally()
    outcome = slow_clients(port, n, until, tally)
    return tally.status, tally.seconds, outcome


# -- the run --------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=float, default=30.0, help="seconds of the normal client alone")
    ap.add_argument("--attack", type=float, default=60.0, help="seconds of the attack")
    ap.add_argument("--slow-clients", type=int, default=1000)
    ap.add_argument("--bomb-mb", type=int, default=500)
    ap.add_argument("--slices", type=int, default=20)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--pause", type=float, default=0.02, help="seconds between the normal client's requests")
    ap.add_argument("--attacks", default="slow,bombs,wildcards,frames",
                    help="which attacks, comma-separated (all by default; one alone shows what it costs)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "omi_dsf" / "bench")
    args = ap.parse_args()

    files = cached_ct_study(args.cache, args.slices, 16, args.rows)
    first = pydicom.dcmread(files[0])
    study, series, sop = first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID
    wild = copy.deepcopy(first)
    wild.StudyInstanceUID, wild.SeriesInstanceUID, wild.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    wild.file_meta.MediaStorageSOPInstanceUID = wild.SOPInstanceUID
    wild.StudyDescription, wild.InstitutionName = "a" * 64, "y" * 64
    # the bomb (one element of zeros per part), and one of many 4 MB elements per part
    bombs_sent = {"one element": dicom_body([deflate_bomb(first, args.bomb_mb)] * 4),
                  "many elements": dicom_body([deflate_bomb(first, args.bomb_mb, args.bomb_mb // 4)] * 4)}
    frames = f"/studies/{study}/series/{series}/instances/{sop}/frames/" + ",".join(["1"] * 2000)
    result: dict = {"bench": "hostile-input", "attacks_run": args.attacks, "study_instances": len(files),
                    "slow_clients": args.slow_clients,
                    "bomb_parts": 4, "bomb_inflated_mb_each": args.bomb_mb,
                    "bomb_body_mb": {k: round(len(b) / 1e6, 2) for k, (b, _) in bombs_sent.items()},
                    "load_before": [round(x, 2) for x in os.getloadavg()]}
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="omi-hostile-bench-") as tmp:
        work = Path(tmp)
        (work / "wild.dcm").write_bytes(_encode(wild))
        with Dcmqrscp(work / "pacs") as pacs, GatewayProcess({
                "listen": {"host": "127.0.0.1", "port": free_port()}, "auth": {"anonymous": True},
                "workers": 1,   # one process: its memory is the gateway's, its limits the ones attacked
                "default": "STORE",
                "backends": {"STORE": {"type": "store", "path": str(work / "store")},
                             "PACS": {"type": "dimse", "host": "127.0.0.1", "port": pacs.port,
                                      "called_aet": pacs.aet}}}, work) as gateway:
            pacs.load(files + [work / "wild.dcm"])
            url, pid = gateway.url, gateway.proc.pid
            port = int(url.rsplit(":", 1)[1])
            with httpx.Client(base_url=url, timeout=60) as c:
                body, ctype = dicom_body([f.read_bytes() for f in files] + [(work / "wild.dcm").read_bytes()])
                assert c.post("/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
            log(f"gateway {url} (pid {pid}); {len(files)} + 1 instances in its store and in dcmqrscp; "
                f"bomb bodies {result['bomb_body_mb']} MB; VmRSS {vm(pid, 'VmRSS'):.0f} MB")

            def normal_client(seconds: float, what: str) -> None:
                until = time.monotonic() + seconds
                with httpx.Client(base_url=url, timeout=60) as c:
                    while time.monotonic() < until:
                        timed(tally, what, lambda: c.get(f"/studies/{study}/instances"))
                        time.sleep(args.pause)
                        timed(tally, what, lambda: c.get(f"/studies/{study}/series/{series}/instances/{sop}"))
                        time.sleep(args.pause)

            normal_client(args.baseline, "normal before")
            log(f"baseline: {summary_ms(tally.seconds['normal before'])}")

            until = time.monotonic() + args.attack
            rss: list[float] = []
            outcome: dict = {}
            sampler = threading.Thread(target=loop, args=(until, lambda: (rss.append(vm(pid, "VmRSS")), time.sleep(0.25))))
            with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork"), initializer=os.nice,
                                     initargs=(19,)) as pool:
                chosen = set(args.attacks.split(","))
                attacks = [pool.submit(*call) for name, call in (
                    ("slow", (attack_slowly, port, args.slow_clients, until)),
                    ("bombs", (attack_bombs, url, until, bombs_sent)),
                    ("wildcards", (attack_wildcards, url, until)),
                    ("frames", (attack_frames, url, until, frames))) if name in chosen]
                sampler.start()   # (after the fork)
                time.sleep(min(3.0, args.attack / 10))   # the slow clients connect first
                normal_client(until - time.monotonic(), "normal during")
                for attack in attacks:
                    status, seconds, seen = attack.result(timeout=180)
                    tally.merge(status, seconds)
                    outcome.update(seen)
            sampler.join()
            with httpx.Client(base_url=url, timeout=10) as c:
                health = c.get("/health").status_code
                left = c.get(f"/studies/{study}/instances").json()
            hwm = vm(pid, "VmHWM")
    before, during = tally.seconds["normal before"], tally.seconds["normal during"]
    attack_ms = {what: summary_ms(s) for what, s in tally.seconds.items()
                 if what not in ("normal before", "normal during", "slow client")}
    result.update({
        "normal_before": summary_ms(before), "normal_during": summary_ms(during),
        "p95_ratio": round(percentile(during, 0.95) / percentile(before, 0.95), 3),
        "p50_ratio": round(statistics.median(during) / statistics.median(before), 3),
        "gateway_peak_rss_mb": round(hwm, 1), "gateway_rss_during_max_mb": round(max(rss), 1) if rss else None,
        "responses_5xx": tally.count_5xx(), "statuses": {k: dict(sorted(v.items())) for k, v in tally.status.items()},
        "attacks": {**outcome, "latency": attack_ms}, "health_after": health,
        "study_intact": len(left) == len(files), "load_after": [round(x, 2) for x in os.getloadavg()],
        "targets": TARGETS,
    })
    result["met"] = bool(result["p95_ratio"] <= TARGETS["p95_ratio_max"]
                         and hwm <= TARGETS["peak_rss_mb_max"]
                         and result["responses_5xx"] <= TARGETS["responses_5xx_max"]
                         and health == 200 and result["study_intact"])
    log(f"normal client before {result['normal_before']}, during {result['normal_during']}; "
        f"p95 ratio {result['p95_ratio']}; peak RSS {hwm:.0f} MB; 5xx {result['responses_5xx']}")
    print(json.dumps(result))
    return 0


def _encode(ds: pydicom.Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


if __name__ == "__main__":
    sys.exit(main())
