"""Registry throughput: registrations and searches over HTTP, health checks of live services.

    python tools/bench/registry.py [--services 200] [--searches 200] [--database URL]

A real registry (uvicorn, plain HTTP, bearer JWT) on 127.0.0.1 with a fresh SQLite file (or the
given PostgreSQL URL); N services are registered one transaction Bundle each, then searched with
filters (modality, body site, organization, `_include`), then one health round checks every
service against one reference AI service. Each search is interleaved with a `GET /health` on the
same server and connection, the baseline: what any request costs there, so the search's own cost
is the difference. Targets: at least 50 registrations/s, search p95 at most 100 ms, one health
round of the services at most 5 s. Last line: one JSON object with the figures (load average at
start and end), the targets and "met".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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


def _wait(url: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=200)
    ap.add_argument("--searches", type=int, default=200)
    ap.add_argument("--database", help="PostgreSQL URL (default: a fresh SQLite file)")
    args = ap.parse_args()
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="omi-bench-registry-"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (work / "idp.pem").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
    ai_port, port = free_port(), free_port()
    cfg = {"host": "127.0.0.1", "port": port, "database": args.database or "registry.db",
           "auth": {"jwt": [{"issuer": ISSUER, "key_file": "idp.pem"}]},
           "health": {"interval": 0, "timeout": 5}}
    (work / "registry.yaml").write_text(yaml.safe_dump(cfg))
    procs = [subprocess.Popen([sys.executable, "-m", "omi_dsf", "ai-service", "--anonymous", "--port", str(ai_port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([sys.executable, "-m", "omi_dsf", "registry", "--config", str(work / "registry.yaml")],
                              cwd=ROOT, stdout=(work / "registry.log").open("wb"), stderr=subprocess.STDOUT)]
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/health")
        _wait(f"http://127.0.0.1:{ai_port}/v2/health/ready")
        modalities = ["CT", "MR", "DX", "US"]
        with httpx.Client(base_url=url, timeout=30) as c:
            t0 = time.perf_counter()
            reg_times = []
            for i in range(args.services):
                org = f"ai{i % 10}.omi.test"
                tok = jwt.encode({"iss": ISSUER, "exp": int(time.time()) + 600, "organization": org}, key, "RS256")
                b = service_bundle(org, f"svc-{i}", name=f"Service {i}", model="lung-seg", model_version="0.1.0",
                                   oip_url=f"http://127.0.0.1:{ai_port}", modality=[modalities[i % 4]],
                                   body_site=[("http://snomed.info/sct", "39607008")])
                s = time.perf_counter()
                r = c.post("/fhir", json=b, headers={"Authorization": f"Bearer {tok}",
                                                     "Content-Type": "application/fhir+json"})
                reg_times.append(time.perf_counter() - s)
                r.raise_for_status()
            reg_total = time.perf_counter() - t0
            search_times, base_times = [], []
            for i in range(args.searches):
                s = time.perf_counter()
                c.get("/health").raise_for_status()
                base_times.append(time.perf_counter() - s)
                params = [("modality", modalities[i % 4]), ("body-site", "39607008"),
                          ("organization", f"ai{i % 10}.omi.test"), ("_include", "HealthcareService:endpoint")]
                s = time.perf_counter()
                r = c.get("/fhir/HealthcareService", params=params)
                search_times.append(time.perf_counter() - s)
                r.raise_for_status()
        # one health round, in process against the same database
        from omi_dsf.registry.config import load_config
        from omi_dsf.registry.health import HealthChecker
        from omi_dsf.registry.store import Store
        rc = load_config(work / "registry.yaml")
        checker = HealthChecker(Store(rc.database), rc.health)
        s = time.perf_counter()
        states = checker.check_all()
        health_total = time.perf_counter() - s
        up = sum(st.status == "up" for st in states.values())
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)

    def ms(xs, q):
        return round(statistics.quantiles(xs, n=100)[q - 1] * 1000, 1)

    result = {"services": args.services, "database": "postgresql" if args.database else "sqlite",
              "register_per_s": round(args.services / reg_total, 1), "register_p50_ms": ms(reg_times, 50),
              "register_p95_ms": ms(reg_times, 95), "search_p50_ms": ms(search_times, 50),
              "search_p95_ms": ms(search_times, 95), "health_round_s": round(health_total, 2),
              "health_up": up, "health_checked": len(states),
              "baseline_health_get_p50_ms": ms(base_times, 50), "baseline_health_get_p95_ms": ms(base_times, 95),
              "load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2)}
    targets = {"register_per_s_min": 50, "search_p95_ms_max": 100, "health_round_s_max": 5}
    result["targets"] = targets
    result["met"] = (result["register_per_s"] >= targets["register_per_s_min"]
                     and result["search_p95_ms"] <= targets["search_p95_ms_max"]
                     and result["health_round_s"] <= targets["health_round_s_max"])
    print(f"registrations {result['register_per_s']}/s; search p50 {result['search_p50_ms']} ms "
          f"(baseline GET /health p50 {result['baseline_health_get_p50_ms']} ms); "
          f"health round {result['health_round_s']} s for {len(states)} services")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
