"""One OMI request end to end for a 200-slice CT study, split by step, against moving the same study
once with dcmtk (getscu from the requester's PACS + storescu into a second PACS) on this machine.

Target: the whole round trip, model time excluded, within 3× that raw transfer. Model time is what
the AI service reports for this request (model_time_ms); the model's run in this process on the
same volume is printed beside it (and used if the service reported nothing).

Beside it, what the DSF alone costs: the same request through the same sites with workers whose
steps answer at once and move no data (`worker --demo`), as a ratio to the same raw transfer.

    python tools/bench/e2e.py [--dir DIR] [--slices 200] [--size 512] [--dsf-home PATH ...]

Uses a DSF test bed running in DIR, else brings one up there (and down afterwards). With several
--dsf-home, one test bed per DSF version in DIR/<version>, measured one after the other in this run,
and each later version's figures as a ratio to the first's.
Last line: one JSON object with the figures, the targets and "met".
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import re
import statistics
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
from omi_dsf.dsf.client import DsfClient  # noqa: E402
from omi_dsf.dsf.workitem import ANSWERED  # noqa: E402
from omi_dsf.inference.lungseg import segment_lungs  # noqa: E402
from omi_dsf.testbed.bed import running_testbed  # noqa: E402
from omi_dsf.testbed.distribution import Distribution  # noqa: E402
from omi_dsf.testkit.legacy_pacs import Dcmqrscp, dcmtk_tool  # noqa: E402
from omi_dsf.worker.config import load_site_config  # noqa: E402


def ts(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def raw_transfer(demo: Demo, study_uid: str, folder: Path, runs: int = 3) -> float:
    """getscu of the study from the requester's PACS, then storescu of it into another PACS; the
    median of `runs` (one run varies by half on two shared cores)."""
    env = dict(os.environ, TCP_NODELAY="1")
    times = []
    with Dcmqrscp(folder / "other-pacs", aet="OTHERPACS") as other:
        for n in range(runs):
            out = folder / f"getscu-{n}"
            out.mkdir()
            t0 = time.monotonic()
            subprocess.run([dcmtk_tool("getscu"), "-S", "-aet", "BENCHSCU", "-aec", demo.pacs.aet, "-od", str(out),
                            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                            demo.pacs.host, str(demo.pacs.port)], check=True, env=env, capture_output=True)
            files = sorted(out.iterdir())
            subprocess.run([dcmtk_tool("storescu"), "-aet", "BENCHSCU", "-aec", other.aet, other.host,
                            str(other.port), *map(str, files)], check=True, env=env, capture_output=True)
            times.append(time.monotonic() - t0)
    return statistics.median(times)


def step_phases(demo: Demo, business_key: str) -> dict[str, str]:
    """What each worker logged about where a step's time went ("<step> <key>: timings …")."""
    out = {}
    for log in (demo.folder / "dic-worker.log", demo.folder / "ai-worker.log"):
        text = log.read_text(errors="replace") if log.exists() else ""
        for step, phases in re.findall(rf"(\w+) {re.escape(business_key)}: timings (.*)", text):
            out[step] = phases.strip()
    return out


def service_model_time(phases: dict[str, str]) -> float | None:
    """The model's own time in this request, as the AI service reported it to the infer step."""
    found = re.search(r"\bmodel ([0-9.]+) s", phases.get("infer", ""))
    return float(found.group(1)) if found else None


def dsf_floor(demo: Demo, study, runs: int = 3) -> tuple[float, float]:
    """The same request through the same two DSF sites with workers whose steps answer at once and
    move no data (the worker command's --demo handler): what the DSF alone costs one request, with
    the workers' settle time as deployed. Median of `runs` round trips, and of their time between
    work items (BPE, messages, pickup)."""
    demo.start_workers(no_op=True)
    totals, between = [], []
    try:
        for _ in range(runs):
            task_id = demo.submit(study)
            task = demo.wait(task_id, timeout=300)
            if task["status"] != "completed":
                raise SystemExit(f"no-op request failed: {task.get('output')}")
            steps, events = timeline(demo, demo.business_key(task_id), task_id)
            ends = [t for t, what in events if what.startswith("dic: Task startOmiInference ")]
            totals.append(max(ends) - min(ends))
            between.append(totals[-1] - sum(steps.values()))
    finally:
        demo.stop_process("dic-worker")
        demo.stop_process("ai-worker")
    return statistics.median(totals), statistics.median(between)


