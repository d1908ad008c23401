"""Registry with its entries in a FHIR server (HAPI FHIR JPA) against the registry before it (its own
SQLite store), side by side: registrations, searches and health rounds with 200 services.

    python tools/bench/registry.py [--services 200] [--searches 200] [--rounds 3] [--before REV]
                                   [--fhir-store URL]

"before" is the project at git revision REV (default: the parent of the commit that replaced the
SQLite store), extracted with `git archive` into a temporary folder and run with that folder as its
PYTHONPATH; "after" is this checkout, with the given FHIR store or one started here
(`omi_dsf.fhirstore`, about a minute). Both registries run at once (uvicorn, plain HTTP, bearer JWT,
127.0.0.1) against one reference AI service. N services are registered in each, one transaction Bundle
each, alternating; then searches with filters (modality, body site, organization, `_include`)
alternate between the two, each preceded by a `GET /health` on the same server (the baseline: what
any request costs there); then health rounds (every service checked against the AI service)
alternate, each in a process of its revision. Medians of all; load average at start and end.

Targets: search p95 at most 100 ms, a health round of 200 services at most 5 s, the FHIR server's
search p50 at most 5x the SQLite store's (the FHIR server does in SQL, with chained search parameters,
what the old store did over the rows in memory), and a registration p95 at most 1 s (a provider
registers at start-up, not in bulk). Last line: one JSON object with the figures, targets and "met".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port  # noqa: E402
from omi_dsf.registry.entries import service_bundle  # noqa: E402

ISSUER = "https://bench.idp"
MODALITIES = ["CT", "MR", "DX", "US"]
# one health round in the process of a revision: what its HealthChecker does with its store
ROUND = {"before": "from omi_dsf.registry.store import Store; store = Store(rc.database)",
         "after": "from omi_dsf.registry.store import Store; store = Store(rc.store_peer())"}
ROUND_CODE = """
import json, sys, time
from omi_dsf.registry.config import load_config
from omi_dsf.registry.health import HealthChecker
rc = load_config(sys.argv[1])
{store}
checker = HealthChecker(store, rc.health)
s = time.perf_counter()
states = checker.check_all()
print(json.dumps({{"seconds": time.perf_counter() - s, "checked": len(states),
                   "up": sum(st.status == "up" for st in states.values())}}))
"""


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def before_revision() -> str:
    """The parent of the commit that removed the registry's SQLite store."""
    removed = _git("log", "-1", "--format=%H", "-S", "CREATE TABLE IF NOT EXISTS resources", "--",
                   "omi_dsf/registry/store.py")
    if not removed or "CREATE TABLE IF NOT EXISTS resources" in (ROOT / "omi_dsf/registry/store.py").read_text():
        raise SystemExit("cannot tell the revision before the FHIR store; give --before REV")
    return _git("rev-parse", f"{removed}^")


