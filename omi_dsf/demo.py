"""The whole OMI flow on one machine: two DSF sites (the test bed), the requester's legacy PACS,
both sites' DICOMweb gateways, the reference AI service and the workers of both sites.

`python -m omi_dsf demo` brings it up, runs one inference end to end, prints what happened at each
step and where the results are, and shuts everything down (`--keep` leaves the DSF test bed
running). The end-to-end tests drive the same `Demo` class, with faults switched in. It is the
harness's user (omi_dsf/testkit: PACS, gateway and AI service launchers, the phantom, site files);
`python -m omi_dsf sample-study` writes the phantom study alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from cryptography.hazmat.primitives import serialization

from omi_dsf.dsf.client import DsfClient
from omi_dsf.errors import UserError
from omi_dsf.dsf.tasks import message_task, outputs
from omi_dsf.testbed.certs import TestCA
from omi_dsf.testkit import phantom, procs
from omi_dsf.testkit.ai_service import AiServiceProcess, write_device
from omi_dsf.testkit.gateway import GatewayProcess
from omi_dsf.testkit.legacy_pacs import Dcmqrscp
from omi_dsf.testkit.procs import free_port
from omi_dsf.testkit.sites import write_testbed_site_configs
from omi_dsf.worker.config import load_site_config

REQUESTER, PROVIDER = "dic.omi.test", "ai.omi.test"
STEPS = ("consent", "prepare", "send", "infer", "return")
MII_POLICY = "urn:oid:2.16.840.1.113883.3.1937.777.24.5.3"


PATIENT_SYSTEM = "https://dic.omi.test/sid/patient-id"   # the requester's patient identifiers (demo)


def broad_consent(patient_id: str, patient: dict | None = None) -> dict:
    """An MII Broad Consent permitting scientific use of medical data (what the consent step needs);
    `patient`: the reference to the Patient (default: by identifier)."""
    return {
        "resourceType": "Consent", "status": "active",
        "meta": {"profile": ["https://www.medizininformatik-initiative.de/fhir/modul-consent/StructureDefinition/mii-pr-consent-einwilligung"]},
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
        "patient": patient or {"identifier": {"value": patient_id}}, "dateTime": "2025-01-15",
        "policy": [{"uri": "urn:oid:2.16.840.1.113883.3.1937.777.24.2.1791"}],
        "provision": {"type": "deny", "period": {"start": "2025-01-15", "end": "2055-01-14"}, "provision": [
            {"type": "permit", "period": {"start": "2025-01-15", "end": "2055-01-14"},
             "code": [{"coding": [{"system": MII_POLICY, "code": f"2.16.840.1.113883.3.1937.777.24.5.3.{n}"}]}]}
            for n in (6, 7, 8)]},
    }


def load_consent(client, patient_id: str) -> None:
    """The patient (found or created by identifier) and its broad consent, in one transaction into
    the FHIR store that `client` (an httpx client at its base) talks to."""
    patient = f"urn:uuid:{uuid.uuid4()}"
    client.post("", headers={"Content-Type": "application/fhir+json"}, json={
        "resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": patient, "resource": {"resourceType": "Patient", "identifier": [
                {"system": PATIENT_SYSTEM, "value": patient_id}]},
             "request": {"method": "POST", "url": "Patient",
                         "ifNoneExist": f"identifier={PATIENT_SYSTEM}|{patient_id}"}},
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": broad_consent(patient_id, {"reference": patient}),
             "request": {"method": "POST", "url": "Consent"}}]}).raise_for_status()


def _plain_key(encrypted: Path, password: str, dest: Path) -> Path:
    """The gateway and the HTTP client read unencrypted keys; keep such copies 0600 in the demo folder."""
    key = serialization.load_pem_private_key(encrypted.read_bytes(), password.encode())
    dest.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    dest.chmod(0o600)
    return dest


@dataclass
class Study:
    uid: str
    patient_id: str
    patient_name: str
    files: list[Path]


@dataclass
class Demo:
    state: object                      # the running test bed (omi_dsf.testbed.bed.State)
    folder: Path
    slices: int = 20
    size: int = 256
    worker_settings: dict = field(default_factory=lambda: {"poll_interval": 2, "lease_ttl": 20, "backoff": 1,
                                                           "max_attempts": 3})
    out: object = print
    send: dict = field(default_factory=dict)   # the requester's `send` step settings (batch_mb, batch_instances)
    ai_server: str = "reference"               # the provider's model server: reference, kserve or mlserver
    fhir_store: bool = False                   # the DIC's FHIR store (the test bed's): consent from it, results into it

    def __post_init__(self):
        self.folder = Path(self.folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.servers: list = []
        self.studies: list[Study] = []

    # -- the non-DSF parts of both sites ------------------------------------------------------

    def start(self) -> "Demo":
        """Start every non-DSF server of both sites; one that fails stops those already started."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "Demo":
        f = self.folder
        ca = TestCA(f / "pki")
        ca.ensure()
        self.ca = str(ca.cert_path)
        gw_cert = ca.issue("gateway", "localhost", server=True, client=False)
        dic_client = ca.issue("dic-gateway-client", "dic.omi.test gateway client", server=False, client=True)
        gw_key = _plain_key(gw_cert.key, gw_cert.password, f / "pki" / "gateway.plain.key")
        self.dic_client = (str(dic_client.cert), str(_plain_key(dic_client.key, dic_client.password,
                                                                 f / "pki" / "dic-gateway-client.plain.key")))
        tls = {"certfile": str(gw_cert.cert), "keyfile": str(gw_key), "client_ca": self.ca}
        # the requester's gateway also knows the site's DSF client certificate (the omi client's, for
        # `omi submit --query` and `omi results`)
        own = f / "pki" / "requester-gateway-clients.pem"
        own.write_bytes(Path(self.ca).read_bytes() + Path(self.state.ca_cert).read_bytes())
        self.pacs = Dcmqrscp(f / "pacs", aet="DICPACS").start()
        self.servers.append(self.pacs)
        # each site's gateway in its own process, configured as an operator would (docs/gateway.md)
        requester_gw = GatewayProcess({
            "listen": {"host": "127.0.0.1", "port": free_port()}, "tls": {**tls, "client_ca": str(own)},
            "auth": {"anonymous": True},
            "backends": {"DICPACS": {"type": "dimse", "host": self.pacs.host, "port": self.pacs.port,
                                     "called_aet": self.pacs.aet}},
            "default": "DICPACS"}, f / "gateways", "requester-gateway", ca_file=self.ca).start()
        self.servers.append(requester_gw)
        provider_store = f / "provider-gateway"
        provider_gw = GatewayProcess({
            "listen": {"host": "127.0.0.1", "port": free_port()}, "tls": tls, "auth": {"anonymous": True},
            "backends": {"INBOX": {"type": "store", "path": str(provider_store)}}, "default": "INBOX"},
            f / "gateways", "provider-gateway", ca_file=self.ca).start()
        self.servers.append(provider_gw)
        self.requester_gw, self.provider_gw, self.provider_store = requester_gw.url, provider_gw.url, provider_store
        self.gateways = {"requester": requester_gw, "provider": provider_gw}
        self.start_ai_service()
        (f / "consents").mkdir(exist_ok=True)
        key = f / "requester-deid.key"
        if not key.exists():
            key.write_text(os.urandom(32).hex())
            key.chmod(0o600)
        consent: dict = {"kind": "folder", "path": str(f / "consents")}
        fhir_results: dict | str = str(f / "fhir-results")
        if self.fhir_store:
            self._use_fhir_store()
            consent = {"kind": "fhir", "url": self.fhir_base, "identifier_system": PATIENT_SYSTEM}
            fhir_results = {"url": self.fhir_base}
        steps = {
            "dic": {
                "gateway_url": self.requester_gw,
                "consent": consent,
                "pseudonymization": {
                    "domain": "omi-demo", "key_file": str(key), "store": str(f / "requester-pseudonyms.sqlite"),
                    "source": {"kind": "dicomweb", "url": self.requester_gw, "ca_file": self.ca},
                },
                "providers": {PROVIDER: {"gateway_url": self.provider_gw, "ca_file": self.ca,
                                         "client_cert": self.dic_client[0], "client_key": self.dic_client[1]}},
                "gateway_ca_file": self.ca,
                "fhir_results": fhir_results,
                **({"send": self.send} if self.send else {}),
            },
            "ai": {"gateway_url": self.provider_gw, "gateway_ca_file": self.ca, "ai_services": {"lung-seg": self.ai_entry()},
                   "ai_timeout_s": 300},
        }
        self.sites = write_testbed_site_configs(self.state, f / "sites", steps=steps, worker=self.worker_settings,
                                                top={"dic": {"gateway_url": self.requester_gw, "gateway_ca_file": self.ca}})
        self.dsf = DsfClient(load_site_config(self.sites["dic"]).identity)
        return self

    def _use_fhir_store(self) -> None:
        """The requester's FHIR store: the one the test bed started for its DIC."""
        from omi_dsf.testbed.bed import fhir_store

        site = self.state.site("dic")
        if not site.fhir_store_dir:
            raise UserError("the test bed runs no FHIR store for the DIC (it was started with --no-fhir-store); "
                            "stop it and start it again without that option")
        self.store = fhir_store(site)
        if not self.store.running():
            raise UserError(f"the DIC's FHIR store is not running (python -m omi_dsf testbed status); "
                            f"see {self.store.dir / 'fhir-store.log'}")
        self.fhir_base = site.fhir_store_url

    def start_ai_service(self) -> None:
        """(Re)start the provider's AI service (on `ai_server`), on the port it had before if any."""
        port = int(self.ai_url.rsplit(":", 1)[1]) if getattr(self, "ai_url", None) else None
        self.ai_service = AiServiceProcess(port, log=self.folder / "ai-service.log", timeout=120,
                                           server=self.ai_server).start()
        self.ai_url = self.ai_service.url

    def ai_entry(self) -> dict:
        """The provider site's `ai_services` entry; KServe's model metadata has no parameters, so the
        model's Device (as registered) tells the step its modality, slice limits and labels."""
        entry = {"url": self.ai_url, "model": "lung-seg"}
        if self.ai_server == "kserve":
            entry["device"] = str(write_device(self.folder / "lung-seg-device.json", self.ai_url))
        return entry

    def stop_ai_service(self) -> None:
        self.ai_service.stop()

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "omi_dsf", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def stop_process(self, name: str, kill: bool = False) -> None:
        procs.stop(self.procs.pop(name, None), grace=30, kill=kill)

    def start_workers(self, dic_topics: str = "consent,prepare,send,return", name: str = "dic-worker",
                      no_op: bool = False) -> None:
        """Both sites' workers; `no_op`: with the demo handler, which answers at once and moves no data
        (what the DSF alone costs a request)."""
        extra = ["--demo"] if no_op else []
        self._spawn(name, ["worker", "--site", str(self.sites["dic"]), "--topics", dic_topics, *extra])
        if "ai-worker" not in self.procs:
            self._spawn("ai-worker", ["worker", "--site", str(self.sites["ai"]), "--topics", "infer", *extra])

    # -- a request ------------------------------------------------------------------------------

    def add_study(self, seed: int, consent: bool = True, patient: dict | None = None) -> Study:
        """A phantom CT study in the PACS (`patient`: keys of phantom.write_ct_study's `patient`)."""
        files = phantom.write_ct_study(self.folder / "studies" / str(seed), slices=self.slices, seed=seed,
                                       rows=self.size, cols=self.size, patient=patient)
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        self.pacs.load(files)
        study = Study(str(ds.StudyInstanceUID), str(ds.PatientID), str(ds.PatientName), files)
        if consent and self.fhir_store:
            self._load_consent(study.patient_id)
        elif consent:
            (self.folder / "consents" / f"{study.patient_id}.json").write_text(json.dumps(broad_consent(study.patient_id)))
        self.studies.append(study)
        return study

    def _load_consent(self, patient_id: str) -> None:
        with self.store.client() as c:
            load_consent(c, patient_id)

    def fhir_summary(self, study: Study) -> str:
        """The FHIR store's URL, how many resources of each kind it holds, and the study's ImagingStudy."""
        from omi_dsf.client import fhir_record

        with self.store.client() as c:
            held = fhir_record.counts(c, self.fhir_base)
            record = fhir_record.study_record(c, self.fhir_base, study.uid)
        return "\n".join([f"FHIR store {self.fhir_base} holds: "
                          + ", ".join(f"{n} {t}" for t, n in held.items() if n),
                          fhir_record.render(record, self.fhir_base)])

    def submit(self, study: Study, service: str = "lung-seg") -> str:
        task = message_task("startOmiInference", REQUESTER, REQUESTER, {
            "study-instance-uid": study.uid, "patient-identifier": study.patient_id,
            "ai-service-identifier": service, "provider-organization": PROVIDER})
        return self.dsf.create(task)["id"]

    def business_key(self, task_id: str, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            task = self.dsf.read("Task", task_id)
            bk = next((i["valueString"] for i in task.get("input", [])
                       if i["type"]["coding"][0]["code"] == "business-key"), None)
            if bk:
                return bk
            time.sleep(0.5)
        raise TimeoutError(f"the DSF did not start Task/{task_id}")

    def step_states(self, business_key: str) -> dict[str, str]:
        """Work item status per step at both sites (the provider's infer from its own FHIR server)."""
        states = {}
        for key, client in (("dic", self.dsf), ("ai", None)):
            c = client or DsfClient(load_site_config(self.sites[key]).identity)
            try:
                for qr in c.search("QuestionnaireResponse", {"_sort": "_lastUpdated"}):
                    items = {i["linkId"]: i for i in qr.get("item", [])}
                    bk = (items.get("business-key", {}).get("answer") or [{}])[0].get("valueString")
                    if bk != business_key:
                        continue
                    topic = qr["questionnaire"].split("/omi-")[-1].split("|")[0]
                    failed = bool(items.get("error", {}).get("answer"))
                    states[topic] = "failed" if failed else qr["status"]
            finally:
                if client is None:
                    c.close()
        return states

    def wait(self, task_id: str, timeout: float = 600, show: bool = False) -> dict:
        end, seen, t0 = time.monotonic() + timeout, {}, time.monotonic()
        bk = self.business_key(task_id)
        while time.monotonic() < end:
            task = self.dsf.read("Task", task_id)
            if show:
                for step, st in self.step_states(bk).items():
                    if seen.get(step) != st:
                        seen[step] = st
                        self.out(f"  {time.monotonic() - t0:6.1f} s  {step:13s} {st}")
            if task["status"] in ("completed", "failed"):
                return task
            time.sleep(0.2)
        raise TimeoutError(f"Task/{task_id} not finished within {timeout:.0f} s")

    def stop(self) -> None:
        for name in list(self.procs):
            self.stop_process(name)
        if getattr(self, "ai_service", None):
            self.ai_service.stop()
        for s in reversed(self.servers):
            s.stop()
        self.servers.clear()
        if getattr(self, "dsf", None):
            self.dsf.close()


# -- the command ------------------------------------------------------------------------------

def register(sub) -> None:
    from omi_dsf.testbed.cli import add_dsf_home_arguments

    p = sub.add_parser("demo", help="two DSF sites on this machine: one inference end to end")
    p.add_argument("--dir", default=".testbed", help="test bed folder (default .testbed)")
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--keep", action="store_true", help="leave the DSF test bed running afterwards")
    add_dsf_home_arguments(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("sample-study", help="write a synthetic chest CT study (fake identity) as DICOM files")
    p.add_argument("--out", type=Path, required=True, help="directory for the files (created)")
    p.add_argument("--slices", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="same seed, same study; other seed, other patient")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=512)
    p.set_defaults(func=_sample_study)


def _sample_study(args) -> int:
    try:
        paths = phantom.write_ct_study(args.out, slices=args.slices, seed=args.seed, rows=args.rows, cols=args.cols)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    # Only counts and the location: the files' headers count as patient data.
    print(f"wrote {len(paths)} CT slices to {args.out}")
    return 0


def _run(args) -> int:
    from omi_dsf.audit import AuditTrail
    from omi_dsf.testbed.bed import State, TestBed, pid_alive

    folder = Path(args.dir)
    st = State.load(folder)
    bed = TestBed(folder, dsf_home=args.dsf_home, site_dsf_homes=dict(args.site_dsf_home))
    if not (st and all(pid_alive(s.pid) for s in st.servers)):
        print("starting the DSF test bed (two sites, the DIC's FHIR store; takes a few minutes) …")
    bed.up(timeout=900)   # a running one is used as it is, if it runs the DSF versions asked for
    st = State.load(folder)
    print("DSF: " + ", ".join(f"{s.key} {s.dsf_version}" for s in st.sites))
    demo = Demo(st, folder / "demo", slices=args.slices, fhir_store=True)
    try:
        print("starting the legacy PACS, both gateways, the AI service and the workers …")
        demo.start()
        demo.start_workers()
        study = demo.add_study(seed=int(time.time()) % 100000)
        print(f"requester's PACS holds a {args.slices}-slice CT study of a synthetic patient (fake identity)")
        task_id = demo.submit(study)
        bk = demo.business_key(task_id)
        print(f"started: Task/{task_id} at {st.site('dic').fhir_url}, business key {bk}")
        task = demo.wait(task_id, show=True)
        out = outputs(task)
        print(f"start Task: {task['status']}")
        for k, v in out.items():
            print(f"  {k}: {v}")
        if task["status"] == "completed":
            print(f"results stored in the legacy PACS {demo.pacs.aet}@{demo.pacs.host}:{demo.pacs.port} under the "
                  f"original patient's study; FHIR result in the requester's FHIR store")
            print(demo.fhir_summary(study))
        for site in ("dic", "ai"):
            for e in AuditTrail(demo.folder / "sites" / f"{site}-audit.sqlite").events(bk):
                print(f"  audit {site}: {e.time} {e.action} {json.dumps(e.details, sort_keys=True)}")
        return 0 if task["status"] == "completed" else 1
    finally:
        demo.stop()
        if not args.keep:
            bed.down()
        else:
            print(f"DSF test bed left running: python -m omi_dsf testbed status --dir {folder}")
