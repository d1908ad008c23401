"""A cohort through the two-site test bed: studies per minute at `omi submit --cohort --parallel`
1, 4 and 8, and with the requester's workers on one host and on two, against moving the same
studies one by one with dcmtk (getscu from the requester's PACS + storescu into a second PACS).

Every run is the real request (consent, send: pseudonymized from the PACS through the site's gateway
and on over TLS to the provider's gateway as it goes, the reference AI service, return into the PACS). "Hosts"
are network namespaces on this machine (omi_dsf/testkit/hosts.py; root and `ip` needed, else
worker processes side by side), so they share its cores: the figures say what the software does
with the same CPUs, not what a second machine adds. Baseline and cohort runs alternate.

Where the time goes: CPU seconds per study of each component (omi_dsf/testkit/cputime.py, from
/proc: each DSF FHIR and BPE JVM, PostgreSQL, the workers, both gateways, the AI service, the
PACS, `omi submit`), and `other`, what the machine spent beyond them (other programs on it); and
the components' CPU seconds per minute with nothing to do. CPU seconds do not depend much on what
else runs on the machine; studies per minute do, so the load is recorded with them.

    python tools/bench/cohort.py [--dir DIR] [--studies 20] [--slices 50] [--size 256] [--parallel 1,4,8]

Targets: parallel 8 ≥ 4× the studies per minute of parallel 1; two hosts ≥ 1.6× one host (both at
the highest --parallel), or the limit that stops it named with its numbers.
Last line: one JSON object with the figures, the targets and "met".
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pydicom

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from omi_dsf.demo import PROVIDER, Demo  # noqa: E402
from omi_dsf.dsf.client import DsfClient  # noqa: E402
from omi_dsf.dsf.workitem import WorkItem, topics_from_spec  # noqa: E402
from omi_dsf.testbed.bed import running_testbed  # noqa: E402
from omi_dsf.testkit import cputime, hosts  # noqa: E402
from omi_dsf.testkit.legacy_pacs import Dcmqrscp, dcmtk_tool  # noqa: E402
from omi_dsf.worker.config import load_site_config  # noqa: E402


def ts(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def baseline(demo: Demo, studies, folder: Path) -> float:
    """Seconds to move every study one by one: getscu of its CT series from the PACS (the return
    step stores the results into the same study), storescu into another PACS."""
    env = dict(os.environ, TCP_NODELAY="1")
    run = folder / f"baseline-{time.time_ns()}"
    with Dcmqrscp(run / "other-pacs", aet="OTHERPACS") as other:
        t0 = time.monotonic()
        for n, study in enumerate(studies):
            out = run / f"get-{n}"
            out.mkdir(parents=True)
            subprocess.run([dcmtk_tool("getscu"), "-S", "-aet", "BENCHSCU", "-aec", demo.pacs.aet, "-od", str(out),
                            "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study.uid}",
                            "-k", f"SeriesInstanceUID={pydicom.dcmread(study.files[0], stop_before_pixels=True).SeriesInstanceUID}",
                            demo.pacs.host, str(demo.pacs.port)], check=True, env=env, capture_output=True)
            subprocess.run([dcmtk_tool("storescu"), "-aet", "BENCHSCU", "-aec", other.aet, other.host,
                            str(other.port), *map(str, sorted(out.iterdir()))], check=True, env=env,
                           capture_output=True)
        return time.monotonic() - t0


def step_seconds(client: DsfClient, keys: set[str], topics: dict[str, str]) -> dict[str, list[float]]:
    """Per step, the seconds each work item of these requests was open (created → answered)."""
    out: dict[str, list[float]] = {}
    for topic, questionnaire in topics.items():
        for qr in client.search("QuestionnaireResponse", {"questionnaire": questionnaire}, page_size=200):
            wi = WorkItem(qr)
            if wi.business_key not in keys or wi.status == "in-progress":
                continue
            versions = client.history("QuestionnaireResponse", qr["id"])
            stamps = sorted(ts(v["meta"]["lastUpdated"]) for v in versions)
            out.setdefault(topic, []).append(stamps[-1] - stamps[0])
    return out


def components(demo: Demo, dic_workers: list[int] = (), forwarders: list[int] = ()) -> dict[str, list[int]]:
    """The process trees whose CPU time the bench counts: name → root pids."""
    out = {f"{s.site}_{s.kind}": [int(s.pid)] for s in demo.state.servers}     # the DSF JVMs
    out["postgres"] = [int(demo.state.postgres_pid)]                            # the DSF's database
    out["dic_workers"] = list(dic_workers)
    out["ai_worker"] = [demo.procs["ai-worker"].pid]
    out.update({f"{k}_gateway": [g.proc.pid] for k, g in demo.gateways.items()})
    out["ai_service"] = [demo.ai_service.proc.pid]
    out["pacs"] = [demo.pacs.proc.pid]
    if forwarders:
        out["netns_forwarders"] = list(forwarders)     # the test's two "hosts" only, not a real site
    return out


def cpu_table(spent: dict[str, float], per: float) -> dict[str, float]:
    """CPU seconds per component divided by `per` (studies, or minutes), largest first; `other` is
    what the machine spent beyond the components (other programs on it, this bench)."""
    ours = {k: v for k, v in spent.items() if k != "machine"}
    ours["other"] = max(0.0, spent["machine"] - sum(ours.values()))
    return {k: round(v / per, 2) for k, v in sorted(ours.items(), key=lambda kv: -kv[1])}


def idle_cpu(demo: Demo, seconds: float = 20) -> dict[str, float]:
    """CPU seconds per minute of each component with nothing to do (both sites' workers polling)."""
    dic = demo._spawn("idle-dic-worker", ["worker", "--site", str(demo.sites["dic"]), "--topics",
                                          "consent,prepare,send,return"])
    try:
        time.sleep(5)
        comps = components(demo, [dic.pid])
        before = cputime.snapshot(comps)
        time.sleep(seconds)
        return cpu_table(cputime.spent(before, cputime.snapshot(comps)), seconds / 60)
    finally:
        demo.stop_process("idle-dic-worker")


def cohort_run(demo: Demo, studies, folder: Path, parallel: int, n_hosts: int) -> dict:
    """One cohort run with fresh DIC workers on `n_hosts` hosts; the figures of the run."""
    name = f"p{parallel}-h{n_hosts}-{time.time_ns()}"
    cohort = folder / f"{name}.csv"
    cohort.write_text("".join(f"{s.uid},{s.patient_id}\n" for s in studies))
    site = demo.sites["dic"]
    ports = [urlsplit(str(load_site_config(site).fhir_url)).port, urlsplit(demo.requester_gw).port, urlsplit(demo.provider_gw).port,
             demo.pacs.port]
    started: list = []
    why = hosts.available() if n_hosts > 1 else "one host"
    for h in range(n_hosts):
        args = [sys.executable, "-m", "omi_dsf", "worker", "--site", str(site), "--topics",
                "consent,prepare,send,return"]
        log = open(folder / f"{name}-worker-{h}.log", "ab")
        if why is None:
            host = hosts.Host(f"bench{h}", ports, folder / f"{name}-host-{h}.log")
            started.append(host)
            host.popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        else:
            started.append(subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    try:
        time.sleep(3)   # workers up
        pids = [s.procs[-1].pid if isinstance(s, hosts.Host) else s.pid for s in started]
        comps = components(demo, pids, [s.forwarder.pid for s in started if isinstance(s, hosts.Host)])
        load0 = os.getloadavg()[0]
        cpu0, cli0 = cputime.snapshot(comps), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "omi_dsf", "submit", "--cohort", str(cohort), "--service", "lung-seg",
                            "--provider", PROVIDER, "--site", str(site), "--parallel", str(parallel), "--interval", "1",
                            "--json"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
        wall = time.monotonic() - t0
        cpu1, cli1 = cputime.snapshot(comps), resource.getrusage(resource.RUSAGE_CHILDREN)
        load1 = os.getloadavg()[0]
        spent = cputime.spent(cpu0, cpu1)
        # `omi submit` itself: the one child of this process that ended meanwhile
        spent["omi_submit"] = (cli1.ru_utime + cli1.ru_stime) - (cli0.ru_utime + cli0.ru_stime)
    finally:
        for s in started:
            if isinstance(s, hosts.Host):
                s.remove()
            else:
                s.terminate()
                s.wait(30)
    summary = json.loads(r.stdout) if r.stdout.strip() else {"error": r.stderr[-500:]}
    with (folder / f"{name}.record.csv").open() as f:
        rows = list(csv.DictReader(f))
    per_study, keys = [], set()
    for row in rows:
        task = demo.dsf.read("Task", row["task"])
        per_study.append(ts(task["meta"]["lastUpdated"]) - ts(task["authoredOn"]))
        keys.add(row["business_key"])
    topics = topics_from_spec()
    steps = step_seconds(demo.dsf, keys, {t: q for t, q in topics.items() if t != "infer"})
    with DsfClient(load_site_config(demo.sites["ai"]).identity) as ai:
        steps.update(step_seconds(ai, keys, {"infer": topics["infer"]}))
    return {"parallel": parallel, "hosts": n_hosts, "hosts_kind": "netns" if why is None else "processes",
            "completed": summary.get("completed"), "failed": summary.get("failed"),
            "failed_by_reason": summary.get("failed_by_reason"),
            "wall_s": round(wall, 1), "studies_per_min": round(len(rows) / wall * 60, 2),
            "p50_s": round(pct(per_study, 0.5), 1), "p95_s": round(pct(per_study, 0.95), 1),
            "step_median_s": {k: round(statistics.median(v), 2) for k, v in steps.items() if v},
            "cpu_s_per_study": cpu_table(spent, len(rows)),
            "cpu_busy_share": round(spent["machine"] / (wall * os.cpu_count()), 2),
            "load_1m": [round(load0, 2), round(load1, 2)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=ROOT / "test-artifacts" / "bench-testbed")
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--slices", type=int, default=50)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--parallel", default="1,4,8")
    args = ap.parse_args()
    levels = [int(p) for p in args.parallel.split(",")]
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    load = os.getloadavg()
    runs, base = [], []
    with running_testbed(args.dir, out=log) as st, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        demo = Demo(st, folder / "demo", slices=args.slices, size=args.size, out=lambda *a: None)
        try:
            demo.start()
            studies = [demo.add_study(seed=1000 + i) for i in range(args.studies)]
            mb = sum(f.stat().st_size for s in studies for f in s.files) / 2**20
            demo._spawn("ai-worker", ["worker", "--site", str(demo.sites["ai"]), "--topics", "infer"])
            idle = idle_cpu(demo)
            log(f"idle CPU s/min: {json.dumps(idle)}")
            plan = [(p, 1) for p in levels] + [(levels[-1], 2)]
            for parallel, n_hosts in plan:      # baseline and cohort runs alternate
                base.append(baseline(demo, studies, folder))
                log(f"baseline: {base[-1]:.1f} s")
                runs.append(cohort_run(demo, studies, folder, parallel, n_hosts))
                log(json.dumps(runs[-1]))
            base.append(baseline(demo, studies, folder))
        finally:
            demo.stop()
    raw_s = statistics.median(base)
    by = {(r["parallel"], r["hosts"]): r for r in runs}
    one, top = by[(levels[0], 1)], by[(levels[-1], 1)]
    two = by[(levels[-1], 2)]
    speedup = top["studies_per_min"] / one["studies_per_min"]
    hosts_gain = two["studies_per_min"] / top["studies_per_min"]
    print(f"{args.studies} studies x {args.slices} slices {args.size}x{args.size} ({mb:.0f} MB), load {load[0]:.2f} "
          f"at the start, {os.cpu_count()} cores")
    print(f"baseline getscu+storescu one by one: median {raw_s:.1f} s = {args.studies / raw_s * 60:.1f} studies/min "
          f"(runs: {', '.join(f'{b:.1f}' for b in base)})")
    print("| parallel | hosts | studies/min | p50 s | p95 s | completed | per step (median s) |")
    for r in runs:
        print(f"| {r['parallel']} | {r['hosts']} ({r['hosts_kind']}) | {r['studies_per_min']} | {r['p50_s']} | "
              f"{r['p95_s']} | {r['completed']}/{args.studies} | "
              + ", ".join(f"{k} {v}" for k, v in r["step_median_s"].items()) + " |")
    print(f"parallel {levels[-1]} / parallel {levels[0]}: {speedup:.2f}x; two hosts / one: {hosts_gain:.2f}x")
    print("CPU seconds per study by component (the whole machine's beyond them: other):")
    for r in runs:
        print(f"  parallel {r['parallel']}, {r['hosts']} host(s), machine busy {r['cpu_busy_share']:.0%}: "
              + ", ".join(f"{k} {v}" for k, v in r["cpu_s_per_study"].items()))
    print("CPU seconds per minute when idle: " + ", ".join(f"{k} {v}" for k, v in idle.items()))
    cpu = top["cpu_s_per_study"]
    dsf = sum(v for k, v in cpu.items() if k.endswith(("_fhir", "_bpe")) or k == "postgres")
    total = sum(v for k, v in cpu.items() if k != "other")
    limit = (f"CPU: at parallel {levels[-1]} the machine was {top['cpu_busy_share']:.0%} busy on {os.cpu_count()} "
             f"cores; a study costs {total:.1f} CPU s, of which the DSF (4 JVMs + PostgreSQL) {dsf:.1f} s "
             f"({dsf / total:.0%}); {os.cpu_count() * 60 / total:.1f} studies/min is the most these cores can give at that cost")
    print(limit)
    print(json.dumps({"benchmark": "cohort", "studies": args.studies, "slices": args.slices, "size": args.size,
                      "study_mb": round(mb / args.studies, 1), "load_avg_1m_at_start": round(load[0], 2),
                      "cores": os.cpu_count(), "baseline_s": [round(b, 1) for b in base],
                      "baseline_studies_per_min": round(args.studies / raw_s * 60, 1), "runs": runs,
                      "parallel_speedup": round(speedup, 2), "two_hosts_gain": round(hosts_gain, 2),
                      "idle_cpu_s_per_min": idle, "limit": limit, "targets": {"parallel_speedup_min": 4.0, "two_hosts_gain_min": 1.6},
                      "met": speedup >= 4.0 and hosts_gain >= 1.6}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
