#!/usr/bin/env python3
"""Benchmark: the DICOMweb gateway vs raw DIMSE on the same dcmqrscp, side by side in one run.

* WADO-RS study retrieval through the gateway (read by curl, discarding, as ``getscu --ignore``
  discards) vs dcmtk ``getscu --ignore`` of the same study: throughput and ratio; also the time
  with a Python client (httpx) and of an in-process pynetdicom C-GET, for reference;
* QIDO-RS study search vs a direct C-FIND from this process: added latency;
* the send step's up-front listing of the big study (``WadoStudySource.uids``: instance-level
  QIDO-RS, UIDs only, ``includedefaults=false``) vs the same search with the default return keys,
  which dcmqrscp lacks and the gateway fills from a C-GET of the study (a backend that keeps no
  headers, as at a study's first listing); interleaved, ratio (target <= 0.5);
* the gateway's peak memory (VmHWM) while it streams a small and the big study: must not grow
  with study size;
* 8 concurrent clients (QIDO + WADO-RS of the small study): no errors;
* aggregate throughput: 4 concurrent curl clients retrieving the big study through the gateway at
  workers=1 and at workers=N (N: the gateway's default for this machine, at least 2) vs 4
  concurrent ``getscu --ignore`` of the same study, interleaved; ratio gateway MB/s / getscu MB/s
  (target >= 0.8 at workers=N), with the load average before and after;
* transcoding: WADO-RS of a JPEG-Lossless-stored study asked for uncompressed
  (``transfer-syntax=1.2.840.10008.1.2.1``), the gateway's store vs Orthanc's DICOMweb plugin on
  the same files, both read by curl: ratio Orthanc time / gateway time (target >= 1.0);
* series metadata of the big study through the gateway over dcmqrscp (its headers held after a
  first request; and, for reference, with a C-GET each time) vs Orthanc's DICOMweb plugin
  holding the same files: ratio gateway time / Orthanc time (target <= 1.5).

The gateway runs as its own process (``python -m omi_dsf gateway --config``), so its memory is
its own. The last line printed is one JSON object with the figures, the targets and "met".

    python tools/bench/gateway.py                 # 500 CT slices 512x512 (~260 MB), a few minutes
    python tools/bench/gateway.py --slices 100 --transcode-slices 50   # quicker
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE, StoragePresentationContexts, build_role, evt  # noqa: E402
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,  # noqa: E402
                                  StudyRootQueryRetrieveInformationModelGet)

from omi_dsf.deid.dicomweb_io import LIST_PAGE, WadoStudySource  # noqa: E402
from omi_dsf.dicomweb.config import parse_config  # noqa: E402
from omi_dsf.dicomweb_client import DicomwebClient  # noqa: E402
from omi_dsf.peer import Peer  # noqa: E402
from omi_dsf.testkit.gateway import GatewayProcess  # noqa: E402
from omi_dsf.dicomweb.multipart import dicom_body  # noqa: E402
from omi_dsf.testkit.conformance import jpeg_lossless  # noqa: E402
from omi_dsf.testkit.legacy_pacs import Dcmqrscp, Orthanc, dcmtk_tool  # noqa: E402
from omi_dsf.testkit.phantom import cached_ct_study  # noqa: E402
from omi_dsf.testkit.procs import free_port  # noqa: E402

TARGETS = {"throughput_ratio_min": 0.8, "aggregate_ratio_min": 0.8, "qido_added_ms_max": 5.0, "memory_growth_mb_max": 64.0,
           "concurrent_errors_max": 0, "transcode_ratio_min": 1.0, "metadata_ratio_max": 1.5,
           "listing_ratio_max": 0.5}
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def vm(pid: int, key: str) -> float:
    """VmHWM / VmRSS of a process in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wado_study(url: str, study: str, client: httpx.Client | None = None) -> tuple[int, int]:
    """Stream a study, count bytes and parts without keeping them."""
    c = client or httpx.Client(timeout=120)
    try:
        with c.stream("GET", f"{url}/studies/{study}",
                      headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
            r.raise_for_status()
            marker = b"--" + r.headers["content-type"].split("boundary=")[1].split(";")[0].strip().encode() + b"\r\n"
            size = parts = 0
            tail = b""
            for chunk in r.iter_raw(1 << 20):
                size += len(chunk)
                window = tail + chunk
                parts += window.count(marker)
                tail = window[-(len(marker) - 1):]
                parts -= tail.count(marker)  # never, as tail is shorter than the marker
            return size, parts
    finally:
        if client is None:
            c.close()


def curl_study(url: str, study: str) -> tuple[float, int]:
    """WADO-RS with curl (a native client, as getscu is): seconds and bytes."""
    t = time.perf_counter()
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                        "-H", 'Accept: multipart/related; type="application/dicom"', f"{url}/studies/{study}"],
                       check=True, capture_output=True, text=True, timeout=600)
    secs = time.perf_counter() - t
    code, size = r.stdout.split()
    if code != "200":
        raise RuntimeError(f"WADO-RS answered {code}")
    return secs, int(size)


