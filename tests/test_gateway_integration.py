"""The gateway as a black box, driven by dicomweb-client, over real PACS on 127.0.0.1:
dcmtk dcmqrscp (C-GET and C-MOVE) and Orthanc (a second, different PACS; its own DICOMweb is the
reference for the differential test)."""

from __future__ import annotations

import threading
import time
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import free_port
from omi_dsf.dicomweb.config import parse_config
from omi_dsf.dicomweb.multipart import parse_media_type, parse_multipart
from omi_dsf.dicomweb.server import BackgroundServer
from omi_dsf.testkit.legacy_pacs import Dcmqrscp, Orthanc
from omi_dsf.testkit.phantom import write_ct_study

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SLICES = 12
BIG_SLICES = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dicomweb-data")
    ct = write_ct_study(root / "ct", slices=SLICES, seed=3, rows=128, cols=128)
    extra = [Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small.dcm"))]
    # JPEG baseline, for Orthanc only: dcmqrscp, like many legacy PACS, takes uncompressed data only
    jpeg = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    first = pydicom.dcmread(ct[0])
    # more data than the socket buffers between gateway and client can hold (~21 MB)
    big = write_ct_study(root / "big", slices=BIG_SLICES, seed=4, rows=512, cols=512,
                         patient={"id": "BIGSTUDY01", "name": "Big^Study"})
    return {"files": ct + extra, "ct": ct, "big": big, "big_study": pydicom.dcmread(big[0]).StudyInstanceUID,
            "study": first.StudyInstanceUID, "series": first.SeriesInstanceUID,
            "patient_id": first.PatientID, "study_date": first.StudyDate,
            "mr_study": pydicom.dcmread(extra[1]).StudyInstanceUID, "jpeg_file": jpeg, "jpeg": pydicom.dcmread(jpeg)}


@pytest.fixture(scope="module")
def bed(tmp_path_factory, data):
    """dcmqrscp + Orthanc holding the same data, and a gateway in front of both."""
    root = tmp_path_factory.mktemp("dicomweb-bed")
    move_port, move_port_pnd = free_port(), free_port()
    with Dcmqrscp(root / "dcmqrscp", move_destinations={"OMIGW": ("127.0.0.1", move_port),
                                                        "OMIGWPND": ("127.0.0.1", move_port_pnd)}) as pacs, \
            Orthanc(root / "orthanc", modalities={"OMIGW": ("127.0.0.1", move_port)}) as orthanc:
        pacs.load(data["files"] + data["big"])
        orthanc.load(data["files"] + [data["jpeg_file"]])
        cfg = parse_config({
            "listen": {"port": free_port()}, "auth": {"anonymous": True},
            "dimse": {"calling_aet": "OMIGW", "move_destination": {"aet": "OMIGW", "port": move_port}},
            "default": "LEGACYPACS",
            "backends": {
                "LEGACYPACS": {"type": "dimse", "host": "127.0.0.1", "port": pacs.port, "dimse_timeout": 20},
                "MOVEPACS": {"type": "dimse", "host": "127.0.0.1", "port": pacs.port, "called_aet": "LEGACYPACS",
                             "retrieve": "move"},
                "ORTHANCMOVE": {"type": "dimse", "host": "127.0.0.1", "port": orthanc.port, "called_aet": "ORTHANC",
                                "retrieve": "move"},
                "ORTHANC": {"type": "dimse", "host": "127.0.0.1", "port": orthanc.port},
                "DOWN": {"type": "dimse", "host": "127.0.0.1", "port": free_port(), "connect_timeout": 2},
                "WRONGAE": {"type": "dimse", "host": "127.0.0.1", "port": pacs.port, "called_aet": "NOSUCHAE"},
            }})
        with BackgroundServer(cfg) as server:
            yield {"pacs": pacs, "orthanc": orthanc, "url": server.url, "server": server, "cfg": cfg,
                   "move_port_pnd": move_port_pnd}


def client(bed, aet: str | None = None) -> DICOMwebClient:
    return DICOMwebClient(bed["url"] + (f"/aets/{aet}" if aet else ""))


def values(obj: dict, tag: str):
    return obj.get(tag, {}).get("Value")


# dcmqrscp and Orthanc, each by C-GET and by C-MOVE into the gateway's storage SCP
BACKENDS = [None, "MOVEPACS", "ORTHANC", "ORTHANCMOVE"]


# -- QIDO-RS ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aet", [None, "ORTHANC"])
def test_search_for_studies_fills_in_what_the_pacs_leaves_out(bed, data, aet):
    studies = {values(s, "0020000D")[0]: s for s in client(bed, aet).search_for_studies()}
    assert set(studies) >= {data["study"], data["mr_study"]}
    ct = studies[data["study"]]
    assert values(ct, "00080061") == ["CT"]
    assert values(ct, "00201206") == [1]
    assert values(ct, "00201208") == [SLICES]
    assert values(ct, "00100020") == [data["patient_id"]]
    assert values(ct, "00081190")[0].endswith(f"/studies/{data['study']}")
    assert values(studies[data["mr_study"]], "00080061") == ["MR"]


@pytest.mark.parametrize("aet", [None, "ORTHANC"])
def test_search_matching_kinds(bed, data, aet):
    c = client(bed, aet)
    pid = data["patient_id"]
    assert [values(s, "0020000D")[0] for s in c.search_for_studies(search_filters={"PatientID": pid})] == [data["study"]]
    assert [values(s, "0020000D")[0] for s in c.search_for_studies(
        search_filters={"PatientID": pid[:4] + "*"})] == [data["study"]]
    day = data["study_date"]
    in_range = c.search_for_studies(search_filters={"StudyDate": f"{day}-{day}"})
    assert data["study"] in [values(s, "0020000D")[0] for s in in_range]
    assert c.search_for_studies(search_filters={"StudyDate": "19000101-19000102"}) == []
    uid_list = c.search_for_studies(search_filters={"StudyInstanceUID": f"{data['study']},{data['mr_study']}"})
    assert {values(s, "0020000D")[0] for s in uid_list} == {data["study"], data["mr_study"]}
    mr = c.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})
    assert [values(s, "0020000D")[0] for s in mr] == [data["mr_study"]]
    assert len(c.search_for_studies(fuzzymatching=True, search_filters={"PatientID": pid})) == 1
    # emptyvaluematching (PS3.4 C.2.2.2.7): a study without the value matches too
    held = data["files"] + (data["big"][:1] if aet is None else [data["jpeg_file"]])
    without = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in held
               if not pydicom.dcmread(f, stop_before_pixels=True).get("ReferringPhysicianName")}
    assert without and data["study"] not in without
    url = f"{bed['url']}/aets/{aet}/studies" if aet else f"{bed['url']}/studies"
    r = httpx.get(url, params={"ReferringPhysicianName": "Nobody*", "emptyvaluematching": "true"}, timeout=60)
    assert r.status_code == 200 and "warning" not in r.headers
    assert {values(s, "0020000D")[0] for s in r.json()} == without


