"""The send step's de-identification: a folder source in, de-identified instances out to a provider's
gateway (the project's gateway over TLS), errors as StepError and nothing sent."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from omi_dsf.deid import instance_io

from omi_dsf.config import ConfigError
from omi_dsf.steps.api import StepContext, StepError, StepWithdrawn
from helpers_provider import PROVIDER, instances_at, manifest_at, provider_gateway
from omi_dsf.deid.deidentify import uid_for
from omi_dsf.deid.keys import load_key
from omi_dsf.steps.send import send
from omi_dsf.testkit import synthetic
from omi_dsf.testkit.phantom import write_ct_study
from omi_dsf.transfer import manifest


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    with provider_gateway(tmp_path_factory.mktemp("provider")) as gw:
        yield gw


def pseudonymize(inputs: dict, context: StepContext) -> dict:
    """The send step for `inputs` (study-instance-uid, patient-identifier) to the test provider."""
    return send({**inputs, "provider-organization": PROVIDER}, context)


def at_provider(provider, cfg, study_uid) -> list:
    """What the provider's gateway holds of the study (its pseudonymized UID from the site key)."""
    p = cfg["pseudonymization"]
    return instances_at(provider["store"], uid_for(load_key(p["key_file"]), p["domain"], study_uid))


@pytest.fixture
def site(tmp_path, provider):
    paths = write_ct_study(tmp_path / "staging", slices=4, rows=32, cols=32, seed=5)
    first = pydicom.dcmread(paths[0])
    study_dir = tmp_path / "pacs" / first.StudyInstanceUID
    study_dir.mkdir(parents=True)
    for p in paths:
        p.rename(study_dir / p.name)
    key = tmp_path / "site.key"
    key.write_text(f"send-step-key-{tmp_path.name}-0123456789")   # a key per test: studies apart at the provider
    cfg = {"pseudonymization": {
        "domain": "omi-test", "key_file": str(key), "store": str(tmp_path / "site.sqlite"),
        "options": ["retain-modified-dates", "retain-patient-characteristics"],
        "source": {"kind": "folder", "path": str(tmp_path / "pacs" / "{study_uid}")},
    }, "providers": provider["providers"]}
    return tmp_path, cfg, first


def burned_in(site, index: int):
    """Make the study's instance `index` (0-based) declare burned-in text; (its path, dataset)."""
    tmp, _, first = site
    victim = sorted((tmp / "pacs" / first.StudyInstanceUID).iterdir())[index]
    ds = pydicom.dcmread(victim)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(victim)
    return victim, ds


def ctx(cfg, key="bk-1"):
    return StepContext(topic="send", business_key=key, site=cfg)


def test_send_step_sends_the_deidentified_study(site, provider):
    tmp, cfg, first = site
    out = pseudonymize({"study-instance-uid": first.StudyInstanceUID,
                        "patient-identifier": first.PatientID}, ctx(cfg))
    assert out["instance-count"] == 4 and out["byte-count"] > 4 * 2048
    assert out["pseudonym"].startswith("PSN-")
    files = at_provider(provider, cfg, first.StudyInstanceUID)
    assert len(files) == 4 and out["study-location"] == f"{provider['url']}/studies/{files[0].parent.parent.name}"
    ds = pydicom.dcmread(files[0])
    assert ds.StudyInstanceUID == out["pseudonymized-study-instance-uid"] != first.StudyInstanceUID
    assert ds.PatientID == out["pseudonym"] and ds.PatientIdentityRemoved == "YES"
    assert str(first.PatientName) not in files[0].read_bytes().decode("latin-1")
    # stored last, the manifest: it lists exactly the instances sent, in the pseudonymized study, and
    # carries only pseudonymized values (it passed the leak check)
    (kos,) = manifest_at(provider["store"], out["pseudonymized-study-instance-uid"])
    listed = manifest.listed(kos.read_bytes())
    assert {sop for sops in listed.values() for sop in sops} == {pydicom.dcmread(f).SOPInstanceUID for f in files}
    kos_ds = pydicom.dcmread(kos)
    assert (kos_ds.StudyInstanceUID, kos_ds.PatientID, kos_ds.PatientIdentityRemoved) == \
        (out["pseudonymized-study-instance-uid"], out["pseudonym"], "YES")
    for value in (str(first.PatientName), first.PatientID, first.StudyInstanceUID):
        assert value.encode() not in kos.read_bytes()
    assert max(f.stat().st_mtime_ns for f in files) <= kos.stat().st_mtime_ns
    stored = kos.read_bytes()
    # a retry of the same work item gives the same result (idempotent outputs)
    again = pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx(cfg))
    assert again == out
    assert [f.read_bytes() for f in manifest_at(provider["store"], out["pseudonymized-study-instance-uid"])] == \
        [stored]   # the same manifest, once
    # as the worker runtime calls it: only the work item's output items are answered
    wanted = ("pseudonym", "pseudonymized-study-instance-uid", "instance-count")
    runtime_ctx = StepContext(topic="send", business_key="bk-1", site=cfg, outputs=wanted)
    assert pseudonymize({"study-instance-uid": first.StudyInstanceUID}, runtime_ctx) == \
        {k: out[k] for k in wanted}