def curl_transcoded(url: str, study: str) -> tuple[float, int]:
    """WADO-RS of a study asked for in Explicit VR Little Endian, read by curl: seconds and bytes."""
    t = time.perf_counter()
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "-H",
                        f'Accept: multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}',
                        f"{url}/studies/{study}"], check=True, capture_output=True, text=True, timeout=600)
    secs = time.perf_counter() - t
    code, size = r.stdout.split()
    if code != "200":
        raise RuntimeError(f"WADO-RS of {url} answered {code}")
    return secs, int(size)


def curl_metadata(url: str, study: str, series: str) -> float:
    """Series metadata (WADO-RS, DICOM JSON) read by curl: seconds."""
    t = time.perf_counter()
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Accept: application/dicom+json",
                        f"{url}/studies/{study}/series/{series}/metadata"], check=True, capture_output=True,
                       text=True, timeout=600)
    if r.stdout != "200":
        raise RuntimeError(f"series metadata of {url} answered {r.stdout}")
    return time.perf_counter() - t


def series_metadata(url: str, work: Path, files: list[Path], runs: int) -> dict:
    """Series metadata of the same study: the gateway over dcmqrscp with the study's headers held
    (LEGACYPACS, after one request) and without (COLD: summary_ttl 0, one C-GET per request) vs
    Orthanc's DICOMweb plugin holding the same files; interleaved, medians."""
    head = dcmread(files[0], stop_before_pixels=True)
    study, series = head.StudyInstanceUID, head.SeriesInstanceUID
    with Orthanc(work / "orthanc-meta") as orthanc:
        orthanc.load(files)
        theirs_url = orthanc.dicomweb_url
        curl_metadata(url, study, series)   # warm-up: the headers are fetched once
        curl_metadata(theirs_url, study, series)
        warm, cold, theirs = [], [], []
        for _ in range(runs):
            warm.append(curl_metadata(url, study, series))
            cold.append(curl_metadata(url + "/aets/COLD", study, series))
            theirs.append(curl_metadata(theirs_url, study, series))
    w, c, o = map(statistics.median, (warm, cold, theirs))
    log(f"series metadata ({len(files)} instances): gateway {w * 1000:.0f} ms (headers held), {c * 1000:.0f} ms "
        f"(C-GET each time); Orthanc {o * 1000:.0f} ms")
    return {"metadata_instances": len(files), "metadata_gateway_s": round(w, 3), "metadata_gateway_cold_s": round(c, 3),
            "metadata_orthanc_s": round(o, 3), "metadata_ratio": round(w / o, 3), "metadata_cold_ratio": round(c / o, 3)}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and all its descendants still running."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo += [child for child, (parent, _) in stats.items() if parent == p]
    return total


def lossless_study(cache: Path, slices: int, rows: int) -> list[Path]:
    """A CT study in JPEG Lossless (dcmcjpeg), cached next to the uncompressed one."""
    source = cached_ct_study(cache, slices, 13, rows)
    target = cache / f"jpeg-lossless-{slices}-{rows}"
    done = sorted(target.glob("*.dcm")) if target.exists() else []
    if len(done) == len(source):
        return done
    return jpeg_lossless(source, target)