def extract(rev: str, into: Path) -> Path:
    archive = into / "before.tar"
    with archive.open("wb") as fh:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "omi_dsf"], stdout=fh, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "before", filter="data")
    return into / "before"


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the process ended: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def ms(xs: list[float], q: int) -> float:
    return round(statistics.quantiles(xs, n=100)[q - 1] * 1000, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=200)
    ap.add_argument("--searches", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="health rounds per registry")
    ap.add_argument("--before", help="git revision of the registry with its own store (default: found)")
    ap.add_argument("--fhir-store", help="FHIR base of a running store (default: one started here)")
    args = ap.parse_args()
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="omi-bench-registry-"))
    rev = args.before or before_revision()
    trees = {"before": extract(rev, work), "after": ROOT}
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (work / "idp.pem").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
    fhir = None
    started_store = None
    if args.fhir_store:
        fhir = args.fhir_store.rstrip("/")
    else:
        from omi_dsf.fhirstore import FhirStore
        started_store = FhirStore(work / "fhir-store", port=free_port(), out=lambda *_: None)
        fhir = started_store.up(timeout=900).base_url
    from omi_dsf.peer import Peer
    from omi_dsf.registry.store import Store
    Store(Peer(url=fhir)).clear()   # no registry entries of an earlier run

    ai_port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "omi_dsf", "ai-service", "--anonymous", "--port", str(ai_port)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    urls, configs = {}, {}
    for name in ("before", "after"):
        port = free_port()
        folder = work / name
        folder.mkdir(exist_ok=True)
        (folder / "idp.pem").write_bytes((work / "idp.pem").read_bytes())
        cfg = {"host": "127.0.0.1", "port": port, "auth": {"jwt": [{"issuer": ISSUER, "key_file": "idp.pem"}]},
               "health": {"interval": 0, "timeout": 5}}
        cfg.update({"database": "registry.db"} if name == "before" else {"fhir_store": {"url": fhir}})
        configs[name] = folder / "registry.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PYTHONPATH": str(trees[name])}
        log = folder / "registry.log"
        procs.append(subprocess.Popen([sys.executable, "-m", "omi_dsf", "registry", "--config", str(configs[name])],
                                      cwd=trees[name], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT))
        urls[name] = (f"http://127.0.0.1:{port}", procs[-1], log)
    reg = {n: [] for n in urls}
    search = {n: [] for n in urls}
    base = {n: [] for n in urls}
    rounds = {n: [] for n in urls}
    try:
        for name, (url, proc, log) in urls.items():
            _wait(f"{url}/health", proc, log)
        _wait(f"http://127.0.0.1:{ai_port}/v2/health/ready", procs[0], work / "none")
        clients = {n: httpx.Client(base_url=u, timeout=60) for n, (u, _, _) in urls.items()}
        for i in range(args.services):
            org = f"ai{i % 10}.omi.test"
            tok = jwt.encode({"iss": ISSUER, "exp": int(time.time()) + 600, "organization": org}, key, "RS256")
            b = service_bundle(org, f"svc-{i}", name=f"Service {i}", model="lung-seg", model_version="0.1.0",
                               oip_url=f"http://127.0.0.1:{ai_port}", modality=[MODALITIES[i % 4]],
                               body_site=[("http://snomed.info/sct", "39607008")])
            for name in (("before", "after") if i % 2 else ("after", "before")):
                s = time.perf_counter()
                r = clients[name].post("/fhir", json=b, headers={"Authorization": f"Bearer {tok}",
                                                                 "Content-Type": "application/fhir+json"})
                reg[name].append(time.perf_counter() - s)
                if r.status_code != 200:
                    raise SystemExit(f"{name}: registration {i}: HTTP {r.status_code} {r.text[:300]}")
        for i in range(args.searches):
            params = [("modality", MODALITIES[i % 4]), ("body-site", "39607008"),
                      ("organization", f"ai{i % 10}.omi.test"), ("_include", "HealthcareService:endpoint")]
            for name in (("before", "after") if i % 2 else ("after", "before")):
                c = clients[name]
                s = time.perf_counter()
                c.get("/health").raise_for_status()
                base[name].append(time.perf_counter() - s)
                s = time.perf_counter()
                r = c.get("/fhir/HealthcareService", params=params)
                search[name].append(time.perf_counter() - s)
                r.raise_for_status()
        found = {n: clients[n].get("/fhir/HealthcareService", params=[("modality", "CT"), ("_count", "1000")]).json()
                 .get("total") for n in clients}
        if found["before"] != found["after"]:
            raise SystemExit(f"the two registries answer differently: {found}")
        for c in clients.values():
            c.close()
        for k in range(args.rounds):
            for name in (("before", "after") if k % 2 else ("after", "before")):
                out = subprocess.run([sys.executable, "-c", ROUND_CODE.format(store=ROUND[name]), str(configs[name])],
                                     cwd=trees[name], env={**os.environ, "PYTHONPATH": str(trees[name])},
                                     capture_output=True, text=True, timeout=600)
                if out.returncode != 0:
                    raise SystemExit(f"{name}: health round failed: {out.stderr[-2000:]}")
                rounds[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        if started_store is not None:
            started_store.down()

    figures = {}
    for n in ("before", "after"):
        figures[n] = {"register_per_s": round(len(reg[n]) / sum(reg[n]), 1), "register_p50_ms": ms(reg[n], 50),
                      "register_p95_ms": ms(reg[n], 95), "search_p50_ms": ms(search[n], 50),
                      "search_p95_ms": ms(search[n], 95), "baseline_health_get_p50_ms": ms(base[n], 50),
                      "health_round_s": round(statistics.median(r["seconds"] for r in rounds[n]), 2),
                      "health_checked": rounds[n][-1]["checked"], "health_up": rounds[n][-1]["up"]}
    ratio = round(figures["after"]["search_p50_ms"] / figures["before"]["search_p50_ms"], 2)
    targets = {"search_p95_ms_max": 100, "health_round_s_max": 5, "search_p50_ratio_max": 5,
               "register_p95_ms_max": 1000}
    after = figures["after"]
    met = (after["search_p95_ms"] <= targets["search_p95_ms_max"]
           and after["health_round_s"] <= targets["health_round_s_max"]
           and ratio <= targets["search_p50_ratio_max"]
           and after["register_p95_ms"] <= targets["register_p95_ms_max"]
           and after["health_checked"] == args.services)
    result = {"services": args.services, "searches": args.searches, "rounds": args.rounds, "before_rev": rev[:12],
              "before": {"store": "sqlite", **figures["before"]}, "after": {"store": "fhir (HAPI)", **after},
              "search_p50_ratio": ratio, "ct_services_found": found["after"],
              "load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2),
              "targets": targets, "met": met}
    for n in ("before", "after"):
        f = figures[n]
        print(f"{n:6}: registrations p50 {f['register_p50_ms']} ms ({f['register_per_s']}/s); search p50 "
              f"{f['search_p50_ms']} ms p95 {f['search_p95_ms']} ms (baseline GET /health p50 "
              f"{f['baseline_health_get_p50_ms']} ms); health round {f['health_round_s']} s for "
              f"{f['health_checked']} services ({f['health_up']} up)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