def model_time(files: list[Path]) -> float:
    """The model's own run on the study's volume (what the round trip excludes)."""
    dss = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss]).astype(np.int16)
    t0 = time.monotonic()
    segment_lungs(hu)
    return time.monotonic() - t0


def _business_key(resource: dict) -> str | None:
    for item in resource.get("item", []):          # QuestionnaireResponse
        if item.get("linkId") == "business-key":
            return (item.get("answer") or [{}])[0].get("valueString")
    for inp in resource.get("input", []):          # Task
        if inp["type"]["coding"][0]["code"] == "business-key":
            return inp.get("valueString")
    return None


def timeline(demo: Demo, business_key: str, start_task_id: str) -> tuple[dict[str, float], list[tuple[float, str]]]:
    """Server timestamps of the request: each work item opened and answered, each Task created and
    ended. Returns the steps (opened → answered) and the events in order, seconds after the start."""
    steps, events = {}, []
    for key in ("dic", "ai"):
        with DsfClient(load_site_config(demo.sites[key]).identity) as c:
            # answered: the version a worker completed (DSF 2.x sets it amended later, when its BPE took it)
            answered_items = [qr for status in ANSWERED for qr in c.search("QuestionnaireResponse", {"status": status})]
            for qr in answered_items:
                if _business_key(qr) != business_key:
                    continue
                versions = c.history("QuestionnaireResponse", qr["id"])
                topic = qr["questionnaire"].split("/omi-")[-1].split("|")[0]
                done = next((v for v in versions if v.get("status") == "completed"), qr)
                opened, answered = ts(versions[0]["meta"]["lastUpdated"]), ts(done["meta"]["lastUpdated"])
                steps[topic] = round(answered - opened, 2)
                events += [(opened, f"{key}: {topic} opened"), (answered, f"{key}: {topic} answered")]
            for task in itertools.islice(c.search("Task", {"_sort": "-_lastUpdated"}), 100):
                if _business_key(task) != business_key and task.get("id") != start_task_id:
                    continue
                name = next((i.get("valueString") for i in task.get("input", [])
                             if i["type"]["coding"][0]["code"] == "message-name"), task["id"])
                versions = c.history("Task", task["id"])
                events.append((ts(versions[0]["meta"]["lastUpdated"]), f"{key}: Task {name} created"))
                events.append((ts(task["meta"]["lastUpdated"]), f"{key}: Task {name} {task['status']}"))
    events.sort()
    t0 = events[0][0] if events else 0.0
    return steps, [(round(t - t0, 2), what) for t, what in events]


