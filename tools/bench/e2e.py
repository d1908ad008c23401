"""One OMI request end to end at two study sizes (CT, 100 and 400 slices by default), split by
step, against moving the same study once with dcmtk (getscu from the requester's PACS + storescu
into a second PACS) on this machine, and against what the DSF alone costs.

What grows with the study and what does not:
- marginal cost: (round trip without the model, large − small) / (raw transfer, large − small),
  target ≤ 2.0: the data path costs at most two raw transfers per extra byte;
- fixed cost: the round trip without the model extrapolated to an empty study (the intercept of the
  line through the two sizes), target ≤ the DSF alone + 1 s. The DSF alone is the same request
  through the same sites with workers whose steps answer at once and move no data (`worker --demo`).

Model time is what the AI service reports for this request (model_time_ms); the model's run in this
process on the same volume is used only if the service reported nothing. Every figure is the median
of --runs, the sizes interleaved and each request right after its study's raw transfer (a new
study per request: a repeated one would find its instances at the provider already and skip the
STOW); the marginal cost of each run's pair is printed beside the one of the medians.

    python tools/bench/e2e.py [--dir DIR] [--slices 100 --slices 400] [--size 512] [--runs 3]
                              [--dsf-home PATH ...]

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
import shutil
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


def raw_transfer(demo: Demo, study_uid: str, folder: Path, other: Dcmqrscp) -> float:
    """getscu of the study from the requester's PACS, then storescu of it into another PACS."""
    env = dict(os.environ, TCP_NODELAY="1")
    out = Path(tempfile.mkdtemp(prefix="getscu-", dir=folder))
    t0 = time.monotonic()
    subprocess.run([dcmtk_tool("getscu"), "-S", "-aet", "BENCHSCU", "-aec", demo.pacs.aet, "-od", str(out),
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                    demo.pacs.host, str(demo.pacs.port)], check=True, env=env, capture_output=True)
    files = sorted(out.iterdir())
    subprocess.run([dcmtk_tool("storescu"), "-aet", "BENCHSCU", "-aec", other.aet, other.host,
                    str(other.port), *map(str, files)], check=True, env=env, capture_output=True)
    elapsed = time.monotonic() - t0
    shutil.rmtree(out)
    return elapsed


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


def one_request(demo: Demo, study) -> dict:
    """One request with the real steps: the round trip by the requester's DSF clock (start Task
    created -> completed, no polling in it), each step, its phases and the model's time."""
    t0 = time.monotonic()
    task_id = demo.submit(study)
    task = demo.wait(task_id, timeout=1800)
    client_wall = time.monotonic() - t0
    if task["status"] != "completed":
        raise SystemExit(f"request failed: {task.get('output')}")
    key = demo.business_key(task_id)
    steps, events = timeline(demo, key, task_id)
    phases = step_phases(demo, key)
    served_model = service_model_time(phases)
    excluded = served_model if served_model is not None else model_time(study.files)
    ends = [t for t, what in events if what.startswith("dic: Task startOmiInference ")]
    total = max(ends) - min(ends)
    return {"round_trip_s": round(total, 2), "model_excluded_s": round(excluded, 2),
            "service_model_s": served_model, "without_model_s": round(total - excluded, 2),
            "client_wall_s": round(client_wall, 2), "steps_s": steps, "step_phases": phases,
            "between_steps_s": round(total - sum(steps.values()), 2), "timeline": events}


