#!/usr/bin/env python3
"""Benchmark: STOW-RS of a CT study into the gateway's embedded store vs storescu into dcmqrscp.

* STOW-RS (curl posting a prepared multipart body, as storescu sends prepared files) of a
  synthetic CT study (`phantom.write_ct_study`, 200 × 512², ≈ 100 MB) into a gateway process
  (`python -m omi_dsf gateway`, `store` backend), interleaved with dcmtk ``storescu`` of the same
  files into dcmqrscp: wall time of each, the gateway's CPU time per STOW and per instance;
* then what reads the stored study: QIDO-RS ``/studies/{S}/instances?includefield=00080018`` and
  WADO-RS of the study (curl), so a cheaper STOW cannot hide a slower read.

Before each STOW the previous run's files are removed (not timed; their index rows stay and are
replaced): a new study is written to new files, and renaming over an existing file makes ext4
flush it first (auto_da_alloc), which costs the gateway ~1 ms per instance that a first STOW of a
study never pays.
The last line printed is one JSON object with the figures, the targets and "met".

    flock /tmp/omi-bench.lock python tools/bench/stow.py [--slices 200] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
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

from omi_dsf.testkit.gateway import GatewayProcess  # noqa: E402
from omi_dsf.testkit.legacy_pacs import Dcmqrscp, dcmtk_tool  # noqa: E402
from omi_dsf.testkit.phantom import cached_ct_study  # noqa: E402
from omi_dsf.testkit.procs import free_port  # noqa: E402

TARGETS = {"stow_over_storescu_max": 2.0}
CLK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def multipart_body(files: list[Path], out: Path) -> str:
    boundary = secrets.token_hex(16)
    with open(out, "wb") as f:
        for p in files:
            f.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            f.write(p.read_bytes())
            f.write(b"\r\n")
        f.write(f"--{boundary}--\r\n".encode())
    return boundary


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def stow(url: str, body: Path, boundary: str, pid: int) -> tuple[float, float]:
    """One STOW-RS by curl: wall seconds, gateway CPU seconds."""
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect:",
            "-H", f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}',
            "--data-binary", f"@{body}", f"{url}/studies"]
    c0, t = cpu_s(pid), time.perf_counter()
    r = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
    wall, cpu = time.perf_counter() - t, cpu_s(pid) - c0
    if r.stdout != "200":
        raise RuntimeError(f"STOW-RS answered {r.stdout}")
    return wall, cpu


def storescu(pacs: Dcmqrscp, files: list[Path]) -> float:
    argv = [dcmtk_tool("storescu"), "-aet", "BENCHSCU", "-aec", pacs.aet, "-nh", pacs.host, str(pacs.port),
            *map(str, files)]
    t = time.perf_counter()
    r = subprocess.run(argv, env=dict(os.environ, TCP_NODELAY="1"), capture_output=True, text=True, timeout=600)
    if r.returncode or "Store Failed" in r.stderr:
        raise RuntimeError(f"storescu failed: {r.stderr[-500:]}")
    return time.perf_counter() - t


def qido_ms(http: httpx.Client, url: str, study: str, n: int, expected: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        r = http.get(f"{url}/studies/{study}/instances", params={"includefield": "00080018"})
        times.append((time.perf_counter() - t) * 1000)
        if r.status_code != 200 or len(r.json()) != expected:
            raise RuntimeError(f"QIDO-RS answered {r.status_code} with {len(r.content)} bytes")
    return statistics.median(times)


def wado_s(url: str, study: str) -> float:
    t = time.perf_counter()
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                        "-H", 'Accept: multipart/related; type="application/dicom"', f"{url}/studies/{study}"],
                       check=True, capture_output=True, text=True, timeout=600)
    if r.stdout != "200":
        raise RuntimeError(f"WADO-RS answered {r.stdout}")
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "omi_dsf" / "bench")
    args = ap.parse_args()

    files = cached_ct_study(args.cache, args.slices, 21, args.rows)
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    mb = sum(f.stat().st_size for f in files) / 1e6
    work = Path(tempfile.mkdtemp(prefix="omi-stow-bench-"))
    try:
        boundary = multipart_body(files, work / "body")
        port = free_port()
        config = {"listen": {"host": "127.0.0.1", "port": port}, "auth": {"anonymous": True},
                  "workers": 1,   # one process: its CPU time is the gateway's
                  "backends": {"STORE": {"type": "store", "path": str(work / "store")}}}
        with GatewayProcess(config, work) as gw, Dcmqrscp(work / "pacs") as pacs:
            pid = gw.proc.pid
            stow(gw.url, work / "body", boundary, pid)   # warm-up: imports, first files
            storescu(pacs, files)
            walls, cpus, scus = [], [], []
            for i in range(args.runs):
                shutil.rmtree(work / "store" / "files" / study, ignore_errors=True)
                w, c = stow(gw.url, work / "body", boundary, pid)
                s = storescu(pacs, files)
                walls.append(w)
                cpus.append(c)
                scus.append(s)
                log(f"run {i + 1}: STOW-RS {w:.3f} s ({c:.2f} s gateway CPU), storescu {s:.3f} s")
            with httpx.Client(timeout=60) as http:
                qido_ms(http, gw.url, study, 3, len(files))
                q = qido_ms(http, gw.url, study, 15, len(files))
            wado = statistics.median(wado_s(gw.url, study) for _ in range(3))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    wall, cpu, scu = statistics.median(walls), statistics.median(cpus), statistics.median(scus)
    ratio = wall / scu
    log(f"{len(files)} instances, {mb:.0f} MB: STOW-RS {wall:.3f} s, storescu {scu:.3f} s, ratio {ratio:.2f}; "
        f"gateway CPU {cpu:.2f} s ({cpu / len(files) * 1000:.2f} ms/instance); QIDO {q:.1f} ms, WADO-RS {wado:.3f} s")
    result = {"bench": "stow-rs", "instances": len(files), "study_mb": round(mb, 1), "runs": args.runs,
              "stow_s": round(wall, 3), "storescu_s": round(scu, 3), "stow_over_storescu": round(ratio, 3),
              "stow_runs_s": [round(x, 3) for x in walls], "storescu_runs_s": [round(x, 3) for x in scus],
              "gateway_cpu_s": round(cpu, 3), "gateway_cpu_ms_per_instance": round(cpu / len(files) * 1000, 2),
              "qido_instances_ms": round(q, 2), "wado_study_s": round(wado, 3), "targets": TARGETS,
              "met": ratio <= TARGETS["stow_over_storescu_max"]}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