def measure(st, slices: int, size: int) -> dict:
    """One request end to end on the test bed `st`, the raw transfer and the DSF-alone figure."""
    with tempfile.TemporaryDirectory() as tmp:
        demo = Demo(st, Path(tmp) / "demo", slices=slices, size=size, out=lambda *a: None)
        try:
            demo.start()
            study = demo.add_study(seed=777)
            mb = sum(f.stat().st_size for f in study.files) / 2**20
            raw = raw_transfer(demo, study.uid, Path(tmp))
            floor, floor_between = dsf_floor(demo, study)
            demo.start_workers()
            model = model_time(study.files)
            t0 = time.monotonic()
            task_id = demo.submit(study)
            task = demo.wait(task_id, timeout=1800)
            client_wall = time.monotonic() - t0
            if task["status"] != "completed":
                raise SystemExit(f"request failed: {task.get('output')}")
            steps, events = timeline(demo, demo.business_key(task_id), task_id)
            phases = step_phases(demo, demo.business_key(task_id))
            served_model = service_model_time(phases)
            # the round trip by the requester's DSF: start Task created -> completed (no polling in it)
            ends = [t for t, what in events if what.startswith("dic: Task startOmiInference ")]
            total = max(ends) - min(ends)
        finally:
            demo.stop()
    # the model's time in this very request when the service reported it, else the in-process run
    excluded = served_model if served_model is not None else model
    ratio = (total - excluded) / raw
    dsf = ", ".join(sorted({s.dsf_version for s in st.sites}))
    print(f"== DSF {dsf}")
    print(f"study: {slices} slices {size}x{size}, {mb:.0f} MB")
    print(f"raw transfer (getscu + storescu, median of 3): {raw:.2f} s; model alone: {model:.1f} s in process, "
          f"{served_model if served_model is not None else float('nan'):.1f} s in the service for this request")
    print(f"OMI round trip (start Task created -> completed, DSF clock): {total:.1f} s "
          f"(client wall, incl. submit and polling: {client_wall:.1f} s)")
    print(f"OMI round trip: {total:.1f} s; without the model {total - excluded:.1f} s = {ratio:.2f}x the raw transfer")
    print(f"DSF alone (same request, steps answering at once, median of 3): {floor:.1f} s = {floor / raw:.2f}x "
          f"the raw transfer ({floor_between:.1f} s of it between work items, the rest the workers' settle)")
    for step, secs in steps.items():
        print(f"  {step:13s} {secs:6.1f} s   {phases.get(step, '')}")
    in_steps = sum(steps.values())
    print(f"in work items {in_steps:.1f} s; between them (DSF: BPE, messages, pickup) {total - in_steps:.1f} s")
    print("timeline (server clocks, s after the start Task):")
    for t, what in events:
        print(f"  {t:7.2f}  {what}")
    return {"dsf": dsf, "slices": slices, "study_mb": round(mb, 1),
            "raw_transfer_s": round(raw, 2), "model_s": round(model, 2),
            "service_model_s": served_model, "model_excluded_s": round(excluded, 2), "round_trip_s": round(total, 2),
            "client_wall_s": round(client_wall, 2), "steps_s": steps, "step_phases": phases,
            "between_steps_s": round(total - sum(steps.values()), 2),
            "ratio_round_trip_without_model_vs_raw": round(ratio, 2),
            "dsf_alone_s": round(floor, 2), "dsf_alone_between_items_s": round(floor_between, 2),
            "ratio_dsf_alone_vs_raw": round(floor / raw, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=ROOT / "test-artifacts" / "bench-testbed")
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dsf-home", action="append", default=[], metavar="PATH",
                    help="DSF distribution to measure on (repeatable: each gets its own test bed in "
                    "DIR/<version>, one after the other in this run; default: DSF_HOME or /opt/dsf-1.9.0, "
                    "or the test bed already running in DIR)")
    args = ap.parse_args()
    load = os.getloadavg()
    runs = []
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    if not args.dsf_home:
        with running_testbed(args.dir, out=log) as st:
            runs.append(measure(st, args.slices, args.size))
    for home in args.dsf_home:
        dist = Distribution.find(home)
        with running_testbed(args.dir / dist.version, dsf_home=home, out=log) as st:
            runs.append(measure(st, args.slices, args.size))
    summary = {"benchmark": "e2e", "load_avg_1m_at_start": round(load[0], 2), "runs": runs,
               "targets": {"ratio_max": 3.0},
               "met": all(r["ratio_round_trip_without_model_vs_raw"] <= 3.0 for r in runs)}
    if len(runs) > 1:   # later versions against the first, within this run
        base = runs[0]
        summary["versus_first"] = {r["dsf"]: {k: round(r[k] / base[k], 2) for k in
                                              ("round_trip_s", "dsf_alone_s", "between_steps_s", "raw_transfer_s")}
                                   for r in runs[1:]}
        for r in runs[1:]:
            print(f"DSF {r['dsf']} vs {base['dsf']}: " + ", ".join(
                f"{k} {v}x" for k, v in summary["versus_first"][r["dsf"]].items()))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