def test_search_paging_and_includefield(bed, data):
    c = client(bed)
    everything = c.search_for_studies()
    assert len(everything) == 4
    page = c.search_for_studies(limit=1, offset=1)
    assert page == [everything[1]] or values(page[0], "0020000D") == values(everything[1], "0020000D")
    assert c.search_for_studies(offset=4) == []
    series = c.search_for_series(data["study"], fields=["SeriesDate", "BodyPartExamined"])
    assert len(series) == 1 and "0020000E" in series[0]
    assert values(series[0], "00201209") == [SLICES]
    all_fields = c.search_for_instances(data["study"], data["series"], fields=["all"], limit=2)
    assert len(all_fields) == 2 and "00080018" in all_fields[0]


@pytest.mark.parametrize("aet", [None, "ORTHANC"])
def test_relational_searches(bed, data, aet):
    c = client(bed, aet)
    mr_series = c.search_for_series(search_filters={"Modality": "MR"})
    assert [values(s, "0020000D")[0] for s in mr_series] == [data["mr_study"]]
    assert "00100020" in mr_series[0]  # study attributes come along in a relational search
    instances = c.search_for_instances(data["study"])
    assert len(instances) == SLICES
    assert all(values(i, "0020000E") == [data["series"]] for i in instances)
    by_patient = c.search_for_instances(search_filters={"PatientID": data["patient_id"]})
    assert len(by_patient) == SLICES