def test_wrong_patient_is_refused_and_nothing_sent(site, provider):
    tmp, cfg, first = site
    with pytest.raises(StepError, match=r"PatientID \(0010,0020\) does not match the requested patient"):
        pseudonymize({"study-instance-uid": first.StudyInstanceUID, "patient-identifier": "SOMEONE"},
                     ctx(cfg, "bk-2"))
    assert at_provider(provider, cfg, first.StudyInstanceUID) == []


def test_a_withdrawn_send_stops_before_the_next_instance_and_stores_no_manifest(site, provider, monkeypatch):
    """The request ended while the study was being sent (the provider answered an error): the worker
    marks the step's context withdrawn and the step stops, leaving no manifest, so the provider never
    takes the study as complete."""
    tmp, cfg, first = site
    context = ctx(cfg, "bk-withdrawn")
    real_open = instance_io.open_source

    class Withdrawing:   # the real source; the work item is withdrawn once its second instance is read
        def __init__(self, inner):
            self.inner = inner

        def uids(self):
            return self.inner.uids()

        def __iter__(self):
            for n, item in enumerate(self.inner, 1):
                if n == 2:
                    context.withdrawn.set()
                yield item

    monkeypatch.setattr(instance_io, "open_source", lambda *a, **k: Withdrawing(real_open(*a, **k)))
    with pytest.raises(StepWithdrawn):
        pseudonymize({"study-instance-uid": first.StudyInstanceUID, "patient-identifier": first.PatientID}, context)
    assert len(at_provider(provider, cfg, first.StudyInstanceUID)) < 4
    pseudo = uid_for(load_key(cfg["pseudonymization"]["key_file"]), cfg["pseudonymization"]["domain"],
                     first.StudyInstanceUID)
    assert manifest_at(provider["store"], pseudo) == []


def test_unknown_study_and_missing_inputs(site):
    tmp, cfg, first = site
    with pytest.raises(StepError, match="study was not found in the configured source") as err:
        pseudonymize({"study-instance-uid": "1.2.3.4"}, ctx(cfg))
    assert "1.2.3.4" not in str(err.value) and str(tmp) not in str(err.value)
    with pytest.raises(StepError, match="study-instance-uid is missing"):
        pseudonymize({}, ctx(cfg))
    bad = {"pseudonymization": {**cfg["pseudonymization"], "options": ["retain-all"]}}
    with pytest.raises(ConfigError, match="pseudonymization.options: unknown de-identification option 'retain-all'"):
        ctx(bad)   # refused with the settings, before any step runs
    nodomain = {"pseudonymization": {k: v for k, v in cfg["pseudonymization"].items() if k != "domain"}}
    with pytest.raises(ConfigError, match="pseudonymization.domain: required"):
        ctx(nodomain)
    with pytest.raises(StepError, match="steps.pseudonymization is missing"):
        pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx({}))


def test_leak_stops_the_step_and_nothing_is_sent(site, provider, monkeypatch):
    tmp, cfg, first = site
    # the third instance declares burned-in text, which no pixel recipe covers
    victim, ds = burned_in(site, 2)
    with pytest.raises(StepError, match=r"BurnedInAnnotation \(0028,0301\)"):
        pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx(cfg, "bk-3"))
    assert at_provider(provider, cfg, first.StudyInstanceUID) == []
    # an attribute the profile keeps (Manufacturer) carrying the patient's name
    ds.BurnedInAnnotation = "NO"
    ds.Manufacturer = f"Scanner of {str(first.PatientName).split('^')[0]}"
    ds.save_as(victim)
    with pytest.raises(StepError, match=r"identifying value in Manufacturer \(0008,0070\): name part of PatientName \(rule: ") as err:
        pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx(cfg, "bk-4"))
    assert str(first.PatientName).split("^")[0] not in str(err.value)
    assert at_provider(provider, cfg, first.StudyInstanceUID) == []