def transcoding(gateway_url: str, gateway_pid: int, work: Path, files: list[Path], runs: int) -> dict:
    """The gateway's store vs Orthanc, each holding ``files``, asked for them uncompressed."""
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with Orthanc(work / "orthanc") as orthanc, httpx.Client(timeout=120) as http:
        for f in files:
            http.post(orthanc.url + "/instances", content=f.read_bytes()).raise_for_status()
        for i in range(0, len(files), 20):
            body, ctype = dicom_body(f.read_bytes() for f in files[i:i + 20])
            http.post(f"{gateway_url}/aets/STORE/studies", content=body,
                      headers={"Content-Type": ctype}).raise_for_status()
        ours_url, theirs_url = f"{gateway_url}/aets/STORE", orthanc.dicomweb_url
        curl_transcoded(ours_url, study)   # warm-up: caches, imports
        curl_transcoded(theirs_url, study)
        ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
        for i in range(runs):
            cpu = cpu_seconds(gateway_pid)
            secs, size_ours = curl_transcoded(ours_url, study)
            ours.append(secs)
            ours_cpu.append(cpu_seconds(gateway_pid) - cpu)
            cpu = cpu_seconds(orthanc.proc.pid)
            secs, size_theirs = curl_transcoded(theirs_url, study)
            theirs.append(secs)
            theirs_cpu.append(cpu_seconds(orthanc.proc.pid) - cpu)
            assert abs(size_ours - size_theirs) < 0.05 * size_theirs, (size_ours, size_theirs)
            log(f"transcoding run {i + 1}: gateway {ours[-1]:.2f} s ({ours_cpu[-1]:.2f} s CPU), Orthanc "
                f"{theirs[-1]:.2f} s ({theirs_cpu[-1]:.2f} s CPU) ({size_ours / 1e6:.0f} MB uncompressed)")
    g, o = statistics.median(ours), statistics.median(theirs)
    return {"transcode_instances": len(files), "transcode_gateway_s": round(g, 3),
            "transcode_orthanc_s": round(o, 3), "transcode_ratio": round(o / g, 3),
            "transcode_gateway_cpu_s": round(statistics.median(ours_cpu), 3),
            "transcode_orthanc_cpu_s": round(statistics.median(theirs_cpu), 3)}


def getscu(pacs: Dcmqrscp, study: str) -> float:
    argv = [dcmtk_tool("getscu"), "-S", "--ignore", "-aet", "BENCHSCU", "-aec", pacs.aet,
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", pacs.host, str(pacs.port)]
    t = time.perf_counter()
    subprocess.run(argv, check=True, env=dict(os.environ, TCP_NODELAY="1"), capture_output=True, timeout=600)
    return time.perf_counter() - t


def _nodelay(event) -> None:
    import socket
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def pynetdicom_get(pacs: Dcmqrscp, study: str) -> tuple[float, int]:
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for cx in StoragePresentationContexts[:120]:
        ae.add_requested_context(cx.abstract_syntax)
        roles.append(build_role(cx.abstract_syntax, scp_role=True))
    got = [0]

    def on_store(event):
        got[0] += len(event.encoded_dataset())
        return 0x0000

    t = time.perf_counter()
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.aet, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, _nodelay)])
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    for _status, _ in assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet):
        pass
    assoc.release()
    return time.perf_counter() - t, got[0]


def cfind_times(pacs: Dcmqrscp, study: str, n: int) -> tuple[list[float], list[float]]:
    """C-FIND of one study: with a new association each time, and on one open association."""
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    for kw in ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
               "ReferringPhysicianName", "PatientBirthDate", "PatientSex"):
        setattr(ident, kw, "")
    fresh, reused = [], []
    for _ in range(n):
        t = time.perf_counter()
        assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.aet, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
        if not assoc.is_established:
            raise RuntimeError(f"C-FIND association refused by dcmqrscp ({pacs.association_processes()} "
                               f"associations open):\n{pacs.log_tail()}")
        list(assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind))
        assoc.release()
        fresh.append((time.perf_counter() - t) * 1000)
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.aet, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    for _ in range(n):
        t = time.perf_counter()
        list(assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind))
        reused.append((time.perf_counter() - t) * 1000)
    assoc.release()
    return fresh, reused


def qido_times(url: str, study: str, n: int) -> list[float]:
    out = []
    with httpx.Client(timeout=30) as c:
        for _ in range(n):
            t = time.perf_counter()
            r = c.get(f"{url}/studies", params={"StudyInstanceUID": study},
                      headers={"Accept": "application/dicom+json"})
            r.raise_for_status()
            assert len(r.json()) == 1
            out.append((time.perf_counter() - t) * 1000)
    return out


