"""Work item pickup and throughput on the real DSF test bed.

Side by side on the same test bed: pickup latency (QuestionnaireResponse created by the BPE →
claimed by a worker) with the websocket subscription vs with polling only, and work items per
minute with 1 and with 3 workers. Target: median pickup under 1 s with the websocket.

    python tools/bench/workitems.py [--dir DIR] [--instances N] [--dsf-home PATH ...]

Uses a test bed already running in DIR, else brings one up there (and down afterwards). With several
--dsf-home, one test bed per DSF version in DIR/<version>, one after the other in this run, and each
later version's figures as a ratio to the first's.
Last line: one JSON object with the figures, the targets and "met".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from omi_dsf.dsf.client import DsfClient  # noqa: E402
from omi_dsf.dsf.tasks import message_task  # noqa: E402
from omi_dsf.dsf.workitem import topics_from_spec  # noqa: E402
from omi_dsf.steps.demo import demo_step  # noqa: E402
from omi_dsf.testbed.bed import running_testbed  # noqa: E402
from omi_dsf.testbed.distribution import Distribution  # noqa: E402
from omi_dsf.testkit.sites import write_testbed_site_configs  # noqa: E402
from omi_dsf.worker.config import load_site_config  # noqa: E402
from omi_dsf.worker.lease import Leases  # noqa: E402
from omi_dsf.worker.runtime import Worker, WorkerSettings  # noqa: E402

DIC_TOPICS = ("consent", "prepare", "send", "return")


class TimedWorker(Worker):
    """Notes, per item, the time from its creation on the server to its claim here."""

    pickups: list[float]

    def process(self, resource):
        created = dt.datetime.fromisoformat(resource["meta"]["lastUpdated"]).timestamp()
        seen = time.time()
        out = super().process(resource)
        if out is not None and resource["meta"].get("versionId") == "1":
            self.pickups.append(seen - created)
        return out


def run_workers(cfgs: dict, n_dic: int, websocket: bool, poll: float, folder: Path) -> tuple[list[TimedWorker], list[threading.Thread]]:
    topics = topics_from_spec()
    workers, threads = [], []
    leases = {k: Leases(folder / f"{k}-{time.time_ns()}.db") for k in ("dic", "ai")}
    for key, n, tps in (("dic", n_dic, DIC_TOPICS), ("ai", 1, ("infer",))):
        site = load_site_config(cfgs[key])
        for _ in range(n):
            w = TimedWorker(DsfClient(site.identity), leases[key], {t: demo_step for t in tps},
                            WorkerSettings(topics=topics, poll_interval=poll, websocket=websocket, lease_ttl=30), {})
            w.pickups = []
            th = threading.Thread(target=w.run, daemon=True)
            th.start()
            workers.append(w)
            threads.append(th)
    return workers, threads


def submit_and_wait(client: DsfClient, n: int, timeout: float = 600) -> float:
    t0 = time.monotonic()
    ids = []
    for i in range(n):
        ids.append(client.create(message_task("startOmiInference", "dic.omi.test", "dic.omi.test", {
            "study-instance-uid": f"2.25.{time.time_ns()}{i}", "patient-identifier": f"BENCH-{i}",
            "ai-service-identifier": "lung-seg", "provider-organization": "ai.omi.test"}))["id"])
    pending = set(ids)
    while pending and time.monotonic() - t0 < timeout:
        for tid in list(pending):
            if client.read("Task", tid)["status"] in ("completed", "failed"):
                pending.discard(tid)
        time.sleep(0.5)
    if pending:
        raise SystemExit(f"{len(pending)} instances not finished within {timeout}s")
    return time.monotonic() - t0


def scenario(cfgs, client, folder, *, n_dic, websocket, poll, instances) -> dict:
    workers, threads = run_workers(cfgs, n_dic, websocket, poll, folder)
    time.sleep(3 if websocket else 0.5)   # let the websocket bind before the first item
    elapsed = submit_and_wait(client, instances)
    for w in workers:
        w.stop()
    for th in threads:
        th.join(15)
    pickups = sorted(p for w in workers for p in w.pickups)
    items = instances * (len(DIC_TOPICS) + 1)
    return {"median_pickup_s": round(statistics.median(pickups), 3) if pickups else None,
            "p95_pickup_s": round(pickups[int(0.95 * (len(pickups) - 1))], 3) if pickups else None,
            "items": items, "items_per_min": round(items / elapsed * 60, 1), "elapsed_s": round(elapsed, 1)}


def measure(st, instances: int) -> dict:
    """Pickup and throughput scenarios on the test bed `st`."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cfgs = write_testbed_site_configs(st, folder)
        client = DsfClient(load_site_config(cfgs["dic"]).identity)
        # polling-only run first: a long-lived websocket subscription must not help it
        results = {
            "polling_2s": scenario(cfgs, client, folder, n_dic=1, websocket=False, poll=2.0, instances=instances),
            "websocket_1_worker": scenario(cfgs, client, folder, n_dic=1, websocket=True, poll=30.0, instances=instances),
            "websocket_3_workers": scenario(cfgs, client, folder, n_dic=3, websocket=True, poll=30.0, instances=instances),
        }
    dsf = ", ".join(sorted({s.dsf_version for s in st.sites}))
    for name, r in results.items():
        print(f"DSF {dsf}  {name:22s} median pickup {r['median_pickup_s']} s  p95 {r['p95_pickup_s']} s  "
              f"{r['items_per_min']} items/min ({r['items']} items in {r['elapsed_s']} s)")
    ws, poll = results["websocket_1_worker"], results["polling_2s"]
    return {"dsf": dsf, "results": results,
            "ratios": {"median_pickup_websocket_vs_polling": round(ws["median_pickup_s"] / poll["median_pickup_s"], 3),
                       "throughput_3_vs_1_workers": round(results["websocket_3_workers"]["items_per_min"]
                                                          / ws["items_per_min"], 2)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=ROOT / "test-artifacts" / "bench-testbed")
    ap.add_argument("--instances", type=int, default=10)
    ap.add_argument("--dsf-home", action="append", default=[], metavar="PATH",
                    help="DSF distribution to measure on (repeatable: each gets its own test bed in "
                    "DIR/<version>, one after the other in this run)")
    args = ap.parse_args()
    load = os.getloadavg()
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    runs = []
    if not args.dsf_home:
        with running_testbed(args.dir, out=log) as st:
            runs.append(measure(st, args.instances))
    for home in args.dsf_home:
        dist = Distribution.find(home)
        with running_testbed(args.dir / dist.version, dsf_home=home, out=log) as st:
            runs.append(measure(st, args.instances))
    summary = {
        "benchmark": "workitems",
        "load_avg_1m_at_start": round(load[0], 2),
        "runs": runs,
        "targets": {"median_pickup_websocket_s_max": 1.0},
        "met": all(r["results"]["websocket_1_worker"]["median_pickup_s"] is not None
                   and r["results"]["websocket_1_worker"]["median_pickup_s"] < 1.0 for r in runs),
    }
    if len(runs) > 1:
        base = runs[0]["results"]
        summary["versus_first"] = {
            r["dsf"]: {name: {k: round(r["results"][name][k] / base[name][k], 2)
                              for k in ("median_pickup_s", "items_per_min") if base[name][k]}
                       for name in base}
            for r in runs[1:]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