def test_source_is_pluggable(site, provider):
    tmp, cfg, first = site
    instances = [synthetic.ct_instance(0), synthetic.ct_instance(1)]

    class MemorySource:
        def __iter__(self):
            return iter([("m0", synthetic.ct_instance(0)), ("m1", synthetic.ct_instance(1))])

        def uids(self):
            return {str(ds[tag].value) for ds in instances for tag in ("StudyInstanceUID", "SeriesInstanceUID",
                                                                       "SOPInstanceUID")}

    instance_io.register_source("memory", lambda c, p: MemorySource())
    mem = {**cfg, "pseudonymization": {**cfg["pseudonymization"], "source": {"kind": "memory"}}}
    out = pseudonymize({"study-instance-uid": instances[0].StudyInstanceUID}, ctx(mem))
    assert out["instance-count"] == 2 and len(at_provider(provider, cfg, instances[0].StudyInstanceUID)) == 2
    with pytest.raises(ConfigError, match="pseudonymization.source.kind: unknown kind 'pigeon'"):
        ctx({"pseudonymization": {**mem["pseudonymization"], "source": {"kind": "pigeon"}}})


def test_pixel_data_pass_through_unchanged(site, tmp_path):
    """Native and encapsulated pixel data leave exactly as they came in."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    from omi_dsf.deid.pipeline import StudyPseudonymizer
    from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider
    from omi_dsf.deid.store import SiteStore

    tmp, cfg, first = site
    native = next((tmp / "pacs" / first.StudyInstanceUID).iterdir())
    enc = pydicom.dcmread(native)
    enc.file_meta.TransferSyntaxUID = RLELossless
    enc.PixelData = encapsulate([b"\x01\x02\x03\x04" * 7, b"\x05\x06" * 9])
    enc["PixelData"].VR = "OB"
    enc.NumberOfFrames = 2
    enc.SOPInstanceUID = enc.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    enc.save_as(tmp_path / "enc.dcm", enforce_file_format=True)
    store = SiteStore()
    sp = StudyPseudonymizer(key=b"k" * 20, domain="omi", provider=EmbeddedProvider(b"k" * 20, store),
                            store=store)
    for path in (native, tmp_path / "enc.dcm"):
        out = sp.process_encoded(path, path.name)
        back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(out.data))
        assert back.PixelData == pydicom.dcmread(path).PixelData
        assert back.PatientID == sp.result.pseudonym


def test_empty_study_folder_is_a_step_error(site):
    tmp, cfg, first = site
    (tmp / "pacs" / "1.2.3.empty").mkdir()
    with pytest.raises(StepError, match="the study was not found in the configured source"):
        pseudonymize({"study-instance-uid": "1.2.3.empty"}, ctx(cfg, "bk-empty"))


def test_step_errors_name_the_instance_not_the_file(site, provider):
    tmp, cfg, first = site
    study_dir = tmp / "pacs" / first.StudyInstanceUID
    (study_dir / "zz_Mustermann_Max.txt").write_text("not an image")
    with pytest.raises(StepError, match=r"instance 5: not a DICOM file") as err:
        pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx(cfg, "bk-5"))
    assert "Mustermann" not in str(err.value)
    assert at_provider(provider, cfg, first.StudyInstanceUID) == []


class _ListedSource:
    """The instances as read, and a listing of the study that may name more than they hold."""

    def __init__(self, datasets, listed):
        self.datasets, self.listed = datasets, listed

    def __iter__(self):
        return iter([(f"m{n}", ds) for n, ds in enumerate(self.datasets)])

    def uids(self):
        return self.listed


def test_an_instance_naming_a_uid_only_the_listing_knows_is_refused(site, provider):
    """The listing comes before the first instance: an instance naming a UID of the study that
    no instance read so far carries (one later in the study, or one the reading did not deliver)
    is refused by its leak check."""
    tmp, cfg, first = site
    unread = "1.2.826.0.1.3680043.8.498.777777"
    instances = [synthetic.ct_instance(0), synthetic.ct_instance(1)]
    instances[0].Manufacturer = f"see {unread}"
    listed = {str(ds[kw].value) for ds in instances for kw in ("StudyInstanceUID", "SeriesInstanceUID",
                                                               "SOPInstanceUID")}
    study = str(instances[0].StudyInstanceUID)
    listing = {**cfg, "pseudonymization": {**cfg["pseudonymization"], "source": {"kind": "listed"}}}
    instance_io.register_source("listed", lambda c, p: _ListedSource(instances, listed | {unread}))
    with pytest.raises(StepError, match=r"instance 1 \(SOPInstanceUID 2\.25\.\d+\): identifying value in Manufacturer "
                                        r"\(0008,0070\): original UID") as err:
        pseudonymize({"study-instance-uid": study}, ctx(listing, "bk-listed"))
    assert unread not in str(err.value)
    assert at_provider(provider, cfg, study) == []
    # the study listed without that UID: sent
    instances = [synthetic.ct_instance(0), synthetic.ct_instance(1)]
    instances[0].Manufacturer = f"see {unread}"
    instance_io.register_source("listed", lambda c, p: _ListedSource(instances, listed))
    assert pseudonymize({"study-instance-uid": study}, ctx(listing, "bk-listed-2"))["instance-count"] == 2


def test_a_study_the_listing_lacks_is_not_found(site, provider):
    tmp, cfg, first = site
    instances = [synthetic.ct_instance(0)]
    listing = {**cfg, "pseudonymization": {**cfg["pseudonymization"], "source": {"kind": "listed"}}}
    instance_io.register_source("listed", lambda c, p: _ListedSource(instances, set()))
    with pytest.raises(StepError, match="the study was not found in the configured source"):
        pseudonymize({"study-instance-uid": str(instances[0].StudyInstanceUID)}, ctx(listing, "bk-listed-3"))


def test_each_batch_leaves_after_its_uid_map_is_written(site, provider, monkeypatch):
    """The UID map is kept in memory per instance and written before each STOW-RS batch leaves:
    another connection to the site store finds every instance of a batch when it is posted."""
    import io

    from omi_dsf.deid.store import SiteStore
    from omi_dsf.transfer import stow

    tmp, cfg, first = site
    p = cfg["pseudonymization"]
    reader, posted = SiteStore(p["store"]), []
    real = stow._post

    def post(gw, study_uid, batch):
        for data in batch:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            posted.append("manifest" if ds.Modality == "KO" else reader.original_uid(p["domain"], ds.SOPInstanceUID))
        return real(gw, study_uid, batch)
    monkeypatch.setattr(stow, "_post", post)
    out = pseudonymize({"study-instance-uid": first.StudyInstanceUID},
                       ctx({**cfg, "send": {"batch_instances": 1}}, "bk-map"))
    # the manifest, made at the site from pseudonymized values, names no original and comes last
    assert out["instance-count"] == 4 and len(posted) == 5 and None not in posted and posted[-1] == "manifest"


def test_timings_keep_the_listing_apart_from_the_de_identification(site, provider, caplog):
    """A listing that comes first is its own phase, not taken off the de-identification's."""
    import re
    import time

    tmp, cfg, first = site
    instances = [synthetic.ct_instance(0), synthetic.ct_instance(1)]
    listed = {str(ds[kw].value) for ds in instances for kw in ("StudyInstanceUID", "SeriesInstanceUID",
                                                               "SOPInstanceUID")}

    class SlowListingFirst:
        def __iter__(self):
            return iter([("m0", instances[0]), ("m1", instances[1])])

        def uids(self):
            time.sleep(0.3)
            return listed
    instance_io.register_source("slow-listing", lambda c, p: SlowListingFirst())
    slow = {**cfg, "pseudonymization": {**cfg["pseudonymization"], "source": {"kind": "slow-listing"}}}
    with caplog.at_level("INFO", logger="omi_dsf.step"):
        pseudonymize({"study-instance-uid": str(instances[0].StudyInstanceUID)}, ctx(slow, "bk-phases"))
    phases = dict(re.findall(r"(\w+) (-?[\d.]+) s", caplog.text.split(": timings ", 1)[1].splitlines()[0]))
    assert float(phases["list"]) >= 0.3 and float(phases["deid"]) >= 0, phases