def listing_times(url: str, study: str, instances: int, n: int) -> tuple[list[float], list[float]]:
    """The send step's listing (UIDs only) and the same search with the default keys, interleaved."""
    uids_only, defaults = [], []
    for _ in range(n):
        source = WadoStudySource(DicomwebClient(Peer(url, timeout=120)), study)
        t = time.perf_counter()
        found = source.uids()
        uids_only.append(time.perf_counter() - t)
        source.dicomweb.close()
        with DicomwebClient(Peer(url, timeout=120)) as c:
            t = time.perf_counter()
            items = c.search_for_instances(study, fields=["0020000E", "00080018"], limit=LIST_PAGE)
            defaults.append(time.perf_counter() - t)
        assert len(items) == min(instances, LIST_PAGE) and "00280010" in items[0], "the defaults were not filled"
        assert instances > LIST_PAGE or found == {str(v) for i in items for tag in ("0020000D", "0020000E", "00080018")
                                                  for v in i[tag]["Value"]}, "the listing differs"
    return uids_only, defaults


def concurrent_clients(url: str, study: str, expected_parts: int, clients: int) -> tuple[int, float, list[str]]:
    errors: list[str] = []

    def one(_i):
        try:
            with httpx.Client(timeout=300) as c:
                r = c.get(f"{url}/studies", params={"StudyInstanceUID": study})
                if r.status_code != 200 or len(r.json()) != 1:
                    return f"QIDO {r.status_code}"
                _, parts = wado_study(url, study, c)
                if parts != expected_parts:
                    return f"WADO parts {parts} != {expected_parts}"
        except Exception as exc:  # noqa: BLE001 - counted as an error
            return f"{type(exc).__name__}: {exc}"
        return None

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        for result in pool.map(one, range(clients)):
            if result:
                errors.append(result)
    return len(errors), time.perf_counter() - t, errors[:5]