def test_keys_the_pacs_ignores_are_matched_and_returned_by_the_gateway(bed, data, monkeypatch):
    """dcmqrscp leaves out SOPClassUID, Rows, InstitutionName, SeriesDescription, …: the gateway
    fills them from the instances' headers, matches on them itself, and where it cannot, says so."""
    from omi_dsf.dicomweb.backends import dimse

    c = client(bed)
    ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
    mr_only = c.search_for_instances(search_filters={"SOPClassUID": mr})
    assert [values(i, "0020000D")[0] for i in mr_only] == [data["mr_study"]]
    assert all(values(i, "00080016") == [mr] for i in mr_only)
    instances = c.search_for_instances(data["study"], data["series"])
    assert len(instances) == SLICES
    assert all(values(i, "00080016") == [ct] and values(i, "00280010") == [128] and values(i, "00280011") == [128]
               and values(i, "00280100") == [16] for i in instances)
    series = c.search_for_series(data["study"])
    assert values(series[0], "0008103E") == ["Thorax 2.5mm Weichteil"]
    head = pydicom.dcmread(data["ct"][0], stop_before_pixels=True)
    assert values(series[0], "00400244") == [head.PerformedProcedureStepStartDate]
    assert values(series[0], "00400245") == [head.PerformedProcedureStepStartTime]
    study = c.search_for_studies(search_filters={"StudyInstanceUID": data["study"]})
    assert values(study[0], "00080005") == [head.SpecificCharacterSet]
    assert c.search_for_series(search_filters={"InstitutionName": "Nowhere*"}) == []
    found = c.search_for_series(search_filters={"InstitutionName": "Universit*"})
    assert data["study"] in {values(s, "0020000D")[0] for s in found}
    # person names: fuzzymatching makes them case-insensitive, also where the PACS is not
    name = str(pydicom.dcmread(data["ct"][0]).PatientName)
    lower = name.lower()[:4] + "*"
    assert c.search_for_studies(search_filters={"PatientName": lower}) == []
    fuzzy = c.search_for_studies(search_filters={"PatientName": lower}, fuzzymatching=True)
    assert [values(s, "0020000D")[0] for s in fuzzy] == [data["study"]]
    # when the gateway may fetch no headers, the key counts as matched and the answer says so
    monkeypatch.setattr(dimse, "HEADER_FETCHES", 0)
    for backend in bed["server"].server.config.app.gateway.backends.values():
        getattr(backend, "_headers", {}).clear()
    r = httpx.get(f"{bed['url']}/series", params={"InstitutionName": "Nowhere*"}, timeout=60)
    assert r.status_code == 200 and r.json()
    assert "InstitutionName" in r.headers["warning"] and "did not match" in r.headers["warning"]
    # … and a return key it could not fill in: the answer names it too
    r = httpx.get(f"{bed['url']}/studies/{data['study']}/instances", params={"includefield": "Rows"}, timeout=60)
    assert r.status_code == 200 and len(r.json()) == SLICES and not any("00280010" in i for i in r.json())
    assert "The PACS did not return" in r.headers["warning"] and "Rows" in r.headers["warning"]


def test_includedefaults_false_fetches_no_headers(bed, data, monkeypatch):
    """includedefaults=false (dcm4chee-arc's parameter): only what includefield names, and no
    C-GET of the study for the default keys dcmqrscp leaves out (Rows, SOPClassUID, …); without
    it, or with true, they are filled from the headers as before. The send step's listing asks so."""
    from omi_dsf.deid.dicomweb_io import WadoStudySource
    from omi_dsf.dicomweb_client import DicomwebClient
    from omi_dsf.peer import Peer

    backend = bed["server"].server.config.app.gateway.backends["LEGACYPACS"]
    retrievals = []
    real = backend.retrieve
    monkeypatch.setattr(backend, "retrieve", lambda *a, **k: (retrievals.append(a), real(*a, **k))[1])
    backend._headers.clear()
    url = f"{bed['url']}/studies/{data['study']}/instances"
    fields = [("includefield", "SeriesInstanceUID,SOPInstanceUID")]
    r = httpx.get(url, params=fields + [("includedefaults", "false")], timeout=60)
    assert r.status_code == 200 and "warning" not in r.headers
    assert len(r.json()) == SLICES
    assert all(set(i) == {"0020000D", "0020000E", "00080018", "00081190"} for i in r.json())
    assert retrievals == [] and data["study"] not in backend._headers
    sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in data["ct"]}
    assert WadoStudySource(DicomwebClient(Peer(bed["url"], timeout=60)), data["study"]).uids() == (
        sops | {data["study"], data["series"]})
    assert retrievals == []
    for extra in ([], [("includedefaults", "true")]):
        backend._headers.clear()
        r = httpx.get(url, params=fields + extra, timeout=60)
        assert r.status_code == 200 and all(values(i, "00280010") == [128] for i in r.json())
    assert len(retrievals) == 2 and retrievals[0][1] == {"study": data["study"]}
    r = httpx.get(url, params={"includedefaults": "nope"}, timeout=60)
    assert r.status_code == 400 and "includedefaults: 'nope'" in r.json()["error"]