def measure(st, sizes: list[int], size: int, runs: int) -> dict:
    """Requests at each study size on the test bed `st`, the raw transfers and the DSF-alone figure."""
    med = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        demo = Demo(st, Path(tmp) / "demo", size=size, out=lambda *a: None)
        try:
            demo.start()
            studies: dict[int, list] = {n: [] for n in sizes}
            for r in range(runs):
                for n in sizes:
                    demo.slices = n
                    studies[n].append(demo.add_study(seed=7000 + 10 * r + sizes.index(n)))
            mb = {n: sum(f.stat().st_size for f in studies[n][0].files) / 2**20 for n in sizes}
            floor, floor_between = dsf_floor(demo, studies[sizes[0]][0])
            demo.start_workers()
            raw: dict[int, list[float]] = {n: [] for n in sizes}
            req: dict[int, list[dict]] = {n: [] for n in sizes}
            with Dcmqrscp(Path(tmp) / "other-pacs", aet="OTHERPACS") as other:
                # each request right after its study's raw transfer, the sizes interleaved: the
                # machine's other jobs weigh on both of a pair alike
                for r in range(runs):
                    for n in sizes:
                        raw[n].append(raw_transfer(demo, studies[n][r].uid, Path(tmp), other))
                        req[n].append(one_request(demo, studies[n][r]))
        finally:
            demo.stop()
    dsf = ", ".join(sorted({s.dsf_version for s in st.sites}))
    print(f"== DSF {dsf}")
    per_size = {}
    for n in sizes:
        rs = req[n]
        without = med(r["without_model_s"] for r in rs)
        per_size[n] = {
            "study_mb": round(mb[n], 1), "raw_transfer_s": round(med(raw[n]), 2),
            "round_trip_s": round(med(r["round_trip_s"] for r in rs), 2),
            "model_excluded_s": round(med(r["model_excluded_s"] for r in rs), 2),
            "without_model_s": round(without, 2),
            "between_steps_s": round(med(r["between_steps_s"] for r in rs), 2),
            "steps_s": {k: round(med(r["steps_s"].get(k, 0.0) for r in rs), 2) for k in rs[0]["steps_s"]},
            "ratio_without_model_vs_raw": round(without / med(raw[n]), 2),
            "runs_without_model_s": [r["without_model_s"] for r in rs], "runs_raw_s": [round(x, 2) for x in raw[n]]}
        print(f"-- {n} slices {size}x{size}, {mb[n]:.0f} MB (medians of {runs})")
        print(f"raw transfer (getscu + storescu): {med(raw[n]):.2f} s  {per_size[n]['runs_raw_s']}")
        print(f"round trip {per_size[n]['round_trip_s']:.1f} s, model {per_size[n]['model_excluded_s']:.1f} s, "
              f"without the model {without:.2f} s = {per_size[n]['ratio_without_model_vs_raw']:.2f}x the raw "
              f"transfer  {per_size[n]['runs_without_model_s']}")
        for step, secs in per_size[n]["steps_s"].items():
            print(f"  {step:13s} {secs:6.2f} s   {rs[-1]['step_phases'].get(step, '')}")
        print(f"  between the steps (DSF: BPE, messages, pickup) {per_size[n]['between_steps_s']:.2f} s")
    last = req[sizes[-1]][-1]
    print(f"timeline of the last {sizes[-1]}-slice request (server clocks, s after the start Task):")
    for t, what in last["timeline"]:
        print(f"  {t:7.2f}  {what}")
    small, large = sizes[0], sizes[-1]
    d_rt = per_size[large]["without_model_s"] - per_size[small]["without_model_s"]
    d_raw = per_size[large]["raw_transfer_s"] - per_size[small]["raw_transfer_s"]
    marginal = d_rt / d_raw if d_raw > 0 else float("inf")
    intercept = per_size[small]["without_model_s"] - d_rt * small / (large - small)
    def at_zero(a: float, b: float) -> float:   # the line through (small, a) and (large, b) at 0 slices
        return round(a - (b - a) * small / (large - small), 2)
    by_step = {k: at_zero(per_size[small]["steps_s"].get(k, 0.0), per_size[large]["steps_s"].get(k, 0.0))
               for k in per_size[small]["steps_s"]}
    by_step["between steps"] = at_zero(per_size[small]["between_steps_s"], per_size[large]["between_steps_s"])
    by_step["model excluded"] = -at_zero(per_size[small]["model_excluded_s"], per_size[large]["model_excluded_s"])
    print("fixed cost by part (each at 0 slices; the model's is subtracted): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in by_step.items()))
    pairs = [(req[large][r]["without_model_s"] - req[small][r]["without_model_s"]) / (raw[large][r] - raw[small][r])
             for r in range(runs) if raw[large][r] > raw[small][r]]
    print(f"marginal cost of each run's pair: {', '.join(f'{x:.2f}' for x in pairs)}")
    print(f"marginal cost ({large} - {small} slices): {d_rt:.2f} s / {d_raw:.2f} s of raw transfer = "
          f"{marginal:.2f}x (target <= 2.0)")
    print(f"fixed cost (intercept at 0 slices): {intercept:.2f} s; the DSF alone (median of 3): {floor:.2f} s "
          f"({floor_between:.2f} s between work items) -> {intercept - floor:+.2f} s (target <= +1 s)")
    return {"dsf": dsf, "sizes": {str(n): v for n, v in per_size.items()},
            "marginal_ratio": round(marginal, 2), "marginal_ratio_by_run": [round(x, 2) for x in pairs],
            "intercept_s": round(intercept, 2), "intercept_by_part_s": by_step,
            "dsf_alone_s": round(floor, 2), "dsf_alone_between_items_s": round(floor_between, 2),
            "intercept_minus_dsf_alone_s": round(intercept - floor, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=ROOT / "test-artifacts" / "bench-testbed")
    ap.add_argument("--slices", type=int, action="append", default=[], metavar="N",
                    help="study size in slices (twice: the small and the large one; default 100 and 400)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3, help="requests per size (medians; default 3)")
    ap.add_argument("--dsf-home", action="append", default=[], metavar="PATH",
                    help="DSF distribution to measure on (repeatable: each gets its own test bed in "
                    "DIR/<version>, one after the other in this run; default: DSF_HOME or /opt/dsf-1.9.0, "
                    "or the test bed already running in DIR)")
    args = ap.parse_args()
    sizes = sorted(args.slices or [100, 400])
    if len(sizes) != 2 or sizes[0] == sizes[1]:
        print("e2e: --slices takes two different sizes", file=sys.stderr)
        return 2
    load = os.getloadavg()
    runs = []
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    if not args.dsf_home:
        with running_testbed(args.dir, out=log) as st:
            runs.append(measure(st, sizes, args.size, args.runs))
    for home in args.dsf_home:
        dist = Distribution.find(home)
        with running_testbed(args.dir / dist.version, dsf_home=home, out=log) as st:
            runs.append(measure(st, sizes, args.size, args.runs))
    targets = {"marginal_ratio_max": 2.0, "intercept_minus_dsf_alone_max_s": 1.0}
    summary = {"benchmark": "e2e", "load_avg_1m_at_start": round(load[0], 2),
               "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "slices": sizes, "runs_per_size": args.runs,
               "runs": runs, "targets": targets,
               "met": all(r["marginal_ratio"] <= targets["marginal_ratio_max"]
                          and r["intercept_minus_dsf_alone_s"] <= targets["intercept_minus_dsf_alone_max_s"]
                          for r in runs)}
    if len(runs) > 1:   # later versions against the first, within this run
        base = runs[0]
        keys = ("marginal_ratio", "intercept_s", "dsf_alone_s")
        summary["versus_first"] = {r["dsf"]: {k: round(r[k] / base[k], 2) if base[k] else None for k in keys}
                                   for r in runs[1:]}
        for r in runs[1:]:
            print(f"DSF {r['dsf']} vs {base['dsf']}: " + ", ".join(
                f"{k} {v}x" for k, v in summary["versus_first"][r["dsf"]].items()))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