def aggregate(pacs: Dcmqrscp, urls: dict[str, str], study: str, study_mb: float, clients: int,
              runs: int) -> dict:
    """``clients`` concurrent retrievals of ``study`` by each way in ``urls`` (gateway URLs) and by
    getscu, interleaved: the median aggregate MB/s of each, and the ratios to getscu's."""
    ways = {name: (lambda u=u: curl_study(u, study)[0]) for name, u in urls.items()}
    ways["getscu"] = lambda: getscu(pacs, study)
    walls: dict[str, list[float]] = {name: [] for name in ways}
    load_before = os.getloadavg()[0]
    for i in range(runs):
        for name, fn in ways.items():
            t = time.perf_counter()
            with cf.ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda _: fn(), range(clients)))
            walls[name].append(time.perf_counter() - t)
        log(f"aggregate run {i + 1}: " + ", ".join(f"{n} {clients * study_mb / w[-1]:.0f} MB/s"
                                                   for n, w in walls.items()))
    rate = {name: clients * study_mb / statistics.median(w) for name, w in walls.items()}
    out = {"aggregate_clients": clients, "aggregate_load_before": round(load_before, 2),
           "aggregate_load_after": round(os.getloadavg()[0], 2)}
    for name, r in rate.items():
        out[f"aggregate_{name}_mb_per_s"] = round(r, 1)
        if name != "getscu":
            out[f"aggregate_ratio_{name}"] = round(r / rate["getscu"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=500)
    ap.add_argument("--small", type=int, default=50, help="slices of the small study (memory, concurrency)")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--aggregate-clients", type=int, default=4)
    ap.add_argument("--aggregate-runs", type=int, default=3)
    ap.add_argument("--only-aggregate", action="store_true", help="only the aggregate-throughput part")
    ap.add_argument("--transcode-slices", type=int, default=100,
                    help="slices of the JPEG Lossless study for the transcoding comparison")
    ap.add_argument("--transcode-runs", type=int, default=5)
    ap.add_argument("--listing-runs", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "omi_dsf" / "bench")
    args = ap.parse_args()

    big = cached_ct_study(args.cache, args.slices, 11, args.rows)
    small = cached_ct_study(args.cache, args.small, 12, args.rows)
    big_uid, small_uid = dcmread(big[0]).StudyInstanceUID, dcmread(small[0]).StudyInstanceUID
    lossless = [] if args.only_aggregate else lossless_study(args.cache, args.transcode_slices, args.rows)
    big_mb = sum(f.stat().st_size for f in big) / 1e6
    work = Path(tempfile.mkdtemp(prefix="omi-gw-bench-"))
    gateway = many = None
    result: dict = {"bench": "dicomweb-gateway", "study_instances": len(big), "study_mb": round(big_mb, 1)}
    try:
        move_port = free_port()
        with Dcmqrscp(work / "pacs", max_pdu=65536, move_destinations={"OMIGW": ("127.0.0.1", move_port)}) as pacs:
            t = time.monotonic()
            pacs.load(big + small)
            log(f"loaded {len(big) + len(small)} files into dcmqrscp in {time.monotonic() - t:.1f} s")
            # workers=N: no C-MOVE destination (one listener), C-GET only
            n_workers = max(2, parse_config({"auth": {"anonymous": True}}).worker_count)
            many = GatewayProcess({
                "listen": {"host": "127.0.0.1", "port": free_port()}, "auth": {"anonymous": True},
                "workers": n_workers, "default": "LEGACYPACS",
                "backends": {"LEGACYPACS": {"type": "dimse", "host": "127.0.0.1", "port": pacs.port}}},
                work, name="gateway-workers").start()
            gateway = GatewayProcess({
                "listen": {"host": "127.0.0.1", "port": free_port()}, "auth": {"anonymous": True},
                "workers": 1,
                "dimse": {"calling_aet": "OMIGW", "move_destination": {"aet": "OMIGW", "port": move_port}},
                "default": "LEGACYPACS",
                "backends": {"LEGACYPACS": {"type": "dimse", "host": "127.0.0.1", "port": pacs.port},
                             "MOVEPACS": {"type": "dimse", "host": "127.0.0.1", "port": pacs.port,
                                          "called_aet": "LEGACYPACS", "retrieve": "move"},
                             "COLD": {"type": "dimse", "host": "127.0.0.1", "port": pacs.port,
                                      "called_aet": "LEGACYPACS", "summary_ttl": 0},
                             "STORE": {"type": "store", "path": str(work / "store")}}}, work).start()
            url = gateway.url
            curl_study(many.url, big_uid)   # warm-up
            agg = aggregate(pacs, {"workers_1": url, f"workers_{n_workers}": many.url}, big_uid, big_mb,
                            args.aggregate_clients, args.aggregate_runs)
            agg.update({"aggregate_workers": n_workers,
                        "aggregate_ratio": agg[f"aggregate_ratio_workers_{n_workers}"]})
            result.update(agg)
            log(f"aggregate, {args.aggregate_clients} clients: {json.dumps(agg)}")
            if args.only_aggregate:
                result.update({"load_avg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
                               "targets": {"aggregate_ratio_min": TARGETS["aggregate_ratio_min"]},
                               "met": agg["aggregate_ratio"] >= TARGETS["aggregate_ratio_min"]})
                print(json.dumps(result))
                return 0

            # memory: peak RSS after warm-up, after the small study, after the big one
            qido_times(url, small_uid, 3)
            hwm0 = vm(gateway.proc.pid, "VmHWM")
            size_small, parts_small = wado_study(url, small_uid)
            hwm_small = vm(gateway.proc.pid, "VmHWM")
            size_big, parts_big = wado_study(url, big_uid)
            hwm_big = vm(gateway.proc.pid, "VmHWM")
            assert parts_small == len(small) and parts_big == len(big), (parts_small, parts_big)
            log(f"gateway VmHWM: {hwm0:.0f} MB idle, {hwm_small:.0f} MB after {len(small)} instances, "
                f"{hwm_big:.0f} MB after {len(big)} instances")

            # throughput, interleaved runs; curl and getscu are both native clients that discard
            gw_s, py_s, get_s, pnd_s, mv_s = [], [], [], [], []
            for i in range(args.runs):
                secs, size = curl_study(url, big_uid)
                gw_s.append(secs)
                assert size >= size_big * 0.99, (size, size_big)
                t = time.perf_counter()
                _, parts = wado_study(url, big_uid)
                py_s.append(time.perf_counter() - t)
                assert parts == len(big)
                get_s.append(getscu(pacs, big_uid))
                secs, _ = pynetdicom_get(pacs, big_uid)
                pnd_s.append(secs)
                secs, size = curl_study(url + "/aets/MOVEPACS", big_uid)
                assert size >= size_big * 0.99, (size, size_big)
                mv_s.append(secs)
                log(f"run {i + 1}: gateway WADO-RS {gw_s[-1]:.2f} s (curl), {py_s[-1]:.2f} s (httpx client), "
                    f"{mv_s[-1]:.2f} s (by C-MOVE); getscu {get_s[-1]:.2f} s; pynetdicom C-GET {pnd_s[-1]:.2f} s")
            gw_t, py_t, get_t, pnd_t, mv_t = map(statistics.median, (gw_s, py_s, get_s, pnd_s, mv_s))

            # QIDO vs C-FIND
            qido_times(url, big_uid, 3)
            q = statistics.median(qido_times(url, big_uid, args.queries))
            fresh, reused = cfind_times(pacs, big_uid, args.queries)
            f_fresh, f_reused = statistics.median(fresh), statistics.median(reused)
            log(f"QIDO-RS {q:.1f} ms; C-FIND {f_fresh:.1f} ms (new association), {f_reused:.1f} ms (open one)")
            lst_new, lst_old = map(statistics.median, listing_times(url + "/aets/COLD", big_uid, len(big),
                                                                    args.listing_runs))
            log(f"the send step's listing of {len(big)} instances: {lst_new:.3f} s (UIDs only); "
                f"{lst_old:.3f} s with the default keys (filled from a C-GET of the study)")

            n_err, conc_s, samples = concurrent_clients(url, small_uid, len(small), args.clients)
            log(f"{args.clients} concurrent clients: {n_err} errors in {conc_s:.1f} s {samples}")
            hwm_end = vm(gateway.proc.pid, "VmHWM")

            meta = series_metadata(url, work, big, args.transcode_runs)
            transcoded = transcoding(url, gateway.proc.pid, work, lossless, args.transcode_runs)
            log(f"transcoding {len(lossless)} JPEG Lossless slices to uncompressed: gateway "
                f"{transcoded['transcode_gateway_s']:.2f} s, Orthanc {transcoded['transcode_orthanc_s']:.2f} s")

        result.update({
            "gateway_wado_s": round(gw_t, 3), "gateway_wado_httpx_client_s": round(py_t, 3),
            "gateway_wado_by_cmove_s": round(mv_t, 3), "getscu_s": round(get_t, 3), "pynetdicom_get_s": round(pnd_t, 3),
            "gateway_mb_per_s": round(big_mb / gw_t, 1), "getscu_mb_per_s": round(big_mb / get_t, 1),
            "throughput_ratio": round(get_t / gw_t, 3),
            "time_ratio": round(gw_t / get_t, 3),
            "qido_ms": round(q, 2), "cfind_new_association_ms": round(f_fresh, 2),
            "cfind_open_association_ms": round(f_reused, 2),
            "qido_added_ms": round(q - f_fresh, 2), "qido_added_vs_open_association_ms": round(q - f_reused, 2),
            "listing_uids_only_s": round(lst_new, 3), "listing_with_defaults_s": round(lst_old, 3),
            "listing_ratio": round(lst_new / lst_old, 3),
            "gateway_hwm_idle_mb": round(hwm0, 1), "gateway_hwm_small_mb": round(hwm_small, 1),
            "gateway_hwm_big_mb": round(hwm_big, 1), "gateway_hwm_after_concurrency_mb": round(hwm_end, 1),
            "memory_growth_mb": round(hwm_big - hwm_small, 1), "small_instances": len(small),
            "concurrent_clients": args.clients, "concurrent_errors": n_err, "concurrent_s": round(conc_s, 2),
            **meta, **transcoded, "load_avg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
            "targets": TARGETS,
        })
        result["met"] = bool(result["throughput_ratio"] >= TARGETS["throughput_ratio_min"]
                             and result["aggregate_ratio"] >= TARGETS["aggregate_ratio_min"]
                             and result["qido_added_ms"] <= TARGETS["qido_added_ms_max"]
                             and result["memory_growth_mb"] <= TARGETS["memory_growth_mb_max"]
                             and n_err <= TARGETS["concurrent_errors_max"]
                             and result["transcode_ratio"] >= TARGETS["transcode_ratio_min"]
                             and result["metadata_ratio"] <= TARGETS["metadata_ratio_max"]
                             and result["listing_ratio"] <= TARGETS["listing_ratio_max"])
    finally:
        for g in (gateway, many):
            if g is not None:
                g.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