def test_headers_are_fetched_once_per_search_even_when_not_kept(bed, data, monkeypatch):
    """summary_ttl=0 keeps no headers: one search still fetches the study's headers once, not
    once per match (which took 15.8 s for 100 instances of 512x512)."""
    with _gateway_for(bed, summary_ttl=0) as server:
        backend = server.server.config.app.gateway.backends["LEGACYPACS"]
        retrievals = []
        real = backend.retrieve
        monkeypatch.setattr(backend, "retrieve", lambda *a, **k: (retrievals.append(a), real(*a, **k))[1])
        r = httpx.get(f"{server.url}/studies/{data['study']}/instances", timeout=60)
        assert r.status_code == 200 and len(r.json()) == SLICES
        assert all(values(i, "00280010") == [128] for i in r.json())
        assert len(retrievals) == 1


# -- WADO-RS ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aet", BACKENDS)
def test_retrieve_study_series_instance(bed, data, aet):
    c = client(bed, aet)
    study = c.retrieve_study(data["study"])
    assert len(study) == SLICES
    assert {d.SOPInstanceUID for d in study} == {pydicom.dcmread(f).SOPInstanceUID for f in data["ct"]}
    series = c.retrieve_series(data["study"], data["series"])
    assert len(series) == SLICES
    one = study[3]
    instance = c.retrieve_instance(data["study"], data["series"], one.SOPInstanceUID)
    assert instance.PixelData == one.PixelData