def test_prepare_answers_what_send_derives(site, provider, caplog):
    """prepare, before anything is read, answers the pseudonymized study UID and location that send then
    answers and stores the study under; nothing is sent by it."""
    import logging

    from omi_dsf.steps.prepare import prepare

    caplog.set_level(logging.INFO)
    tmp, cfg, first = site
    inputs = {"study-instance-uid": first.StudyInstanceUID, "provider-organization": PROVIDER}
    prepared = prepare(inputs, StepContext(topic="prepare", business_key="bk-prep", site=cfg))
    assert at_provider(provider, cfg, first.StudyInstanceUID) == []      # nothing read, nothing sent
    sent = pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx(cfg, "bk-prep"))
    assert prepared == {k: sent[k] for k in ("pseudonymized-study-instance-uid", "study-location")}
    assert pydicom.dcmread(at_provider(provider, cfg, first.StudyInstanceUID)[0]).StudyInstanceUID == \
        prepared["pseudonymized-study-instance-uid"]
    assert first.StudyInstanceUID not in caplog.text and str(first.PatientID) not in caplog.text
    # the same for a study the source does not have: prepare reads nothing (send finds out)
    assert prepare({**inputs, "study-instance-uid": "1.2.3.4"}, StepContext(topic="prepare", business_key="bk",
                                                                           site=cfg))["study-location"]


