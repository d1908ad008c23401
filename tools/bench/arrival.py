"""Benchmark: the provider's `infer` step reading a study as it arrives vs on the study complete at
the start (issue 22: "the infer step reads the study as it arrives").

One phantom CT study (--slices, default 400, of 512x512), the project's gateway (store backend) as its
own process, the reference AI service as its own process. Interleaved rounds (--repeats):
  complete  the study and its manifest are stored first; then the step runs (one series retrieve)
  arriving  the step starts, then a thread stores the study as the send step does (STOW-RS batches of
            --batch instances, one after the other, as fast as the gateway takes them), the manifest last
Per round: the step's wall time and phases, and when its volume was ready (the bench wraps
build_volume to note the time; the model's time after it is the same either way and, for the
reference model on 400 slices, 15-30 s of noise on a shared machine). The figure: the reading's tail,
from the manifest stored (the send step's end) to the volume ready, against the complete study's
reading, from the step's start to the volume ready: what the request waits for the reading after
the send, without and with reading on arrival. Target: tail <= 0.5 x reading. Note the machine:
sender, gateway, step and service share its cores here; at two sites they would not.

    flock /tmp/omi-bench.lock python tools/bench/arrival.py [--slices 400] [--repeats 3]

Last line: one JSON object with the figures, the target and "met".
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from omi_dsf.dicomweb_client import DicomwebClient  # noqa: E402
from omi_dsf.peer import Peer  # noqa: E402
from omi_dsf.steps import infer as step  # noqa: E402
from omi_dsf.steps.api import StepContext  # noqa: E402
from omi_dsf.testkit import phantom  # noqa: E402
from omi_dsf.testkit.ai_service import AiServiceProcess  # noqa: E402
from omi_dsf.testkit.gateway import GatewayProcess  # noqa: E402
from omi_dsf.testkit.procs import free_port  # noqa: E402
from omi_dsf.transfer import manifest  # noqa: E402

import pydicom  # noqa: E402

TARGET = 0.5


def gateway(folder: Path, name: str) -> GatewayProcess:
    return GatewayProcess({"listen": {"host": "127.0.0.1", "port": free_port()}, "auth": {"anonymous": True},
                           "backends": {"INBOX": {"type": "store", "path": str(folder / name)}}}, folder, name=name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="instances per STOW-RS (the send step's default)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before = open("/proc/loadavg").read().split()[:3]
    with tempfile.TemporaryDirectory(prefix="omi-bench-arrival-") as tmp:
        folder = Path(tmp)
        paths = phantom.write_ct_study(folder / "study", slices=args.slices, seed=7, rows=args.size, cols=args.size)
        study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        data = [p.read_bytes() for p in paths]
        _, listing = manifest.study_manifest([pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True) for d in data],
                                             b"omi-bench-arrival-manifest-key!!", "omi-bench")
        batches = [data[i:i + args.batch] for i in range(0, len(data), args.batch)] + [[listing]]
        inputs = {"pseudonymized-study-instance-uid": study_uid}
        runs: dict[str, list[dict]] = {"complete": [], "arriving": []}
        ready: list[float] = []
        build = step.build_volume

        def noted(*a, **kw):
            volume = build(*a, **kw)
            ready.append(time.monotonic())
            return volume
        step.build_volume = noted
        with AiServiceProcess(log=folder / "ai.log", timeout=180) as ai:
            def ctx(url: str) -> StepContext:
                return StepContext(topic="infer", business_key="bench-arrival", site={
                    "gateway_url": url, "ai_service_url": ai.url, "ai_timeout_s": 900})

            for k in range(args.repeats):
                for mode in (("complete", "arriving") if k % 2 == 0 else ("arriving", "complete")):
                    with gateway(folder, f"gw-{mode}-{k}") as gw:
                        web = DicomwebClient(Peer(gw.url, timeout=300))
                        sent: dict[str, float] = {}
                        if mode == "complete":
                            t0 = time.monotonic()
                            for batch in batches:
                                web.store_instances(batch)
                            sent["stored"] = time.monotonic() - t0
                            t0 = time.monotonic()
                            _, timings = step.infer_timed(inputs, ctx(gw.url))
                            end = time.monotonic()
                            run = {"step": end - t0, "send": sent["stored"], "read": ready[-1] - t0}
                        else:
                            def send() -> None:
                                time.sleep(0.2)   # the step is started first, as the DSF starts it
                                sent["start"] = time.monotonic()
                                for batch in batches:
                                    web.store_instances(batch)
                                sent["end"] = time.monotonic()
                            sender = threading.Thread(target=send)
                            t0 = time.monotonic()
                            sender.start()
                            _, timings = step.infer_timed(inputs, ctx(gw.url))
                            end = time.monotonic()
                            sender.join()
                            run = {"step": end - t0, "send": sent["end"] - sent["start"], "tail": end - sent["end"],
                                   "read_tail": ready[-1] - sent["end"]}
                        web.close()
                    run["phases"] = {p: round(s, 3) for p, s in timings.seconds.items()}
                    runs[mode].append(run)
                    print(f"{mode} round {k + 1}: step {run['step']:.2f} s, send {run['send']:.2f} s"
                          + (f", after the manifest: volume ready in {run['read_tail']:.2f} s, step done in "
                             f"{run['tail']:.2f} s" if "tail" in run else f", volume ready in {run['read']:.2f} s")
                          + f"; {timings.summary()}", file=sys.stderr)
    load_after = open("/proc/loadavg").read().split()[:3]
    read = statistics.median(r["read"] for r in runs["complete"])
    read_tail = statistics.median(r["read_tail"] for r in runs["arriving"])
    ratio = read_tail / read
    print(f"infer's reading (start to volume): {read:.2f} s on the complete study; after the manifest of an "
          f"arriving one: {read_tail:.2f} s; ratio {ratio:.2f} (target <= {TARGET})")
    print(json.dumps({"benchmark": "arrival", "slices": args.slices, "size": args.size, "repeats": args.repeats,
                      "complete_read_s": round(read, 3), "arriving_read_tail_s": round(read_tail, 3),
                      "ratio": round(ratio, 3), "target": TARGET, "met": ratio <= TARGET, "runs": runs,
                      "load_before": load_before, "load_after": load_after, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
