"""`omi services/submit/status/results` against the real DSF test bed (session fixture `dsf_testbed`)
and a real registry: the provider registers with its DSF client certificate (mutual TLS), the DIC
submits with its own, demo workers (`python -m omi_dsf worker --demo`) move the request through
every step, and the client follows it to its results; a denied step shows where and why it failed."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import ROOT, free_port
from omi_dsf.registry.auth import thumbprint
from omi_dsf.registry.entries import service_bundle
from omi_dsf.spec.model import load_spec
from omi_dsf.testbed.certs import KEY_PASSWORD, TestCA
from omi_dsf.testkit.gateway import GatewayProcess
from omi_dsf.testkit.sites import write_testbed_site_configs

pytestmark = pytest.mark.integration
DIC_TOPICS = ",".join(next(p for p in load_spec().processes if p.name == "omiInferenceRequest").topics())


def _omi(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omi_dsf", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


@pytest.fixture(scope="module")
def world(dsf_testbed, fhir_store, tmp_path_factory):
    state = dsf_testbed
    folder = tmp_path_factory.mktemp("client-dsf")
    ai, dic = state.site("ai"), state.site("dic")
    # the registry: its own server certificate, client certificates from the DSF test bed CA
    ca = TestCA(folder / "registry-pki")
    ca.ensure()
    server = ca.issue("registry", "localhost", server=True, client=False)
    (folder / "key-password").write_text(KEY_PASSWORD)
    der = x509.load_pem_x509_certificate(Path(ai.client_cert).read_bytes()).public_bytes(serialization.Encoding.DER)
    port = free_port()
    from omi_dsf.peer import Peer
    from omi_dsf.registry.store import Store
    Store(Peer(url=fhir_store.state().base_url)).clear()   # no entries of earlier tests in the session's store
    cfg = {"host": "127.0.0.1", "port": port, "fhir_store": {"url": fhir_store.state().base_url},
           "tls": {"certfile": str(server.cert), "keyfile": str(server.key),
                   "keyfile_password_file": "key-password", "client_ca": state.ca_cert},
           "auth": {"organizations": {thumbprint(der): ai.identifier}, "cert_attribute": None},
           "health": {"interval": 0}}
    (folder / "registry.yaml").write_text(yaml.safe_dump(cfg))
    log = (folder / "registry.log").open("wb")
    registry = subprocess.Popen([sys.executable, "-m", "omi_dsf", "registry", "--config", str(folder / "registry.yaml")],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    try:
        ctx = ssl.create_default_context(cafile=str(ca.cert_path))
        ctx.load_cert_chain(ai.client_cert, ai.client_key, ai.key_password)
        with httpx.Client(base_url=url, verify=ctx, timeout=10) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert registry.poll() is None and time.monotonic() < deadline, (folder / "registry.log").read_text()
                time.sleep(0.2)
            b = service_bundle(ai.identifier, "lung-seg", name="Lung segmentation", model="lung-seg",
                               model_version="0.1.0", oip_url="http://127.0.0.1:9", modality=["CT"],
                               body_site=[("http://snomed.info/sct", "39607008")])
            r = c.post("/fhir", json=b, headers={"Content-Type": "application/fhir+json"})
            assert r.status_code == 200, r.text
        # the DIC's DICOMweb gateway (embedded store) that `omi results` lists the stored series from
        gateway = GatewayProcess({"listen": {"host": "127.0.0.1", "port": free_port()}, "auth": {"anonymous": True},
                                  "backends": {"PACS": {"type": "store", "path": str(folder / "pacs")}}},
                                 folder, timeout=60).start()
        procs.append(gateway.proc)
        sites = write_testbed_site_configs(state, folder / "sites", worker={"poll_interval": 2, "lease_ttl": 4,
                                                                             "backoff": 0.3, "max_attempts": 2})
        raw = yaml.safe_load(sites["dic"].read_text())
        # insecure: the test's own gateway is plain http on 127.0.0.1 (the CLI refuses http otherwise)
        raw.update(registry_url=url, registry_ca_file=str(ca.cert_path), insecure=True)
        sites["dic"].write_text(yaml.safe_dump(raw))
        raw["steps"] = {"demo_deny_topics": ["send"]}
        deny = folder / "sites" / "dic-deny.yaml"
        deny.write_text(yaml.safe_dump(raw))
        raw_ai = yaml.safe_load(sites["ai"].read_text())
        raw_ai["steps"] = {"demo_deny_topics": ["infer"]}
        ai_deny = folder / "sites" / "ai-deny.yaml"
        ai_deny.write_text(yaml.safe_dump(raw_ai))

        def worker(config: Path, topics: str, name: str) -> subprocess.Popen:
            out = (folder / f"{name}.log").open("ab")
            p = subprocess.Popen([sys.executable, "-m", "omi_dsf", "worker", "--site", str(config), "--topics", topics,
                                  "--demo"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            procs.append(p)
            return p

        yield {"dic": str(sites["dic"]), "deny": str(deny), "ai": str(sites["ai"]), "ai_deny": str(ai_deny),
               "worker": worker, "gateway": gateway.url,
               "registry": url, "dic_id": dic.identifier, "ai_id": ai.identifier}
    finally:
        _stop(procs)
        _stop([registry])


def _study() -> str:
    return f"1.2.826.0.1.3680043.8.498.{os.getpid()}.{time.time_ns()}"


def test_services_from_the_registry_named_in_the_site_config(world):
    r = _omi("services", "--site", world["dic"], "--json", "--modality", "CT")
    assert r.returncode == 0, r.stderr
    (svc,) = json.loads(r.stdout)
    assert svc["id"] == "lung-seg" and svc["provider"] == world["ai_id"]


@pytest.fixture
def stop_after():
    procs: list[subprocess.Popen] = []
    yield procs
    _stop(procs)   # also when the test failed: a left-over worker would take the next test's items


def test_submit_follow_and_fetch_results(world, stop_after):
    dic = world["worker"](Path(world["dic"]), DIC_TOPICS, "dic-worker")
    ai = world["worker"](Path(world["ai"]), "infer", "ai-worker")
    stop_after += [dic, ai]
    study = _study()
    r = _omi("submit", "--study", study, "--patient", "PID-CLIENT-1", "--service", "lung-seg",
             "--site", world["dic"], "--json")
    assert r.returncode == 0, r.stderr
    sub = json.loads(r.stdout)
    key = sub["business_key"]
    assert len(key) >= 32 and sub["provider"] == world["ai_id"] and sub["task"].startswith("Task/")
    assert "PID-CLIENT-1" not in r.stdout + r.stderr   # the patient id is never echoed

    watch = _omi("status", key, "--site", world["dic"], "--watch", "--interval", "1", "--timeout", "240", timeout=300)
    assert watch.returncode == 0, watch.stderr
    frames = watch.stdout.split(f"request {key}: ")
    assert len(frames) >= 3, watch.stdout            # it showed progress, not just the end
    assert frames[-1].startswith("completed")
    assert all(f"[x] {step}" in frames[-1] for step in ("consent", "prepare", "send", "infer", "return"))

    st = json.loads(_omi("status", key, "--site", world["dic"], "--json").stdout)
    assert st["task_status"] == "completed" and st["current"] == "completed"
    assert [s["state"] for s in st["steps"]] == ["done"] * 5
    assert st["steps"][3]["updated"]   # infer: when the provider's result message arrived at this site
    assert st["service"] == "lung-seg" and st["provider"] == world["ai_id"]

    res = _omi("results", key, "--site", world["dic"], "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    # the demo handlers answer every output with '<topic>-<fingerprint of its inputs>'
    assert out["result_study_instance_uid"].startswith("infer-") and out["result_location"].startswith("infer-")
    assert out["stored_study_instance_uid"].startswith("return-") and out["error"] is None
    assert "stored_series" not in out   # no gateway configured: the Task's outputs only
    text = _omi("results", key, "--site", world["dic"]).stdout
    assert "stored in the local PACS as study: return-" in text
    # the demo's stored "UID" is a fingerprint, not a DICOM UID: the client says so before asking the gateway
    r = _omi("results", key, "--site", world["dic"], "--gateway", world["gateway"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"'{out['stored_study_instance_uid']}' is not a valid DICOM UID" in r.stderr
    # (a gateway that does not answer: tests/test_client.py, the demo's stored "UID" is refused first)

    listing = _omi("status", "--site", world["dic"], "--json", "--limit", "50")
    assert any(p["business_key"] == key and p["current"] == "completed" for p in json.loads(listing.stdout))
    _stop([dic, ai])


def test_denied_request_shows_where_and_why(world, stop_after):
    deny = world["worker"](Path(world["deny"]), DIC_TOPICS, "deny-worker")
    stop_after.append(deny)
    r = _omi("submit", "--study", _study(), "--patient", "PID-CLIENT-2", "--service", "lung-seg",
             "--provider", world["ai_id"], "--site", world["dic"], "--json")
    assert r.returncode == 0, r.stderr
    key = json.loads(r.stdout)["business_key"]
    watch = _omi("status", key, "--site", world["dic"], "--watch", "--interval", "1", "--timeout", "180", timeout=240)
    assert watch.returncode == 0, watch.stderr
    st = json.loads(_omi("status", key, "--site", world["dic"], "--json").stdout)
    assert st["task_status"] == "failed"
    steps = {s["name"]: s for s in st["steps"]}
    assert steps["consent"]["state"] == "done"
    assert steps["send"]["state"] == "failed" and "denied by the demo handler" in steps["send"]["detail"]
    # the provider's infer, started after prepare, did not finish: the request failed at send
    assert [steps[n]["state"] for n in ("infer", "return")] == ["stopped", "pending"]
    res = _omi("results", key, "--site", world["dic"])
    assert res.returncode == 1 and "error: send: denied by the demo handler" in res.stdout
    _stop([deny])


def test_provider_error_shows_at_infer(world, stop_after):
    procs = [world["worker"](Path(world["dic"]), DIC_TOPICS, "dic-worker-2"),
             world["worker"](Path(world["ai_deny"]), "infer", "ai-deny-worker")]
    stop_after += procs
    r = _omi("submit", "--study", _study(), "--patient", "PID-CLIENT-3", "--service", "lung-seg",
             "--site", world["dic"], "--json")
    assert r.returncode == 0, r.stderr
    key = json.loads(r.stdout)["business_key"]
    watch = _omi("status", key, "--site", world["dic"], "--watch", "--interval", "1", "--timeout", "180", timeout=240)
    assert watch.returncode == 0, watch.stderr
    st = json.loads(_omi("status", key, "--site", world["dic"], "--json").stdout)
    steps = {s["name"]: s for s in st["steps"]}
    assert st["task_status"] == "failed" and st["current"] == "failed"
    assert [steps[n]["state"] for n in ("consent", "prepare", "send")] == ["done"] * 3
    assert steps["infer"]["state"] == "failed"
    assert steps["infer"]["detail"] == "at the provider: infer: denied by the demo handler"
    assert steps["return"]["state"] == "pending"
    _stop(procs)


def test_client_errors_are_one_line(world):
    r = _omi("status", "0000-no-such-key", "--site", world["dic"])
    assert r.returncode == 2 and r.stderr == "error: no OMI inference request with business key 0000-no-such-key at this site\n"
    r = _omi("submit", "--study", "1.2.3", "--patient", "P", "--service", "no-such-service", "--site", world["dic"])
    assert r.returncode == 2 and "no AI service 'no-such-service' in the registry" in r.stderr
    assert r.stderr.count("\n") == 1


def _start_tasks_per_study(site: str, studies: list[str]) -> dict[str, int]:
    """How many start Tasks the DIC's DSF holds for each study (read with the site's own client)."""
    from omi_dsf.client.requests import request_tasks
    from omi_dsf.dsf.client import DsfClient
    from omi_dsf.dsf.tasks import input_value
    from omi_dsf.worker.config import load_site_config

    with DsfClient(load_site_config(site).identity) as client:
        uids = [input_value(t, "study-instance-uid") for t in request_tasks(client, 1000)]
    return {s: uids.count(s) for s in studies}


def test_cohort_runs_resumes_and_reports(world, stop_after, tmp_path):
    """Four studies, two in flight: two complete, one fails at send, one is refused by
    consent; the run is killed midway and a crash between creating a Task and recording it is
    staged; the second run adopts that Task, skips what finished, and no study is submitted twice.
    --retry-failed runs only the failed one again."""
    raw = yaml.safe_load(Path(world["dic"]).read_text())
    raw["steps"] = {"demo_delay": 1, "demo_deny_patients": {"consent": ["P-NOCONSENT"], "send": ["P-FAIL"]}}
    raw["in_flight_per_provider"] = 2
    cfg = Path(world["dic"]).with_name("dic-cohort.yaml")
    cfg.write_text(yaml.safe_dump(raw))
    stop_after += [world["worker"](cfg, DIC_TOPICS, "cohort-dic-worker"),
                   world["worker"](Path(world["ai"]), "infer", "cohort-ai-worker")]
    studies = {_study(): p for p in ("P-OK-1", "P-FAIL", "P-OK-2", "P-NOCONSENT")}
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("study_instance_uid,patient_id\n" + "".join(f"{s},{p}\n" for s, p in studies.items()))
    record = tmp_path / "cohort.record.csv"
    cmd = [sys.executable, "-m", "omi_dsf", "submit", "--cohort", str(cohort), "--service", "lung-seg",
           "--site", str(cfg), "--parallel", "2", "--interval", "0.5"]

    def rows() -> dict[str, dict]:
        import csv
        with record.open() as f:
            return {r["study_uid"]: r for r in csv.DictReader(f)}

    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (record.exists() and sum(r["task"] != "" for r in rows().values()) >= 2):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.2)
    first.kill()                                         # interrupted, as a closed terminal would
    first.wait(10)
    got = rows()
    in_flight = [s for s, r in got.items() if r["task"]]
    assert len(in_flight) == 2 and all(r["status"] == "pending" for s, r in got.items() if s not in in_flight)
    # stage a crash between creating the Task and writing it down: the row says `submitting`
    import csv
    staged = in_flight[0]
    staged_task = got[staged]["task"]
    got[staged].update(status="submitting", task="", business_key="")
    with record.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(next(iter(got.values()))))
        w.writeheader()
        w.writerows(got.values())

    second = subprocess.run(cmd + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert second.returncode == 1, second.stderr          # one study failed: exit 1, the cohort went on
    s = json.loads(second.stdout)
    assert (s["completed"], s["failed"], s["refused"], s["in_flight"], s["pending"]) == (2, 1, 1, 0, 0)
    assert list(s["failed_by_reason"]) == ["send: denied by the demo handler for this patient"]
    assert list(s["refused_by_reason"]) == ["consent: denied by the demo handler for this patient"]
    final = rows()
    by_patient = {studies[u]: r for u, r in final.items()}
    assert by_patient["P-OK-1"]["stored_study_uid"].startswith("return-")
    assert by_patient["P-OK-1"]["result_location"].startswith("infer-")
    assert final[staged]["task"] == staged_task and final[staged]["attempts"] == "1"   # adopted, not sent again
    assert _start_tasks_per_study(str(cfg), list(studies)) == dict.fromkeys(studies, 1)   # none twice
    assert "P-OK" not in second.stdout + second.stderr    # no patient identifiers in the output

    st = _omi("status", "--cohort", str(cohort), "--site", str(cfg), "--json")
    assert st.returncode == 0, st.stderr
    shown = json.loads(st.stdout)
    assert (shown["completed"], shown["failed"], shown["refused"]) == (2, 1, 1) and "P-FAIL" not in st.stdout
    text = _omi("status", "--cohort", str(record), "--site", str(cfg)).stdout
    assert "2 completed, 1 failed, 1 refused by consent" in text and "send: denied" in text

    again = subprocess.run(cmd + ["--json", "--retry-failed"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1, again.stderr
    counts = _start_tasks_per_study(str(cfg), list(studies))
    assert counts == {s: (2 if p == "P-FAIL" else 1) for s, p in studies.items()}
    assert next(r for r in rows().values() if r["patient"] == "P-FAIL")["attempts"] == "2"