def test_prepare_configuration_errors_name_the_key(site, tmp_path):
    from omi_dsf.steps.prepare import prepare

    _, cfg, first = site
    inputs = {"study-instance-uid": first.StudyInstanceUID, "provider-organization": PROVIDER}

    def run(site_cfg, given=inputs):
        return prepare(given, StepContext(topic="prepare", business_key="bk", site=site_cfg))

    with pytest.raises(StepError, match="steps.pseudonymization is missing"):
        run({"providers": cfg["providers"]})
    with pytest.raises(StepError, match=r"provider organization 'elsewhere.test' is not configured at this site "
                                        r"\(steps.providers: ai.omi.test\)"):
        run(cfg, {**inputs, "provider-organization": "elsewhere.test"})
    with pytest.raises(StepError, match="input provider-organization is missing"):
        run(cfg, {"study-instance-uid": first.StudyInstanceUID})
    with pytest.raises(StepError, match="input study-instance-uid is missing"):
        run(cfg, {"provider-organization": PROVIDER})
    empty = tmp_path / "empty.key"
    empty.write_text("")
    with pytest.raises(StepError, match=r"key file .*empty.key holds 0 bytes; at least 16 are needed"):
        run({**cfg, "pseudonymization": {**cfg["pseudonymization"], "key_file": str(empty)}})
    not_a_ca = tmp_path / "not-a-ca.pem"
    not_a_ca.write_text("no certificate here")
    with pytest.raises(StepError, match=rf"steps.providers.{PROVIDER}: cannot load its TLS files \(ca_file"):
        run({**cfg, "providers": {PROVIDER: {**cfg["providers"][PROVIDER], "ca_file": str(not_a_ca)}}})
    with pytest.raises(ConfigError, match=rf"providers.{PROVIDER}.gateway_url: must be an https URL"):
        run({**cfg, "providers": {PROVIDER: {**cfg["providers"][PROVIDER], "gateway_url": "http://127.0.0.1:9"}}})


def test_a_manifest_that_fails_the_leak_check_fails_the_step(site, provider, monkeypatch):
    """The manifest goes through the leak check like every instance: one carrying an identifying value
    (planted here after it is made) is not sent, and the step fails saying so, naming no value."""
    from omi_dsf.deid.pipeline import encode_part10
    from omi_dsf.steps import send as send_step

    tmp, cfg, first = site
    real = manifest.make_manifest

    def leaky(contents, key, domain):
        ds, _ = real(contents, key, domain)
        ds.StudyID = str(first.PatientID)
        return ds, encode_part10(ds)[0]

    monkeypatch.setattr(send_step.manifest, "make_manifest", leaky)
    with pytest.raises(StepError, match=r"the study's manifest did not pass the leak check: identifying value in "
                                        r"StudyID \(0020,0010\)") as err:
        pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx(cfg, "bk-leaky"))
    assert str(first.PatientID) not in str(err.value)
    pseudo_uid = uid_for(load_key(cfg["pseudonymization"]["key_file"]), cfg["pseudonymization"]["domain"],
                         first.StudyInstanceUID)
    assert len(at_provider(provider, cfg, first.StudyInstanceUID)) == 4 and manifest_at(provider["store"], pseudo_uid) == []
