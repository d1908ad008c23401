"""The requester's send and return steps against real servers on 127.0.0.1.

The send step streams the study from the site's source (a folder here; the site's gateway in
front of dcmqrscp in test_send_reads_the_study_through_the_site_gateway) through de-identification
and the leak check to the provider's gateway.

The provider's gateway is the project's DICOMweb gateway (store backend) over TLS with a test CA
made here; the requester's legacy PACS is dcmtk dcmqrscp, behind the requester's own gateway
(dimse backend), which the return step stores the results through; the provider's part in between is the
real `infer` step with the reference AI service (`python -m omi_dsf ai-service`). Studies are
small phantoms (8 slices of 128×128) with fake identities. The tests on the requester site
(dcmqrscp) or the AI service are integration; the STOW-RS body is a unit test. The FHIR result in
the DIC's FHIR store: tests/test_fhir_results.py.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import re
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from helpers_pki import issue, make_ca, write_ca, write_pem
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from conftest import free_port
from omi_dsf.audit import AuditTrail
from omi_dsf.deid.deidentify import Deidentifier, uid_for
from omi_dsf.deid.identity import Identity
from omi_dsf.deid.keys import load_key
from omi_dsf.deid.leakcheck import find_leaks
from omi_dsf.dicomweb.config import parse_config
from omi_dsf.dicomweb.server import BackgroundServer
from omi_dsf.config import ConfigError
from omi_dsf.steps.api import StepContext, StepError
from omi_dsf.steps.settings import step_settings
from omi_dsf.steps.infer import infer
from omi_dsf.steps.return_ import return_results
from omi_dsf.steps.send import send
from omi_dsf.testkit import phantom
from omi_dsf.testkit.ai_service import AiServiceProcess
from omi_dsf.testkit.legacy_pacs import Dcmqrscp
from omi_dsf.transfer import stow as transfer_stow
from omi_dsf.transfer.errors import TransferError
from omi_dsf.errors import RetryableError
from omi_dsf.transfer.provider import ProviderUnreachable


PROVIDER = "ai.omi.test"
SLICES, SIZE = 8, 128
STORED = SLICES + 1     # at the provider's gateway after a send: the study's instances and its manifest


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    """One CA for the provider's gateway, a client certificate, and a stranger CA."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = make_ca("OMI transfer test CA")
    server = write_pem(d, "gateway", *issue(ca_key, ca, "gateway.ai.omi.test", ExtendedKeyUsageOID.SERVER_AUTH,
                                            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    client = write_pem(d, "dic", *issue(ca_key, ca, "dic.omi.test", ExtendedKeyUsageOID.CLIENT_AUTH))
    _, other = make_ca("someone else's CA")
    return {"ca": write_ca(d / "ca.pem", ca), "other_ca": write_ca(d / "other-ca.pem", other),
            "server": server, "client": client}


# -- the provider: gateway (store backend, TLS) and the reference AI service ----------------------
@pytest.fixture(scope="module")
def gateway(tmp_path_factory, pki):
    store = tmp_path_factory.mktemp("provider-store")
    cfg = parse_config({"listen": {"port": free_port()}, "auth": {"anonymous": True}, "default": "INBOX",
                        "tls": {"certfile": pki["server"][0], "keyfile": pki["server"][1], "client_ca": pki["ca"]},
                        "backends": {"INBOX": {"type": "store", "path": str(store)}}})
    with BackgroundServer(cfg) as server:
        yield server.url, store


@pytest.fixture(scope="module")
def ai_url(tmp_path_factory):
    with AiServiceProcess(log=tmp_path_factory.mktemp("ai") / "ai-service.log") as service:
        yield service.url


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with Dcmqrscp(tmp_path_factory.mktemp("dcmqrscp"), aet="DICPACS") as p:
        yield p


def _pacs_gateway(pacs, called_aet: str) -> BackgroundServer:
    return BackgroundServer(parse_config({
        "listen": {"port": free_port()}, "auth": {"anonymous": True}, "default": "DICPACS",
        "backends": {"DICPACS": {"type": "dimse", "host": pacs.host, "port": pacs.port, "called_aet": called_aet}}}))


@pytest.fixture(scope="module")
def site_gateway(pacs):
    """The requester's own gateway in front of its PACS (plain http on 127.0.0.1)."""
    with _pacs_gateway(pacs, pacs.aet) as server:
        yield server.url


# -- the requester site ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory, pki, gateway, pacs, site_gateway) -> dict:
    root = tmp_path_factory.mktemp("requester")
    key = root / "site.key"
    key.write_text("transfer-test-site-key-0123456789")
    return {
        "root": root,
        "steps": {
            "pseudonymization": {
                "domain": "omi-transfer-test", "key_file": str(key), "store": str(root / "site.sqlite"),
                "source": {"kind": "folder", "path": str(root / "pacs-export" / "{study_uid}")},
            },
            "providers": {PROVIDER: {"gateway_url": gateway[0], "ca_file": pki["ca"],
                                     "client_cert": pki["client"][0], "client_key": pki["client"][1]}},
            "gateway_url": site_gateway,
            "fhir_results": str(root / "fhir-results"),
            "audit": str(root / "audit.sqlite"),
        },
    }


def _study(site: dict, seed: int) -> tuple[str, list[Path]]:
    staging = site["root"] / "staging" / str(seed)
    paths = phantom.write_ct_study(staging, slices=SLICES, seed=seed, rows=SIZE, cols=SIZE)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    folder = site["root"] / "pacs-export" / first.StudyInstanceUID
    folder.mkdir(parents=True)
    moved = []
    for p in paths:
        p.rename(folder / p.name)
        moved.append(folder / p.name)
    return str(first.StudyInstanceUID), moved


def _ctx(steps: dict, topic: str, key: str, **extra) -> StepContext:
    return StepContext(topic=topic, business_key=key, site={**steps, **extra}, item_id=f"qr-{topic}-{key}")


def _pseudonymized(site: dict, seed: int, key: str) -> tuple[dict, str, list[Path]]:
    """A study in the site's source: the send step's inputs for it, and the pseudonymized study UID
    it will have (derived from the site key)."""
    study_uid, paths = _study(site, seed)
    original = pydicom.dcmread(paths[0], stop_before_pixels=True)
    cfg = site["steps"]["pseudonymization"]
    inputs = {"study-instance-uid": study_uid, "patient-identifier": str(original.PatientID),
              "provider-organization": PROVIDER}
    return ({"inputs": inputs,
             "pseudonymized-study-instance-uid": uid_for(load_key(cfg["key_file"]), cfg["domain"], study_uid)},
            study_uid, paths)


def _send_inputs(pseudo: dict) -> dict:
    return pseudo["inputs"]


def _plant(monkeypatch, change) -> list[int]:
    """De-identification gone wrong: `change(n, ds)` edits instance n (1-based, in the order first
    seen) after it was de-identified, before its leak check, each time it is de-identified (an
    instance de-identified before the study's UIDs were listed may be de-identified again)."""
    real, calls, numbers = Deidentifier.deidentify, [], {}

    def deidentify(self, ds, *args, **kwargs):
        out = real(self, ds, *args, **kwargs)
        n = numbers.setdefault(str(ds.SOPInstanceUID), len(numbers) + 1)
        if n > len(calls):
            calls.append(1)
        change(n, ds)
        return out

    monkeypatch.setattr(Deidentifier, "deidentify", deidentify)
    return calls


def _index(store: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(store / "index.sqlite") as db:
        return db.execute("SELECT study_uid, sop_uid FROM instances").fetchall()


def _at_gateway(store: Path, study_uid: str) -> tuple[int, int]:
    """(index rows, files on disk) of one study in the provider's store."""
    rows = [r for r in _index(store) if r[0] == study_uid]
    files = list((store / "files" / study_uid).rglob("*.dcm")) if (store / "files" / study_uid).exists() else []
    return len(rows), len(files)


def _original_identity(paths: list[Path]) -> Identity:
    identity = Identity()
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        identity.add_dataset(ds)
        identity.add_uids({str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                           str(ds.FrameOfReferenceUID)})
    return identity


def _c_find(pacs, level: str, **keys) -> list[pydicom.Dataset]:
    ae = AE(ae_title="OMITEST")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.aet)
    assert assoc.is_established
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(query, k, v)
    found = []
    try:
        for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status and status.Status in (0xFF00, 0xFF01) and ident is not None:
                found.append(ident)
    finally:
        assoc.release()
    return found


# -- the whole requester round trip ---------------------------------------------------------------
@pytest.mark.integration   # the requester site with dcmqrscp as its PACS
def test_send_infer_return_round_trip(site, gateway, ai_url, pacs, pki, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="omi_dsf")
    steps, (gw_url, store) = site["steps"], gateway
    pseudo, study_uid, paths = _pseudonymized(site, seed=21, key="bk-round-trip")
    original = pydicom.dcmread(paths[0], stop_before_pixels=True)
    pseudo_uid = pseudo["pseudonymized-study-instance-uid"]

    t0 = time.monotonic()
    sent = send(_send_inputs(pseudo), _ctx(steps, "send", "bk-round-trip"))
    t_send = time.monotonic() - t0
    assert sent["study-location"] == f"{gw_url}/studies/{pseudo_uid}"
    assert sent["pseudonymized-study-instance-uid"] == pseudo_uid and sent["instance-count"] == SLICES
    assert sent["pseudonym"].startswith("PSN-") and sent["refused-instance-count"] == 0
    assert _at_gateway(store, pseudo_uid) == (STORED, STORED)

    # a second send (a retried work item) leaves exactly one copy per SOP Instance UID
    again = send(_send_inputs(pseudo), _ctx(steps, "send", "bk-round-trip"))
    assert {k: again[k] for k in sent} == sent       # the same pseudonym and UIDs on a retry
    assert _at_gateway(store, pseudo_uid) == (STORED, STORED)

    # the provider's part: the real infer step against its gateway (trusting the test CA)
    t0 = time.monotonic()
    inferred = infer({"pseudonymized-study-instance-uid": pseudo_uid, "ai-service-identifier": "lung-seg",
                      "study-location": sent["study-location"]},
                     StepContext(topic="infer", business_key="bk-round-trip",
                                 site={"gateway_url": gw_url, "gateway_ca_file": pki["ca"],
                                       "ai_service_url": ai_url, "ai_timeout_s": 120}))
    t_infer = time.monotonic() - t0

    t0 = time.monotonic()
    returned = return_results(
        {"result-location": inferred["result-location"],
         "result-study-instance-uid": inferred["result-study-instance-uid"],
         "pseudonym": sent["pseudonym"], "patient-identifier": str(original.PatientID),
         "study-instance-uid": study_uid, "provider-organization": PROVIDER},
        _ctx(steps, "return", "bk-round-trip"))
    t_return = time.monotonic() - t0
    print(f"send {t_send:.2f} s, infer {t_infer:.2f} s, return {t_return:.2f} s")
    assert returned == {"stored-study-instance-uid": study_uid}

    # the legacy PACS finds SEG and SR under the ORIGINAL PatientID, in the original study
    studies = _c_find(pacs, "STUDY", PatientID=str(original.PatientID), StudyInstanceUID="", PatientName="")
    assert [str(s.StudyInstanceUID) for s in studies] == [study_uid]
    assert str(studies[0].PatientName) == str(original.PatientName)
    series = _c_find(pacs, "SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", Modality="")
    assert sorted(str(s.Modality) for s in series) == ["SEG", "SR"]
    # the SEG points at the original CT instances again
    seg_file = next(p for p in (pacs.workdir / "db").rglob("*") if p.is_file() and p.name.startswith("SG"))
    seg = pydicom.dcmread(seg_file, stop_before_pixels=True)
    originals = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    referenced = {str(r.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
                  for r in s.ReferencedInstanceSequence}
    assert referenced and referenced <= originals
    assert str(seg.PatientID) == str(original.PatientID) and seg.PatientIdentityRemoved == "NO"

    # a retried return stores the same objects again, not more of them
    return_results({"result-location": inferred["result-location"],
                             "result-study-instance-uid": inferred["result-study-instance-uid"],
                             "pseudonym": sent["pseudonym"], "patient-identifier": str(original.PatientID),
                             "study-instance-uid": study_uid, "provider-organization": PROVIDER},
                   _ctx(steps, "return", "bk-round-trip"))
    series = _c_find(pacs, "SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", Modality="")
    per_series = {str(s.Modality): _c_find(pacs, "IMAGE", StudyInstanceUID=study_uid,
                                           SeriesInstanceUID=str(s.SeriesInstanceUID), SOPInstanceUID="")
                  for s in series}
    assert {m: len(found) for m, found in per_series.items()} == {"SEG": 1, "SR": 1}

    # the FHIR result names the original patient and study
    bundle = json.loads((Path(steps["fhir_results"]) / "bk-round-trip.json").read_text())
    report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert report["subject"]["identifier"]["value"] == str(original.PatientID)
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study_uid}"

    # nothing at the provider carries the original identity: every stored object, scanned
    identity = _original_identity(paths)
    stored = [p for p in (store / "files").rglob("*.dcm")]
    assert len(stored) >= SLICES + 2
    for p in stored:
        assert find_leaks(pydicom.dcmread(p), identity) == [], p.name

    # the audit trail: sent, received, stored; no patient data in it
    actions = [e.action for e in AuditTrail(steps["audit"]).events("bk-round-trip")]
    assert actions.count("sent") == 2 and "received" in actions and "stored" in actions
    sent_event = next(e for e in AuditTrail(steps["audit"]).events("bk-round-trip") if e.action == "sent")
    assert sent_event.details["instances"] == SLICES and sent_event.details["pseudonym_domain"] == "omi-transfer-test"
    assert sent_event.actor == "CN=dic.omi.test"
    audit_text = Path(steps["audit"]).read_bytes().decode("latin-1")
    for value in (str(original.PatientID), str(original.PatientName).split("^")[0], study_uid):
        assert value not in audit_text
        assert value not in caplog.text   # nor in what the steps logged
    assert "send bk-round-trip: 8 instances" in caplog.text
    # each step says where its time went (phase names and seconds only)
    line = re.search(r"send bk-round-trip: timings (.*)", caplog.text).group(1)
    assert re.fullmatch(r"list [\d.]+ s, read [\d.]+ s, deid [\d.]+ s, stow [\d.]+ s, manifest [\d.]+ s, sync [\d.]+ s, "
                        r"total [\d.]+ s, "
                        r"gateway listing [\d.]+ s \(alongside reading\)", line), line
    assert re.search(r"return bk-round-trip: timings wado [\d.]+ s, reidentify [\d.]+ s, fhir [\d.]+ s, "
                     r"stow [\d.]+ s, total", caplog.text)


# -- send: leak, crash and retry, TLS, unreachable ------------------------------------------------
@pytest.mark.integration   # the requester site with dcmqrscp as its PACS
def test_leak_stops_the_send_and_nothing_reaches_the_gateway(site, gateway, monkeypatch):
    """The leak check of each instance, as the bytes will be sent, before they are handed to STOW-RS
    (a de-identification that leaves something behind is simulated by planting it)."""
    steps, (_, store) = site["steps"], gateway
    pseudo, _, paths = _pseudonymized(site, seed=22, key="bk-leak")
    pseudo_uid = pseudo["pseudonymized-study-instance-uid"]
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    name = str(originals[0].PatientName)
    planted = _plant(monkeypatch, lambda n, ds: setattr(ds, "PatientName", name) if n == 6 else None)
    ctx = _ctx(steps, "send", "bk-leak", send={"batch_instances": 2})
    with pytest.raises(StepError) as err:
        send(_send_inputs(pseudo), ctx)
    message = str(err.value)
    assert re.search(r"instance 6 \(SOPInstanceUID 2\.25\.\d+\): identifying value in PatientName \(0010,0010\)",
                     message)
    assert name not in message and name.split("^")[0] not in message
    # instances go out as they come: the four before it, checked, may be at the gateway; never it
    # (those read while the folder's listing ran may have been de-identified past it, never sent)
    assert len(planted) >= 6 and _at_gateway(store, pseudo_uid)[0] <= 4
    sent_sops = {s for u, s in _index(store) if u == pseudo_uid}
    assert uid_for(load_key(steps["pseudonymization"]["key_file"]), "omi-transfer-test",
                   str(originals[5].SOPInstanceUID)) not in sent_sops

    # the original UID of the study's last instance, in the first: known before the first is sent
    # (the source lists the study's UIDs up front)
    def reference_the_last(n, ds):
        if n == 1:
            ref = pydicom.Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = str(originals[-1].SOPInstanceUID)
            ds.ReferencedImageSequence = [ref]
    monkeypatch.undo()
    pseudo, _, paths = _pseudonymized(site, seed=30, key="bk-leak-uid")
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(paths)]
    _plant(monkeypatch, reference_the_last)
    with pytest.raises(StepError, match=r"instance 1 \(SOPInstanceUID 2\.25\.\d+\): identifying value in "
                                        r"ReferencedImageSequence \(0008,1140\)\[0\]\.ReferencedSOPInstanceUID "
                                        r"\(0008,1155\): original UID") as err:
        send(_send_inputs(pseudo), _ctx(steps, "send", "bk-leak-uid", send={"batch_instances": 1}))
    assert str(originals[-1].SOPInstanceUID) not in str(err.value)
    assert _at_gateway(store, pseudo["pseudonymized-study-instance-uid"]) == (0, 0)

    # every instance with the original PatientID (as if de-identification had not run on it)
    monkeypatch.undo()
    pseudo, _, paths = _pseudonymized(site, seed=31, key="bk-leak-id")
    original_id = str(pydicom.dcmread(paths[0], stop_before_pixels=True).PatientID)
    _plant(monkeypatch, lambda n, ds: setattr(ds, "PatientID", original_id))
    with pytest.raises(StepError, match=r"instance 1 .*identifying value in PatientID \(0010,0020\)") as err:
        send(_send_inputs(pseudo), _ctx(steps, "send", "bk-leak-id"))
    assert original_id not in str(err.value)
    assert _at_gateway(store, pseudo["pseudonymized-study-instance-uid"]) == (0, 0)


@pytest.mark.integration   # the requester site with dcmqrscp as its PACS
def test_send_crashed_midway_resumes_without_duplicates(site, gateway, monkeypatch):
    steps, (_, store) = site["steps"], gateway
    pseudo, _, _ = _pseudonymized(site, seed=23, key="bk-crash")
    pseudo_uid = pseudo["pseudonymized-study-instance-uid"]
    ctx = _ctx(steps, "send", "bk-crash", send={"batch_instances": 3})
    real_post = transfer_stow._post
    calls = []

    def crash_after_first_batch(gw, study_uid, batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise ProviderUnreachable("simulated crash of the worker mid-send")
        return real_post(gw, study_uid, batch)

    monkeypatch.setattr(transfer_stow, "_post", crash_after_first_batch)
    with pytest.raises(ProviderUnreachable):
        send(_send_inputs(pseudo), ctx)
    assert _at_gateway(store, pseudo_uid) == (3, 3)
    monkeypatch.setattr(transfer_stow, "_post", real_post)
    out = send(_send_inputs(pseudo), ctx)          # the runtime's retry
    assert out["study-location"].endswith(pseudo_uid)
    assert _at_gateway(store, pseudo_uid) == (STORED, STORED)
    event = [e for e in AuditTrail(steps["audit"]).events("bk-crash") if e.action == "sent"]
    assert len(event) == 1 and event[0].details["instances"] == SLICES

    # and the gateway itself: a second STOW of an instance it holds replaces it (still one copy)
    one = sorted((store / "files" / pseudo_uid).rglob("*.dcm"))[0]
    sop = str(pydicom.dcmread(one, stop_before_pixels=True).SOPInstanceUID)
    from omi_dsf.transfer.provider import open_gateway
    gw = open_gateway(step_settings(steps).providers, PROVIDER)
    transfer_stow._post(gw, pseudo_uid, [one.read_bytes()])
    gw.close()
    assert _at_gateway(store, pseudo_uid) == (STORED, STORED)
    assert sum(1 for _, s in _index(store) if s == sop) == 1


def _count_listings(monkeypatch) -> list[str]:
    """Spy on the full QIDO-RS listings the STOW-RS stream asks for."""
    calls, real = [], transfer_stow.instances_at_gateway

    def spy(gw, study_uid):
        calls.append(study_uid)
        return real(gw, study_uid)

    monkeypatch.setattr(transfer_stow, "instances_at_gateway", spy)
    return calls


@pytest.mark.integration   # the requester site with dcmqrscp as its PACS
def test_send_checks_the_gateway_cheaply_when_every_instance_is_accounted_for(site, gateway, monkeypatch):
    steps, (_, store) = site["steps"], gateway
    pseudo, _, _ = _pseudonymized(site, seed=41, key="bk-cheap")
    listings = _count_listings(monkeypatch)
    out = send(_send_inputs(pseudo), _ctx(steps, "send", "bk-cheap", send={"batch_instances": 3}))
    assert out["instance-count"] == SLICES
    assert len(listings) == 1          # the listing before sending; after it, the study's count sufficed
    assert _at_gateway(store, pseudo["pseudonymized-study-instance-uid"]) == (STORED, STORED)


@pytest.mark.integration   # the requester site with dcmqrscp as its PACS
def test_gateway_losing_an_instance_after_answering_stored_is_detected(site, gateway, monkeypatch):
    """The STOW-RS answers name every instance stored, but one is gone when we look: GatewayBusy
    (retried), and the retry sends just that one."""
    steps, (_, store) = site["steps"], gateway
    pseudo, _, _ = _pseudonymized(site, seed=42, key="bk-lost")
    pseudo_uid = pseudo["pseudonymized-study-instance-uid"]
    real_post = transfer_stow._post
    posts = []

    def post_then_lose_one(gw, study_uid, batch):
        stored = real_post(gw, study_uid, batch)
        posts.append(len(batch))
        if len(posts) == 1:
            sop = str(pydicom.dcmread(io.BytesIO(batch[0]), stop_before_pixels=True).SOPInstanceUID)
            with sqlite3.connect(store / "index.sqlite") as db:
                db.execute("DELETE FROM instances WHERE sop_uid = ?", (sop,))
        return stored

    monkeypatch.setattr(transfer_stow, "_post", post_then_lose_one)
    ctx = _ctx(steps, "send", "bk-lost", send={"batch_instances": 4})
    with pytest.raises(transfer_stow.GatewayBusy, match=f"lists {SLICES - 1} of {SLICES} instances"):
        send(_send_inputs(pseudo), ctx)
    posts.clear()
    monkeypatch.setattr(transfer_stow, "_post", real_post)
    send(_send_inputs(pseudo), ctx)
    assert _at_gateway(store, pseudo_uid)[0] == STORED
    event = [e for e in AuditTrail(steps["audit"]).events("bk-lost") if e.action == "sent"]
    assert event[-1].details["sent_now"] == 1 and event[-1].details["already_there"] == SLICES - 1


@pytest.mark.integration   # the requester site with dcmqrscp as its PACS
def test_gateway_answer_not_naming_an_instance_falls_back_to_the_listing(site, gateway, monkeypatch):
    steps, (_, store) = site["steps"], gateway
    pseudo, _, _ = _pseudonymized(site, seed=43, key="bk-unnamed")
    real_post = transfer_stow._post
    monkeypatch.setattr(transfer_stow, "_post", lambda gw, s, batch: set(sorted(real_post(gw, s, batch))[1:]))
    listings = _count_listings(monkeypatch)
    send(_send_inputs(pseudo), _ctx(steps, "send", "bk-unnamed"))   # all stored, as the listing shows
    assert len(listings) == 3          # before sending, after the instances, after the manifest (its answer too)
    # and a gateway that gives no usable count: the listing decides too
    pseudo, _, _ = _pseudonymized(site, seed=44, key="bk-nocount")
    monkeypatch.setattr(transfer_stow, "_post", real_post)
    monkeypatch.setattr(transfer_stow, "study_instance_count", lambda gw, s: None)
    listings.clear()
    send(_send_inputs(pseudo), _ctx(steps, "send", "bk-nocount"))
    assert len(listings) == 3
    assert _at_gateway(store, pseudo["pseudonymized-study-instance-uid"]) == (STORED, STORED)


@pytest.mark.integration   # the requester site with dcmqrscp as its PACS
def test_gateway_refusing_the_batch_size_is_a_clear_step_error(site, pki, tmp_path):
    staging = phantom.write_ct_study(tmp_path / "big", slices=4, seed=45, rows=512, cols=512)   # > 1 MB
    uid = str(pydicom.dcmread(staging[0], stop_before_pixels=True).StudyInstanceUID)
    cfg = parse_config({"listen": {"port": free_port()}, "auth": {"anonymous": True}, "default": "INBOX",
                        "limits": {"max_body_mb": 1},
                        "tls": {"certfile": pki["server"][0], "keyfile": pki["server"][1], "client_ca": pki["ca"]},
                        "backends": {"INBOX": {"type": "store", "path": str(tmp_path / "store")}}})
    from omi_dsf.transfer.provider import open_gateway
    with BackgroundServer(cfg) as server:
        steps = {"providers": {PROVIDER: {**site["steps"]["providers"][PROVIDER], "gateway_url": server.url}}}
        gw = open_gateway(step_settings(steps).providers, PROVIDER)
        try:
            stream = transfer_stow.StowStream(gw, uid)
            with pytest.raises(TransferError, match=r"refused the size \(HTTP 413\); lower send.batch_mb"):
                for n, path in enumerate(staging):
                    stream.add("1.2.3.%d" % n, path.read_bytes())
                stream.finish()
            stream.close()
        finally:
            gw.close()


@pytest.mark.integration   # the requester site with dcmqrscp as its PACS
def test_untrusted_gateway_certificate_is_a_clear_step_error(site, pki, gateway):
    pseudo, _, _ = _pseudonymized(site, seed=24, key="bk-tls")
    steps = dict(site["steps"])
    steps["providers"] = {PROVIDER: {**steps["providers"][PROVIDER], "ca_file": pki["other_ca"]}}
    with pytest.raises(StepError, match="not trusted by the configured ca_file"):
        send(_send_inputs(pseudo), _ctx(steps, "send", "bk-tls"))
    assert _at_gateway(gateway[1], pseudo["pseudonymized-study-instance-uid"]) == (0, 0)
    # plain http is refused with the settings, before any step runs
    steps["providers"] = {PROVIDER: {**steps["providers"][PROVIDER], "gateway_url": "http://127.0.0.1:1"}}
    with pytest.raises(ConfigError, match=f"providers.{PROVIDER}.gateway_url: must be an https URL, got "
                                          "'http://127.0.0.1:1'"):
        _ctx(steps, "send", "bk-tls")


@pytest.mark.integration   # the requester site with dcmqrscp as its PACS
def test_unreachable_provider_is_retried_not_a_step_error(site, pki):
    pseudo, _, _ = _pseudonymized(site, seed=25, key="bk-down")
    steps = dict(site["steps"])
    steps["providers"] = {PROVIDER: {**steps["providers"][PROVIDER],
                                     "gateway_url": f"https://127.0.0.1:{free_port()}", "timeout": 5}}
    with pytest.raises(ProviderUnreachable) as err:
        send(_send_inputs(pseudo), _ctx(steps, "send", "bk-down"))
    assert not isinstance(err.value, StepError)


# -- return: bad input --------------------------------------------------------------------------
@pytest.mark.integration   # the requester site with dcmqrscp as its PACS
def test_return_refuses_what_this_site_never_sent(site, gateway, pacs):
    steps, (gw_url, _) = site["steps"], gateway
    pseudo, study_uid, paths = _pseudonymized(site, seed=26, key="bk-stranger")
    sent = send(_send_inputs(pseudo), _ctx(steps, "send", "bk-stranger"))
    base = {"result-location": f"{gw_url}/studies/2.25.1234", "result-study-instance-uid": "2.25.1234",
            "pseudonym": sent["pseudonym"], "patient-identifier": "", "study-instance-uid": study_uid,
            "provider-organization": PROVIDER}
    with pytest.raises(StepError, match="never sent it"):
        return_results(base, _ctx(steps, "return", "bk-stranger"))
    pseudo_uid = pseudo["pseudonymized-study-instance-uid"]
    # (a location of the form …/studies/<result UID> is read from the request's provider, whatever its host)
    elsewhere = {**base, "result-study-instance-uid": pseudo_uid,
                 "result-location": f"https://results.example.org/results/{pseudo_uid}"}
    with pytest.raises(StepError, match="not at the gateway of any configured provider"):
        return_results(elsewhere, _ctx(steps, "return", "bk-stranger"))
    # sent, but no results at the provider yet; the location names the provider gateway by an inner
    # address (as a provider worker behind a loopback listener would): read from the gateway of the
    # request's provider-organization
    pending = {**base, "result-study-instance-uid": pseudo_uid,
               "result-location": f"https://127.0.0.1:1/studies/{pseudo_uid}"}
    with pytest.raises(StepError, match="has no SEG or SR series"):
        return_results(pending, _ctx(steps, "return", "bk-stranger"))


@pytest.mark.integration   # the requester site with dcmqrscp as its PACS
def test_return_with_a_refusing_pacs_or_absent_gateway(site, gateway, ai_url, pki, pacs, monkeypatch):
    steps, (gw_url, _) = site["steps"], gateway
    pseudo, study_uid, paths = _pseudonymized(site, seed=27, key="bk-pacs")
    pseudo_uid = pseudo["pseudonymized-study-instance-uid"]
    sent = send(_send_inputs(pseudo), _ctx(steps, "send", "bk-pacs"))
    inferred = infer({"pseudonymized-study-instance-uid": pseudo_uid},
                     StepContext(topic="infer", business_key="bk-pacs",
                                 site={"gateway_url": gw_url, "gateway_ca_file": pki["ca"],
                                       "ai_service_url": ai_url, "ai_timeout_s": 120}))
    inputs = {"result-location": inferred["result-location"], "result-study-instance-uid": pseudo_uid,
              "pseudonym": sent["pseudonym"], "patient-identifier": "", "study-instance-uid": study_uid,
              "provider-organization": PROVIDER}
    # the site's gateway reaches a PACS that rejects it: a setting to fix, not retried
    with _pacs_gateway(pacs, "NOSUCHAE") as refusing:
        with pytest.raises(StepError, match="rejected the association"):
            return_results(inputs, _ctx(steps, "return", "bk-pacs", gateway_url=refusing.url))
    # the site's gateway does not answer: retried
    with pytest.raises(RetryableError, match="does not answer|refused|connect"):
        return_results(inputs, _ctx(steps, "return", "bk-pacs", gateway_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StepError, match="steps.gateway_url is missing"):
        return_results(inputs, _ctx(steps, "return", "bk-pacs", gateway_url=None))
    # a pseudonym that is not this request's: refused before anything is re-identified
    with pytest.raises(StepError, match="another PatientID than this request's pseudonym"):
        return_results({**inputs, "pseudonym": "PSN-NOTHIS"}, _ctx(steps, "return", "bk-pacs"))


@pytest.mark.integration   # the requester site with dcmqrscp as its PACS
def test_mutual_tls_gateway_needs_our_client_certificate(site, pki, tmp_path):
    """A provider gateway that requires client certificates: with ours the send goes through,
    without it the step fails with a message that hints at it."""
    pseudo, _, _ = _pseudonymized(site, seed=28, key="bk-mtls")
    cfg = parse_config({"listen": {"port": free_port()}, "default": "INBOX",
                        "tls": {"certfile": pki["server"][0], "keyfile": pki["server"][1], "client_ca": pki["ca"],
                                "require_client_cert": True},
                        "backends": {"INBOX": {"type": "store", "path": str(tmp_path / "store")}}})
    with BackgroundServer(cfg) as server:
        steps = dict(site["steps"])
        with_cert = {**steps["providers"][PROVIDER], "gateway_url": server.url}
        steps["providers"] = {PROVIDER: {k: v for k, v in with_cert.items() if k not in ("client_cert", "client_key")}}
        # TLS 1.3 gives no alert for a missing client certificate, only a closed connection: a
        # transient failure (retried), whose message hints at the cause (the runtime's final Task
        # error names only the exception type, ProviderUnreachable)
        with pytest.raises(ProviderUnreachable, match="requires a client certificate"):
            send(_send_inputs(pseudo), _ctx(steps, "send", "bk-mtls"))
        steps["providers"] = {PROVIDER: with_cert}
        out = send(_send_inputs(pseudo), _ctx(steps, "send", "bk-mtls"))
        assert out["study-location"].startswith(server.url)
        assert _at_gateway(tmp_path / "store", pseudo["pseudonymized-study-instance-uid"]) == (STORED, STORED)


@pytest.mark.integration   # the requester site with dcmqrscp as its PACS
def test_send_reads_the_study_through_the_site_gateway(site, gateway, pacs, monkeypatch):
    """Source kind dicomweb: the study's UIDs by instance-level QIDO-RS of the site's gateway
    (a C-FIND at dcmqrscp), then the instances by WADO-RS, de-identified and sent as they come: the
    first batch is at the provider before the last instance is read."""
    steps = dict(site["steps"])
    steps["pseudonymization"] = {**steps["pseudonymization"], "source": {"kind": "dicomweb"}}
    pseudo, study_uid, paths = _pseudonymized(site, seed=29, key="bk-wado")
    pseudo_uid = pseudo["pseudonymized-study-instance-uid"]
    assert pacs.load(paths) == SLICES
    seen_at_gateway = []

    def at_gateway_while_the_last_is_deidentified(n, ds):
        if n == SLICES:     # the first batches leave on their own thread: wait for them here (not for the end)
            deadline = time.monotonic() + 20
            while _at_gateway(gateway[1], pseudo_uid)[0] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            seen_at_gateway.append(_at_gateway(gateway[1], pseudo_uid)[0])
    _plant(monkeypatch, at_gateway_while_the_last_is_deidentified)
    out = send(_send_inputs(pseudo), _ctx(steps, "send", "bk-wado", send={"batch_instances": 2}))
    assert out["instance-count"] == SLICES and out["pseudonymized-study-instance-uid"] == pseudo_uid
    assert _at_gateway(gateway[1], pseudo_uid) == (STORED, STORED)
    assert seen_at_gateway and seen_at_gateway[0] >= 2     # sent while the last one was de-identified
    with pytest.raises(StepError, match="the study was not found in the configured source"):
        send({**_send_inputs(pseudo), "study-instance-uid": "1.2.3.4.5.6.7"}, _ctx(steps, "send", "bk-wado-none"))
