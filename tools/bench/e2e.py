"""One OMI request end to end for a 200-slice CT study, split by step, against moving the same study
once with dcmtk (getscu from the requester's PACS + storescu into a second PACS) on this machine.

Target: the whole round trip, model time excluded, within 3× that raw transfer. Model time is the
reference model's own run on the same volume, measured separately (in process).

    python tools/bench/e2e.py [--dir DIR] [--slices 200] [--size 512]

Uses a DSF test bed running in DIR, else brings one up there (and down afterwards).
Last line: one JSON object with the figures, the targets and "met".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from omi_dsf.demo import Demo  # noqa: E402
from omi_dsf.dicomweb.legacy_pacs import Dcmqrscp, dcmtk_tool  # noqa: E402
from omi_dsf.dsf.client import DsfClient  # noqa: E402
from omi_dsf.inference.lungseg import segment_lungs  # noqa: E402
from omi_dsf.testbed.bed import State, TestBed, free_base_port, pid_alive  # noqa: E402
from omi_dsf.worker.config import load_site_config  # noqa: E402


def ts(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def raw_transfer(demo: Demo, study_uid: str, folder: Path) -> float:
    """getscu of the study from the requester's PACS, then storescu of it into another PACS."""
    env = dict(os.environ, TCP_NODELAY="1")
    out = folder / "getscu"
    out.mkdir()
    with Dcmqrscp(folder / "other-pacs", aet="OTHERPACS") as other:
        t0 = time.monotonic()
        subprocess.run([dcmtk_tool("getscu"), "-S", "-aet", "BENCHSCU", "-aec", demo.pacs.aet, "-od", str(out),
                        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                        demo.pacs.host, str(demo.pacs.port)], check=True, env=env, capture_output=True)
        files = sorted(out.iterdir())
        subprocess.run([dcmtk_tool("storescu"), "-aet", "BENCHSCU", "-aec", other.aet, other.host, str(other.port),
                        *map(str, files)], check=True, env=env, capture_output=True)
        return time.monotonic() - t0


def model_time(files: list[Path]) -> float:
    """The model's own run on the study's volume (what the round trip excludes)."""
    dss = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss]).astype(np.int16)
    t0 = time.monotonic()
    segment_lungs(hu)
    return time.monotonic() - t0


def step_times(demo: Demo, business_key: str) -> dict[str, float]:
    """Per work item: from the DSF opening it to the worker completing it (server timestamps)."""
    out = {}
    for key in ("dic", "ai"):
        with DsfClient(load_site_config(demo.sites[key]).identity) as c:
            for qr in c.search("QuestionnaireResponse", {"status": "completed"}):
                items = {i["linkId"]: i for i in qr.get("item", [])}
                if (items.get("business-key", {}).get("answer") or [{}])[0].get("valueString") != business_key:
                    continue
                first = c.read("QuestionnaireResponse", f"{qr['id']}/_history/1")
                topic = qr["questionnaire"].split("/omi-")[-1].split("|")[0]
                out[topic] = round(ts(qr["meta"]["lastUpdated"]) - ts(first["meta"]["lastUpdated"]), 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=ROOT / "test-artifacts" / "bench-testbed")
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    st = State.load(args.dir)
    bed = None
    if not (st and all(pid_alive(s.pid) for s in st.servers)):
        bed = TestBed(args.dir, base_port=free_base_port(2, start=8400), out=lambda *a: print(*a, file=sys.stderr))
        bed.up(timeout=900)
        st = State.load(args.dir)
    with tempfile.TemporaryDirectory() as tmp:
        demo = Demo(st, Path(tmp) / "demo", slices=args.slices, size=args.size, out=lambda *a: None)
        try:
            demo.start()
            demo.start_workers()
            study = demo.add_study(seed=777)
            mb = sum(f.stat().st_size for f in study.files) / 2**20
            raw = raw_transfer(demo, study.uid, Path(tmp))
            model = model_time(study.files)
            t0 = time.monotonic()
            task_id = demo.submit(study)
            task = demo.wait(task_id, timeout=1800)
            total = time.monotonic() - t0
            if task["status"] != "completed":
                raise SystemExit(f"request failed: {task.get('output')}")
            steps = step_times(demo, demo.business_key(task_id))
        finally:
            demo.stop()
            if bed is not None:
                bed.down()
    ratio = (total - model) / raw
    print(f"study: {args.slices} slices {args.size}x{args.size}, {mb:.0f} MB")
    print(f"raw transfer (getscu + storescu): {raw:.1f} s; model alone: {model:.1f} s")
    print(f"OMI round trip: {total:.1f} s; without the model {total - model:.1f} s = {ratio:.2f}x the raw transfer")
    for step, secs in steps.items():
        print(f"  {step:13s} {secs:6.1f} s")
    print(json.dumps({"benchmark": "e2e", "slices": args.slices, "study_mb": round(mb, 1),
                      "raw_transfer_s": round(raw, 2), "model_s": round(model, 2), "round_trip_s": round(total, 2),
                      "steps_s": steps, "ratio_round_trip_without_model_vs_raw": round(ratio, 2),
                      "targets": {"ratio_max": 3.0}, "met": ratio <= 3.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