@pytest.mark.parametrize("aet", [None, "ORTHANC"])
def test_metadata_bulkdata_frames_rendered(bed, data, aet):
    c = client(bed, aet)
    meta = c.retrieve_study_metadata(data["study"])
    assert len(meta) == SLICES
    assert len(c.retrieve_series_metadata(data["study"], data["series"])) == SLICES
    sop = values(meta[0], "00080018")[0]
    inst_meta = c.retrieve_instance_metadata(data["study"], data["series"], sop)
    uri = inst_meta["7FE00010"]["BulkDataURI"]
    assert uri.endswith(f"/instances/{sop}/bulk/7FE00010")
    original = next(pydicom.dcmread(f) for f in data["ct"] if pydicom.dcmread(f).SOPInstanceUID == sop)
    assert c.retrieve_bulkdata(uri)[0] == original.PixelData
    frames = c.retrieve_instance_frames(data["study"], data["series"], sop, [1])
    assert frames == [original.PixelData]
    jpeg = c.retrieve_instance_rendered(data["study"], data["series"], sop)
    assert Image.open(BytesIO(jpeg)).size == (128, 128)
    r = httpx.get(f"{c.url_prefix or c.base_url}/studies/{data['study']}/series/{data['series']}/thumbnail"
                  if False else f"{bed['url']}{'/aets/' + aet if aet else ''}/studies/{data['study']}/thumbnail",
                  params={"viewport": "64,64"}, headers={"Accept": "image/png"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert max(Image.open(BytesIO(r.content)).size) == 64


@pytest.mark.parametrize("aet", ["ORTHANC", "ORTHANCMOVE"])
def test_a_jpeg_instance_comes_back_as_the_pacs_sends_it(bed, data, aet):
    """C-GET: the gateway proposes uncompressed syntaxes first and no lossy one, so Orthanc
    decompresses the stored JPEG; C-MOVE: Orthanc proposes a context with the stored JPEG syntax
    and one uncompressed, and sends it as stored (the frames are then its JPEG frames). Either
    way nothing is compressed lossy for the gateway."""
    import numpy as np

    c = client(bed, aet)
    jpeg = data["jpeg"]
    s, se, i = jpeg.StudyInstanceUID, jpeg.SeriesInstanceUID, jpeg.SOPInstanceUID
    back = c.retrieve_instance(s, se, i)
    if aet == "ORTHANC":
        assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    else:
        assert back.file_meta.TransferSyntaxUID == jpeg.file_meta.TransferSyntaxUID
        assert back.PixelData == jpeg.PixelData
    assert np.abs(back.pixel_array.astype(int) - jpeg.pixel_array.astype(int)).mean() < 2
    frame = c.retrieve_instance_frames(s, se, i, [1])[0]
    if aet == "ORTHANC":
        assert len(frame) == jpeg.Rows * jpeg.Columns * 3
    else:
        assert frame[:2] == b"\xff\xd8"
    png = c.retrieve_instance_rendered(s, se, i, media_types=("image/png",))
    assert Image.open(BytesIO(png)).mode == "RGB"


def test_c_get_from_a_pacs_that_prefers_jpeg(tmp_path, data):
    """dcmqrscp with +xy accepts JPEG Baseline first wherever it is proposed, sends every instance
    of a class on the first context accepted for it, and can neither compress nor decompress. One
    storage context with every syntax let it choose JPEG for the CT class and fail (0xA702) on each
    uncompressed CT instance; with a context per syntax family, uncompressed first, the CT comes
    as stored, and the JPEG Baseline instance, which it cannot send uncompressed, in a second pass
    that proposes JPEG, as stored (nothing is compressed lossy)."""
    jpeg = data["jpeg"]
    with Dcmqrscp(tmp_path / "pacs", options=["+xy"]) as pacs:
        pacs.load(data["ct"] + [data["jpeg_file"]])
        cfg = parse_config({"listen": {"port": free_port()}, "auth": {"anonymous": True},
                            "backends": {"LEGACYPACS": {"type": "dimse", "host": "127.0.0.1", "port": pacs.port}}})
        with BackgroundServer(cfg) as server:
            c = DICOMwebClient(server.url)
            study = c.retrieve_study(data["study"])
            originals = {d.SOPInstanceUID: d for d in map(pydicom.dcmread, data["ct"])}
            assert len(study) == SLICES
            for got in study:
                assert got.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
                assert got.PixelData == originals[got.SOPInstanceUID].PixelData
            back = c.retrieve_study(jpeg.StudyInstanceUID)
            assert len(back) == 1 and back[0].file_meta.TransferSyntaxUID == jpeg.file_meta.TransferSyntaxUID
            assert back[0].PixelData == jpeg.PixelData
            # a syntax this PACS cannot give: made by the gateway (uncompressed), or 406 (lossy), never 502
            path = f"/studies/{jpeg.StudyInstanceUID}/series/{jpeg.SeriesInstanceUID}/instances/{jpeg.SOPInstanceUID}"
            r = httpx.get(server.url + path, timeout=60, headers={
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'})
            assert r.status_code == 200, r.text[:200]
            ctype = parse_media_type(r.headers["content-type"])
            native = pydicom.dcmread(BytesIO(parse_multipart(r.content, ctype.params["boundary"])[0].body))
            assert native.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
            assert (native.pixel_array == jpeg.pixel_array).all()
            ct = pydicom.dcmread(data["ct"][0])
            lossy = httpx.get(f"{server.url}/studies/{ct.StudyInstanceUID}", timeout=60, headers={
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.91'})
            assert lossy.status_code == 406


# -- STOW-RS ------------------------------------------------------------------------------------------

def _new_instance(study_uid: str | None = None) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


@pytest.mark.parametrize("aet", [None, "ORTHANC"])
def test_store_instances_then_find_and_retrieve_them(bed, aet):
    c = client(bed, aet)
    ds = _new_instance()
    answer = c.store_instances([ds])
    stored = answer.ReferencedSOPSequence
    assert [item.ReferencedSOPInstanceUID for item in stored] == [ds.SOPInstanceUID]
    deadline = time.monotonic() + 10
    while not c.search_for_studies(search_filters={"StudyInstanceUID": ds.StudyInstanceUID}):
        assert time.monotonic() < deadline, "stored study not found"
        time.sleep(0.2)
    back = c.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert back.PixelData == ds.PixelData


def test_metadata_from_the_headers_the_gateway_holds(bed, data, monkeypatch):
    """Series metadata over DIMSE: one C-GET of the study, kept as headers; asked again, the PACS
    is not asked; a STOW-RS into the study drops what was kept."""
    backend = bed["server"].server.config.app.gateway.backends["LEGACYPACS"]
    c = client(bed)
    first = c.retrieve_series_metadata(data["study"], data["series"])
    assert len(first) == SLICES and all(m["7FE00010"]["BulkDataURI"].endswith("/bulk/7FE00010") for m in first)
    retrievals = []
    real = backend.retrieve
    monkeypatch.setattr(backend, "retrieve", lambda *a, **k: (retrievals.append(a), real(*a, **k))[1])
    assert c.retrieve_series_metadata(data["study"], data["series"]) == first
    assert retrievals == []
    one = _new_instance()
    c.store_instances([one])
    assert len(c.retrieve_study_metadata(one.StudyInstanceUID)) == 1
    two = _new_instance(one.StudyInstanceUID)
    c.store_instances([two])
    assert {values(m, "00080018")[0] for m in c.retrieve_study_metadata(one.StudyInstanceUID)} == {
        one.SOPInstanceUID, two.SOPInstanceUID}


def _multipart(parts: list[bytes], boundary: str = "b0undary") -> tuple[bytes, dict]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                  "Accept": "application/dicom+json"}


def _encode(ds) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_store_reports_failures_with_status_codes(bed):
    good = _new_instance()
    body, headers = _multipart([_encode(good), b"this is not DICOM"])
    r = httpx.post(f"{bed['url']}/studies", content=body, headers=headers, timeout=30)
    assert r.status_code == 202
    answer = r.json()
    assert answer["00081199"]["Value"][0]["00081155"]["Value"] == [good.SOPInstanceUID]
    assert answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    body, headers = _multipart([b"garbage"])
    assert httpx.post(f"{bed['url']}/studies", content=body, headers=headers, timeout=30).status_code == 409
    other = _new_instance()
    body, headers = _multipart([_encode(other)])
    r = httpx.post(f"{bed['url']}/studies/{generate_uid()}", content=body, headers=headers, timeout=30)
    assert r.status_code == 409 and "does not match" in r.text
    r = httpx.post(f"{bed['url']}/studies", content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415


# -- errors -------------------------------------------------------------------------------------------

def test_errors_are_clear(bed, data):
    url = bed["url"]
    r = httpx.get(f"{url}/studies", params={"limit": "ten"})
    assert r.status_code == 400 and "limit" in r.json()["error"]
    r = httpx.get(f"{url}/studies", params={"NoSuchAttribute": "x"})   # ignored (PS3.18 8.3), and said
    assert r.status_code == 200 and "NoSuchAttribute" in r.headers["warning"]
    r = httpx.get(f"{url}/studies", params={"StudyDate": "yesterday"})
    assert r.status_code == 400 and "StudyDate" in r.json()["error"]
    r = httpx.get(f"{url}/studies/not-a-uid/series")
    assert r.status_code == 400 and "StudyInstanceUID" in r.json()["error"]
    r = httpx.get(f"{url}/studies/{generate_uid()}", timeout=30)
    assert r.status_code == 404
    r = httpx.get(f"{url}/studies/{data['study']}", headers={"Accept": "text/html"})
    assert r.status_code == 406
    r = httpx.get(f"{url}/aets/NOSUCHAET/studies")
    assert r.status_code == 404 and "NOSUCHAET" in r.json()["error"]
    sop = pydicom.dcmread(data["ct"][0]).SOPInstanceUID
    r = httpx.get(f"{url}/studies/{data['study']}/series/{data['series']}/instances/{sop}/frames/2", timeout=30)
    assert r.status_code == 404 and "frame 2" in r.json()["error"]


def test_pacs_down_is_502_quickly(bed):
    started = time.monotonic()
    r = httpx.get(f"{bed['url']}/aets/DOWN/studies", timeout=30)
    assert r.status_code == 502 and "DOWN" in r.json()["error"]
    r = httpx.get(f"{bed['url']}/aets/DOWN/studies/{generate_uid()}", timeout=30)
    assert r.status_code == 502
    r = httpx.get(f"{bed['url']}/aets/WRONGAE/studies", timeout=30)
    assert r.status_code == 502 and "NOSUCHAE" in r.json()["error"] and "reject" in r.json()["error"]
    assert time.monotonic() - started < 15


def test_slow_pacs_is_504():
    """A PACS that accepts the association but never answers the C-FIND or the C-GET."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                      StudyRootQueryRetrieveInformationModelGet)

    release = threading.Event()

    def stall(event):
        release.wait(15)
        yield 0x0000, None

    def stall_get(event):
        release.wait(15)
        yield 0
        yield 0x0000, None

    ae = AE(ae_title="SLOWPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False,
                          evt_handlers=[(evt.EVT_C_FIND, stall), (evt.EVT_C_GET, stall_get)])
    try:
        cfg = parse_config({"listen": {"port": free_port()}, "auth": {"anonymous": True}, "backends": {
            "SLOWPACS": {"type": "dimse", "host": "127.0.0.1", "port": port, "dimse_timeout": 1.5}}})
        with BackgroundServer(cfg) as server:
            for path in ("/studies", f"/studies/{generate_uid()}"):
                started = time.monotonic()
                r = httpx.get(f"{server.url}{path}", timeout=30)
                assert r.status_code == 504, r.text
                assert "did not answer" in r.json()["error"] or "no data" in r.json()["error"]
                assert time.monotonic() - started < 12
    finally:
        release.set()
        scp.shutdown()


# -- streaming ----------------------------------------------------------------------------------------

def _gateway_for(bed: dict, **backend) -> BackgroundServer:
    """A gateway of its own in front of the bed's dcmqrscp (C-MOVE destination OMIGWPND)."""
    pacs = bed["pacs"]
    cfg = parse_config({"listen": {"port": free_port()}, "auth": {"anonymous": True}, "stream_queue": 2,
                        "dimse": {"calling_aet": "OMIGWPND",
                                  "move_destination": {"aet": "OMIGWPND", "port": bed["move_port_pnd"]}},
                        "backends": {"LEGACYPACS": {"type": "dimse", "host": "127.0.0.1", "port": pacs.port,
                                                    **backend}}})
    return BackgroundServer(cfg)


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_study_streams_before_the_last_instance_arrives(bed, data, retrieve):
    with _gateway_for(bed, retrieve=retrieve) as server:
        stats = server.server.config.app.gateway.stats
        with httpx.stream("GET", f"{server.url}/studies/{data['big_study']}", timeout=60,
                          headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
            assert r.status_code == 200
            chunks = r.iter_raw(1 << 16)
            first = next(chunks)
            assert first.startswith(b"--")
            time.sleep(0.3)  # the client pauses: the gateway holds only a few instances meanwhile
            assert stats.get("instances_received") < BIG_SLICES
            boundary = r.headers["content-type"].split("boundary=")[1].split(";")[0]
            marker = b"--" + boundary.encode() + b"\r\n"
            parts, tail = first.count(marker), first[-len(marker):]
            for chunk in chunks:
                parts += (tail + chunk).count(marker)
                tail = chunk[-len(marker):]
        # the first part left the gateway before the C-GET delivered the last instance
        assert stats.times["first_part_sent"] < stats.times["instance_received"]
        assert stats.get("instances_received") == BIG_SLICES and parts == BIG_SLICES


def _connections_to(port: int) -> set[int]:
    """The TCP connections to ``port`` that are established on the connecting side (a gateway's
    associations to the PACS), by socket inode. Tests compare these sets, not their sizes: a
    connection that another gateway closes meanwhile changes nothing, and a line that
    /proc/net/tcp (read in pieces while sockets come and go) lists twice counts once."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                cols = line.split()
                if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == port:
                    found.add(int(cols[9]))
    return found


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_client_disconnect_releases_the_association(bed, data, retrieve):
    pacs = bed["pacs"]
    with _gateway_for(bed, retrieve=retrieve) as server:   # (its pool starts empty)
        # dcmqrscp's children by process ID, not their number: a child of an earlier test's
        # association may still be exiting while this one starts
        before = pacs.association_pids()
        with httpx.stream("GET", f"{server.url}/studies/{data['big_study']}", timeout=60) as r:
            chunks = r.iter_raw(4096)  # (an abandoned iterator would close the response at once)
            next(chunks)
            ours: set[int] = set()
            deadline = time.monotonic() + 10
            while not ours:
                assert time.monotonic() < deadline, "no association of the retrieval at the PACS"
                ours = pacs.association_pids() - before   # the retrieval's, still running
                time.sleep(0.05)
            assert len(ours) == 1, ours
        # the client went away mid-stream: the retrieval's association must go, not linger or be pooled
        deadline = time.monotonic() + 10
        while pacs.association_pids() & ours:
            assert time.monotonic() < deadline, "association still open after the client left"
            time.sleep(0.1)
        gw = server.server.config.app.gateway
        assert gw.stats.get("instances_received") < BIG_SLICES
        deadline = time.monotonic() + 5
        while gw.stats.get("streams_active"):
            assert time.monotonic() < deadline, "producer thread still running"
            time.sleep(0.1)


def test_idle_pooled_associations_count_against_the_limit(bed, data):
    """max_associations bounds what the PACS sees, idle pooled associations included: after a burst
    of searches leaves associations in the pool, a retrieval closes an idle one to get its slot."""
    port = bed["pacs"].port
    with _gateway_for(bed, max_associations=2, pool_size=4, retrieve="get") as server:
        before = _connections_to(port)   # the bed gateway's pooled ones

        def ours() -> set[int]:
            return _connections_to(port) - before

        peak, done = [0], threading.Event()

        def watch():
            # One read of /proc/net/tcp is no snapshot (it takes milliseconds, more on a busy machine):
            # a connection closed after its line was read and one opened before its line is reached
            # are both in it. One in two reads in a row was open from the end of the first read to
            # the start of the second: those were open at the same time.
            last: set[int] = set()
            while not done.is_set():
                now = ours()
                peak[0] = max(peak[0], len(now & last))
                last = now
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            def search(_):
                return httpx.get(f"{server.url}/studies", params={"PatientID": "*"}, timeout=60).status_code

            threads = [threading.Thread(target=lambda: codes.append(search(0))) for _ in range(6)]
            codes: list[int] = []
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert codes == [200] * 6
            # (while requests wait for a slot, idle associations close; one search alone leaves one)
            assert httpx.get(f"{server.url}/studies", params={"PatientID": "BIGSTUDY01"}, timeout=60).status_code == 200
            deadline = time.monotonic() + 30   # (polled: a read of /proc/net/tcp may miss a socket)
            while not ours():
                assert time.monotonic() < deadline, "the pool kept no association open"
                time.sleep(0.05)
            # no slot free for dimse_timeout (30 s) would be a 504, not a slow 200
            r = httpx.get(f"{server.url}/studies/{data['big_study']}", timeout=60)
            assert r.status_code == 200
        finally:
            done.set()
            watcher.join()
        assert peak[0] <= 2, f"the PACS saw {peak[0]} associations at once (limit 2)"


# -- differential: the gateway over dcmqrscp vs Orthanc's own DICOMweb ------------------------------

def _summary(items: list[dict], key: str, tags: list[str]) -> dict:
    return {values(i, key)[0]: tuple(str(values(i, t)) for t in tags) for i in items}


def test_same_answers_as_orthanc_dicomweb(bed, data):
    gw = client(bed)
    ref = DICOMwebClient(bed["orthanc"].dicomweb_url)
    tags = ["00100020", "00080020", "00080061", "00201206", "00201208"]
    ours = _summary(gw.search_for_studies(search_filters={"StudyInstanceUID": f"{data['study']},{data['mr_study']}"}),
                    "0020000D", tags)
    theirs = _summary(ref.search_for_studies(search_filters={"StudyInstanceUID": data["study"]}) +
                      ref.search_for_studies(search_filters={"StudyInstanceUID": data["mr_study"]}),
                      "0020000D", tags)
    assert ours == theirs
    series_tags = ["00080060", "00200011", "00201209"]
    assert _summary(gw.search_for_series(data["study"]), "0020000E", series_tags) == \
        _summary(ref.search_for_series(data["study"]), "0020000E", series_tags)
    inst_tags = ["00200013"]  # dcmqrscp answers few IMAGE-level keys (no Rows, Columns, SOPClassUID)
    ours_inst = gw.search_for_instances(data["study"], data["series"])
    assert _summary(ours_inst, "00080018", inst_tags) == \
        _summary(ref.search_for_instances(data["study"], data["series"]), "00080018", inst_tags)
    # when a PACS returns SOPClassUID (dcmqrscp does not), it must be the right one
    assert all(values(i, "00080016") in (None, ["1.2.840.10008.5.1.4.1.1.2"]) for i in ours_inst)
    ours_ds = {d.SOPInstanceUID: d.PixelData for d in gw.retrieve_series(data["study"], data["series"])}
    theirs_ds = {d.SOPInstanceUID: d.PixelData for d in ref.retrieve_series(data["study"], data["series"])}
    assert ours_ds == theirs_ds
    ours_meta = {values(m, "00080018")[0]: m for m in gw.retrieve_series_metadata(data["study"], data["series"])}
    theirs_meta = {values(m, "00080018")[0]: m for m in ref.retrieve_series_metadata(data["study"], data["series"])}
    assert set(ours_meta) == set(theirs_meta)
    for sop, m in ours_meta.items():
        for tag in ("00100010", "00280010", "00280011", "00200032", "00281050"):
            assert m.get(tag) == theirs_meta[sop].get(tag), tag
        assert "BulkDataURI" in m["7FE00010"] and "BulkDataURI" in theirs_meta[sop]["7FE00010"]


# -- privacy ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aet", [None, "MOVEPACS"])
def test_no_patient_data_in_the_logs(bed, data, aet, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pynetdicom")
    c = client(bed, aet)
    found = c.search_for_studies(search_filters={"PatientID": data["patient_id"]}, fields=["PatientName"])
    name = found[0]["00100010"]["Value"][0]["Alphabetic"]
    c.search_for_series(data["study"])
    c.retrieve_series_metadata(data["study"], data["series"])
    httpx.get(f"{bed['url']}{'/aets/' + aet if aet else ''}/studies/{generate_uid()}", timeout=30)  # a 404
    ours = [r for r in caplog.records if r.name.split(".")[0] in ("omi_dsf", "pynetdicom", "uvicorn", "starlette")]
    assert ours, "the gateway logged nothing: the test would prove nothing"
    text = "\n".join(r.getMessage() for r in ours)
    assert data["patient_id"] not in text
    assert name.split("^")[0] not in text
