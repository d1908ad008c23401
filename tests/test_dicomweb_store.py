"""The gateway over its embedded store, in process (no servers): STOW → QIDO → WADO, status codes,
access control with JWTs, configuration errors and the FHIR Endpoint resources."""

from __future__ import annotations

import json
import time
from io import BytesIO
from pathlib import Path

import jwt
import pydicom
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from starlette.testclient import TestClient

from omi_dsf.dicomweb.app import create_app
from omi_dsf.dicomweb.config import ConfigError, load_config, parse_config
from omi_dsf.dicomweb.endpoint import endpoint_resource, endpoint_resources
from omi_dsf.testkit.phantom import write_ct_study

SLICES = 4


def _encode(ds) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _multipart(parts: list[bytes], boundary: str = "XbX") -> tuple[bytes, dict]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("store-data")
    return write_ct_study(root, slices=SLICES, seed=5, rows=64, cols=64) + [
        Path(get_testdata_file("MR_small.dcm")), Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))]


@pytest.fixture
def gw(tmp_path, files):
    cfg = parse_config({"auth": {"anonymous": True}, "max_results": 3,
                        "backends": {"OUTBOX": {"type": "store", "path": str(tmp_path / "store")}}})
    with TestClient(create_app(cfg), base_url="http://gw.test") as c:
        body, headers = _multipart([Path(f).read_bytes() for f in files])
        r = c.post("/studies", content=body, headers=headers)
        assert r.status_code == 200, r.text
        yield c


def _val(obj, tag):
    return obj.get(tag, {}).get("Value")


def test_stow_answer_lists_what_was_stored(gw, files):
    ds = pydicom.dcmread(files[0])
    body, headers = _multipart([files[0].read_bytes()])
    r = gw.post(f"/studies/{ds.StudyInstanceUID}", content=body, headers=headers)  # again: replaces
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    ref = r.json()["00081199"]["Value"][0]
    assert _val(ref, "00081155") == [ds.SOPInstanceUID]
    assert _val(ref, "00081190")[0].startswith(f"http://gw.test/studies/{ds.StudyInstanceUID}/series/")
    again = gw.get("/studies", params={"StudyInstanceUID": ds.StudyInstanceUID}).json()
    assert _val(again[0], "00201208") == [SLICES]  # stored twice, counted once


def test_stow_status_codes(gw, files):
    body, headers = _multipart([b"not dicom at all"])
    r = gw.post("/studies", content=body, headers=headers)
    assert r.status_code == 409
    failed = r.json()["00081198"]["Value"][0]
    assert _val(failed, "00081197") == [0xC000]
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = generate_uid()
    body, headers = _multipart([_encode(ds), b"junk"])
    assert gw.post("/studies", content=body, headers=headers).status_code == 202
    body, headers = _multipart([files[1].read_bytes()])
    r = gw.post(f"/studies/{generate_uid()}", content=body, headers=headers)
    assert r.status_code == 409 and _val(r.json()["00081198"]["Value"][0], "00081197") == [0xA900]
    assert gw.post("/studies", content=b"x", headers={"Content-Type": "application/dicom"}).status_code == 415
    r = gw.post("/studies", content=b"--nope", headers={"Content-Type": "multipart/related; boundary=XbX"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]


def test_stow_stores_batches_while_the_body_arrives(gw, files, monkeypatch):
    from omi_dsf.dicomweb import app as app_module
    monkeypatch.setattr(app_module, "STOW_BATCH_PARTS", 2)   # several batches from a small body
    base = pydicom.dcmread(files[0])
    copies = []
    for _ in range(5):
        base.SOPInstanceUID = generate_uid()
        copies.append((str(base.SOPInstanceUID), _encode(base)))
    body, headers = _multipart([data for _, data in copies])
    r = gw.post("/studies", content=body, headers=headers)
    assert r.status_code == 200
    assert sorted(_val(i, "00081155")[0] for i in r.json()["00081199"]["Value"]) == sorted(u for u, _ in copies)
    # a body that breaks after some batches: 400 naming the problem and what was kept
    more = []
    for _ in range(3):
        base.SOPInstanceUID = generate_uid()
        more.append((str(base.SOPInstanceUID), _encode(base)))
    body, headers = _multipart([data for _, data in more])
    broken = body[:body.rindex(b"--XbX--")] + b"--XbX\r\nno header end"
    r = gw.post("/studies", content=broken, headers=headers)
    assert r.status_code == 400
    assert "part headers not terminated" in r.json()["error"] and "2 instances before it were stored" in r.json()["error"]
    kept = gw.get(f"/studies/{base.StudyInstanceUID}/instances", params={"SOPInstanceUID": more[0][0]}).json()
    assert len(kept) == 1


def test_qido_over_the_store(gw, files):
    studies = gw.get("/studies").json()
    assert len(studies) == 3
    ct = next(s for s in studies if _val(s, "00080061") == ["CT"])
    assert _val(ct, "00201208") == [SLICES] and _val(ct, "00201206") == [1]
    assert gw.get("/studies", params={"ModalitiesInStudy": "MR"}).json()[0]["00080061"]["Value"] == ["MR"]
    assert len(gw.get("/instances", params={"Modality": "CT"}).json()) == 3   # cut at max_results …
    r = gw.get("/instances", params={"Modality": "CT"})
    assert "additional results" in r.headers.get("warning", "")               # … and says so
    assert len(gw.get("/instances", params={"Modality": "CT", "offset": 3}).json()) == 1
    study = _val(ct, "0020000D")[0]
    inst = gw.get(f"/studies/{study}/instances", params={"includefield": "all", "limit": 1}).json()
    assert "00280030" in inst[0]  # PixelSpacing: only with includefield=all
    plain = gw.get(f"/studies/{study}/instances", params={"limit": 1}).json()
    assert "00280030" not in plain[0]
    assert gw.get("/studies", params={"PatientName": "nobody"}).json() == []
    # the study-list query of the OHIF viewer
    pid = _val(ct, "00100020")[0]
    ohif = gw.get("/studies", params={"00100020": f"*{pid[2:]}*", "limit": "101", "offset": "0",
                                      "fuzzymatching": "false",
                                      "includefield": "00081030,00080060,00080090,00100030"})
    assert ohif.status_code == 200 and [_val(s, "0020000D") for s in ohif.json()] == [_val(ct, "0020000D")]
    assert "00100030" in ohif.json()[0] and "00081030" in ohif.json()[0]


def test_wado_over_the_store(gw, files):
    ds = pydicom.dcmread(files[1])
    s, se, i = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    r = gw.get(f"/studies/{s}", headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 200 and r.content.count(b"Content-Type: application/dicom") == SLICES
    meta = gw.get(f"/studies/{s}/series/{se}/instances/{i}/metadata").json()[0]
    bulk = meta["7FE00010"]["BulkDataURI"]
    assert bulk == f"http://gw.test/studies/{s}/series/{se}/instances/{i}/bulk/7FE00010"
    raw = gw.get(bulk.replace("http://gw.test", ""), headers={"Accept": "application/octet-stream"})
    assert raw.content == ds.PixelData
    frame = gw.get(f"/studies/{s}/series/{se}/instances/{i}/frames/1",
                   headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
    assert frame.status_code == 200 and ds.PixelData in frame.content
    png = gw.get(f"/studies/{s}/series/{se}/instances/{i}/rendered", params={"window": "40,400"},
                 headers={"Accept": "image/png"})
    assert Image.open(BytesIO(png.content)).size == (64, 64)
    thumb = gw.get(f"/studies/{s}/series/{se}/thumbnail", params={"viewport": "32,32"})
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(BytesIO(thumb.content)).size == (32, 32)
    assert gw.get(f"/studies/{s}/series/{se}/instances/{i}/rendered", params={"quality": "0"}).status_code == 400
    assert gw.get(f"/studies/{s}/series/{se}/instances/{i}/bulk/7FE0").status_code == 400
    assert gw.get(f"/studies/{s}/series/{se}/instances/{generate_uid()}/frames/1").status_code == 404
    assert gw.get(f"/aets/OUTBOX/studies/{s}/metadata").status_code == 200
    assert gw.get("/aets/OTHER/studies").status_code == 404


def test_frame_descriptions_are_in_the_metadata_not_in_the_index(gw, files):
    # a multi-frame object describes each frame in functional group sequences: a 200-slice SEG
    # carries 400 such items, too much to decode for every QIDO; WADO-RS metadata still has them
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = generate_uid()
    frame = pydicom.Dataset()
    frame.FrameContentSequence = [pydicom.Dataset()]
    frame.FrameContentSequence[0].DimensionIndexValues = [1, 1]
    ds.PerFrameFunctionalGroupsSequence = [frame]
    ds.SharedFunctionalGroupsSequence = [pydicom.Dataset()]
    body, headers = _multipart([_encode(ds)])
    assert gw.post(f"/studies/{ds.StudyInstanceUID}", content=body, headers=headers).status_code == 200
    found = gw.get(f"/studies/{ds.StudyInstanceUID}/instances",
                   params={"SOPInstanceUID": ds.SOPInstanceUID, "includefield": "all"}).json()
    assert len(found) == 1 and "00280030" in found[0]
    assert "52009230" not in found[0] and "52009229" not in found[0]
    meta = gw.get(f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                  f"{ds.SOPInstanceUID}/metadata").json()[0]
    assert _val(_val(_val(meta, "52009230")[0], "00209111")[0], "00209157") == [1, 1]


def test_compressed_instances_stay_compressed_in_the_store(gw, files):
    jpeg = pydicom.dcmread(files[-1])
    path = f"/studies/{jpeg.StudyInstanceUID}/series/{jpeg.SeriesInstanceUID}/instances/{jpeg.SOPInstanceUID}"
    whole = gw.get(path, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert whole.status_code == 200 and jpeg.PixelData in whole.content
    frame = gw.get(path + "/frames/1", headers={"Accept": 'multipart/related; type="image/jpeg"'})
    assert frame.status_code == 200 and 'type="image/jpeg"' in frame.headers["content-type"]
    assert "transfer-syntax=1.2.840.10008.1.2.4.50" in frame.headers["content-type"]
    assert b"\r\n\r\n\xff\xd8" in frame.content  # the JPEG stream itself
    # asked for uncompressed: decoded on the way (frames and whole instances)
    plain = gw.get(path + "/frames/1", headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert plain.status_code == 200 and "transfer-syntax=1.2.840.10008.1.2.1" in plain.headers["content-type"]
    assert jpeg.pixel_array.tobytes() in plain.content
    asked = gw.get(path, headers={"Accept": 'multipart/related; type="application/dicom"; '
                                            'transfer-syntax=1.2.840.10008.1.2.1'})
    assert asked.status_code == 200 and "transfer-syntax=1.2.840.10008.1.2.1" in asked.headers["content-type"]
    part = asked.content.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]
    got = pydicom.dcmread(BytesIO(part))
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (got.pixel_array == jpeg.pixel_array).all()
    # a lossy syntax the instance is not in is never made: 406
    lossy = gw.get(f"/studies/{pydicom.dcmread(files[0]).StudyInstanceUID}", headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'})
    assert lossy.status_code == 406 and "lossy" in lossy.json()["error"]


def test_bulk_data_of_a_study_and_an_instance(gw, files):
    """multipart/related; type="application/octet-stream" on a study or instance URL: each bulk
    value as a part named by its BulkDataURI (PS3.18 10.4.1.1.2)."""
    from omi_dsf.dicomweb.multipart import parse_media_type, parse_multipart
    ds = pydicom.dcmread(files[1])
    accept = {"Accept": 'multipart/related; type="application/octet-stream"'}
    r = gw.get(f"/studies/{ds.StudyInstanceUID}", headers=accept)
    assert r.status_code == 200
    ctype = parse_media_type(r.headers["content-type"])
    assert ctype.type_param == "application/octet-stream"
    parts = parse_multipart(r.content, ctype.params["boundary"])
    assert len(parts) == SLICES
    where = {p.headers["content-location"]: p.body for p in parts}
    uri = (f"http://gw.test/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
           f"{ds.SOPInstanceUID}/bulk/7FE00010")
    assert where[uri] == ds.PixelData
    one = gw.get(uri.replace("http://gw.test", "").rsplit("/bulk", 1)[0], headers=accept)
    assert one.status_code == 200 and one.content.count(b"Content-Location: ") == 1


# -- access control ----------------------------------------------------------------------------------

def _rsa():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, pub


def _token(key, **claims) -> str:
    body = {"iss": "https://idp.test", "aud": "omi-gateway", "sub": "worker", "exp": int(time.time()) + 300}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm="RS256",
                      headers={"kid": "k1"})


@pytest.fixture(scope="module")
def keys():
    return _rsa(), _rsa()


@pytest.mark.parametrize("as_jwks", [False, True])
def test_bearer_tokens(tmp_path, keys, as_jwks):
    (key, pub), (other, _) = keys
    key_file = tmp_path / ("jwks.json" if as_jwks else "idp.pem")
    if as_jwks:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        key_file.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig"}]}))
    else:
        key_file.write_bytes(pub)
    cfg = parse_config({"auth": {"jwt": [{"issuer": "https://idp.test", "key_file": str(key_file),
                                          "audience": "omi-gateway", "algorithms": ["RS256"]}]},
                        "backends": {"OUTBOX": {"type": "store", "path": str(tmp_path / "s")}}})
    with TestClient(create_app(cfg)) as c:
        def status(token):
            return c.get("/studies", headers={"Authorization": f"Bearer {token}"} if token else {}).status_code
        assert status(_token(key)) == 200
        assert status(None) == 401
        assert c.get("/health").status_code == 200
        assert status(_token(other)) == 401                                   # someone else's key
        assert status(_token(key, exp=int(time.time()) - 3600)) == 401         # expired
        assert status(_token(key, exp=None)) == 401                            # no expiry
        assert status(_token(key, iss="https://evil.test")) == 401             # unknown issuer
        assert status(_token(key, aud="someone-else")) == 401                  # wrong audience
        assert status(jwt.encode({"iss": "https://idp.test", "exp": int(time.time()) + 60}, None,
                                 algorithm="none")) == 401                     # unsigned
        r = c.get("/studies", headers={"Authorization": "Basic dXNlcjpwdw=="})
        assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"]


def test_cors_for_browser_viewers(tmp_path):
    cfg = parse_config({"auth": {"anonymous": True}, "cors_origins": ["https://viewer.test"],
                        "backends": {"S": {"type": "store", "path": str(tmp_path / "s")}}})
    with TestClient(create_app(cfg)) as c:
        pre = c.options("/studies", headers={"Origin": "https://viewer.test", "Access-Control-Request-Method": "GET"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://viewer.test"
        r = c.get("/studies", headers={"Origin": "https://viewer.test"})
        assert r.headers["access-control-allow-origin"] == "https://viewer.test"
        other = c.options("/studies", headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "GET"})
        assert other.status_code == 400


# -- configuration and Endpoint ----------------------------------------------------------------------

@pytest.mark.parametrize("conf, key", [
    ({"auth": {"anonymous": True}, "backends": {}}, "backends"),
    ({"auth": {"anonymous": True}, "backends": {"P": {"type": "ftp"}}}, "backends.P.type"),
    ({"auth": {"anonymous": True}, "backends": {"P": {"type": "dimse", "host": "h"}}}, "backends.P.port"),
    ({"auth": {"anonymous": True}, "backends": {"P": {"type": "dimse", "host": "h", "port": 70000}}}, "backends.P.port"),
    ({"auth": {"anonymous": True}, "backends": {"P": {"type": "dimse", "host": "h", "port": 1, "retrieve": "move"}}},
     "backends.P.retrieve"),
    ({"auth": {"anonymous": True}, "backends": {"THIS-AE-TITLE-IS-TOO-LONG": {"type": "store", "path": "x"}}},
     "backends"),
    ({"backends": {"S": {"type": "store", "path": "x"}}}, "auth"),
    ({"auth": {"anonymous": "yes"}, "backends": {"S": {"type": "store", "path": "x"}}}, "auth.anonymous"),
    ({"auth": {"anonymous": True}, "tls": {"certfile": "nope.pem", "keyfile": "k"},
      "backends": {"S": {"type": "store", "path": "x"}}}, "tls.certfile"),
    ({"auth": {"anonymous": True}, "default": "X", "backends": {"S": {"type": "store", "path": "x"}}}, "default"),
    ({"auth": {"anonymous": True}, "bogus": 1, "backends": {"S": {"type": "store", "path": "x"}}}, "bogus"),
])
def test_config_errors_name_the_key(tmp_path, conf, key):
    with pytest.raises(ConfigError) as err:
        parse_config(conf, tmp_path)
    assert key in str(err.value)


def test_config_file_and_endpoints(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text("listen: {port: 8443}\nbase_url: https://gw.example.org/dicomweb\n"
                    "auth: {anonymous: true}\ndefault: PACS\nbackends:\n"
                    "  PACS: {type: dimse, host: 10.0.0.5, port: 104}\n"
                    "  OUTBOX: {type: store, path: outbox}\n")
    cfg = load_config(path)
    assert cfg.backends["OUTBOX"].path == tmp_path / "outbox"
    wado = endpoint_resource(cfg)
    assert wado["resourceType"] == "Endpoint" and wado["status"] == "active"
    assert wado["connectionType"]["code"] == "dicom-wado-rs"
    assert wado["address"] == "https://gw.example.org/dicomweb"
    every = endpoint_resources(cfg)
    assert len(every) == 6
    assert {e["connectionType"]["code"] for e in every} == {"dicom-wado-rs", "dicom-qido-rs", "dicom-stow-rs"}
    assert "https://gw.example.org/dicomweb/aets/OUTBOX" in {e["address"] for e in every}
    with pytest.raises(ValueError):
        endpoint_resource(cfg, "NOPE")
    bare = parse_config({"auth": {"anonymous": True}}, tmp_path)  # no backends: the embedded store
    assert bare.default_backend == "STORE" and bare.backends["STORE"].path == tmp_path / "dicom-store"
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_store_indexes_the_same_with_the_parsed_headers(tmp_path, files):
    # STOW-RS hands the store the headers it parsed; the index must be what a parse of its own gives
    from omi_dsf.dicomweb.backends.store import StoreBackend
    from omi_dsf.dicomweb.config import parse_config
    items = [("", "", "", Path(f).read_bytes()) for f in files]
    headers = [pydicom.dcmread(BytesIO(d), stop_before_pixels=True) for *_, d in items]
    for h in headers:   # as the STOW handler leaves them: these few already decoded
        h.SOPClassUID, h.SOPInstanceUID, h.StudyInstanceUID, h.file_meta.TransferSyntaxUID
    rows = []
    for name, given in (("own", None), ("given", headers)):
        store = StoreBackend(parse_config({"auth": {"anonymous": True}, "backends": {
            name.upper(): {"type": "store", "path": str(tmp_path / name)}}}).backends[name.upper()])
        assert store.store(items, set(), given) == [(0, "")] * len(items)
        rows.append(store._rows("SELECT sop_uid, study_uid, series_uid, sop_class, transfer_syntax, modality, "
                                "path, size, study_json, series_json, instance_json FROM instances ORDER BY sop_uid", []))
        store.close()
    assert rows[0] == rows[1] and len(rows[0]) == len(files)


def test_rendered_study_and_series(gw, files):
    """PS3.18 Table 10.3-2: rendered study and series. multipart/related of images, one per
    instance with pixel data; a plain image type gets one image (the middle of the first series)."""
    from omi_dsf.dicomweb.multipart import parse_media_type, parse_multipart
    ds = pydicom.dcmread(files[1])
    s, se = ds.StudyInstanceUID, ds.SeriesInstanceUID
    for path in (f"/studies/{s}/rendered", f"/studies/{s}/series/{se}/rendered"):
        r = gw.get(path, headers={"Accept": 'multipart/related; type="image/png"'})
        assert r.status_code == 200, r.text
        ctype = parse_media_type(r.headers["content-type"])
        assert ctype.type_param == "image/png"
        parts = parse_multipart(r.content, ctype.params["boundary"])
        assert len(parts) == SLICES
        assert all(Image.open(BytesIO(p.body)).size == (64, 64) for p in parts)
        assert {p.headers["content-location"].rsplit("/", 2)[-2] for p in parts} == \
            {pydicom.dcmread(f).SOPInstanceUID for f in files[:SLICES]}
        one = gw.get(path, headers={"Accept": "image/jpeg"})
        assert one.status_code == 200 and one.headers["content-type"] == "image/jpeg"
        assert Image.open(BytesIO(one.content)).size == (64, 64)
    assert gw.get(f"/studies/{generate_uid()}/rendered",
                  headers={"Accept": 'multipart/related; type="image/png"'}).status_code == 404


def test_metadata_as_native_dicom_model_xml(gw, files):
    """WADO-RS metadata as multipart/related; type="application/dicom+xml" (PS3.19 Native DICOM
    Model): the same attributes and BulkDataURIs as the JSON."""
    from lxml import etree

    from omi_dsf.dicomweb.multipart import parse_media_type, parse_multipart
    ds = pydicom.dcmread(files[1])
    path = f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/metadata"
    r = gw.get(path, headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert r.status_code == 200, r.text
    ctype = parse_media_type(r.headers["content-type"])
    assert ctype.type_param == "application/dicom+xml"
    parts = parse_multipart(r.content, ctype.params["boundary"])
    assert len(parts) == SLICES
    as_json = {_val(m, "00080018")[0]: m for m in gw.get(path).json()}
    ns = {"d": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    for part in parts:
        assert part.headers["content-type"] == "application/dicom+xml"
        root = etree.fromstring(part.body, etree.XMLParser(resolve_entities=False, no_network=True))
        assert root.tag == "{http://dicom.nema.org/PS3.19/models/NativeDICOM}NativeDicomModel"
        sop = root.find("d:DicomAttribute[@keyword='SOPInstanceUID']/d:Value", ns).text
        meta = as_json[sop]
        assert {a.get("tag") for a in root.findall("d:DicomAttribute", ns)} == set(meta)
        name = root.find("d:DicomAttribute[@tag='00100010']/d:PersonName/d:Alphabetic", ns)
        assert "^".join(e.text or "" for e in name).startswith(_val(meta, "00100010")[0]["Alphabetic"].split("^")[0])
        bulk = root.find("d:DicomAttribute[@tag='7FE00010']/d:BulkData", ns).get("uri")
        assert bulk == meta["7FE00010"]["BulkDataURI"]
        rows = root.find("d:DicomAttribute[@keyword='Rows']/d:Value[@number='1']", ns).text
        assert int(rows) == _val(meta, "00280010")[0] == 64
    assert gw.get(path, headers={"Accept": "text/html"}).status_code == 406


def _json_body(objects: list[dict], bulk: list[tuple[str, str, bytes]], boundary: str = "JbJ") -> tuple[bytes, dict]:
    b = boundary.encode()
    body = b"--" + b + b"\r\nContent-Type: application/dicom+json\r\n\r\n" + json.dumps(objects).encode() + b"\r\n"
    for location, ctype, data in bulk:
        body += (b"--" + b + f"\r\nContent-Type: {ctype}\r\nContent-Location: {location}\r\n\r\n".encode()
                 + data + b"\r\n")
    return body + b"--" + b + b"--\r\n", {
        "Content-Type": f'multipart/related; type="application/dicom+json"; boundary={boundary}'}


def test_stow_metadata_and_bulk_data(gw, files):
    """PS3.18 10.5: STOW-RS of DICOM JSON metadata plus bulk data parts named by BulkDataURI,
    native and compressed; the instances come back as sent."""
    from omi_dsf.dicomweb.dicomjson import to_json
    native = pydicom.dcmread(files[0])
    native.SOPInstanceUID = generate_uid()
    jpeg = pydicom.dcmread(files[-1])
    jpeg.SOPInstanceUID = generate_uid()
    native_meta = to_json(native, "urn:native")
    jpeg_meta = to_json(jpeg, "urn:jpeg")
    body, headers = _json_body([native_meta, jpeg_meta], [
        ("urn:native/7FE00010", "application/octet-stream", native.PixelData),
        ("urn:jpeg/7FE00010", "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50",
         pydicom.encaps.generate_frames(jpeg.PixelData, number_of_frames=1).__next__())])
    r = gw.post("/studies", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert len(r.json()["00081199"]["Value"]) == 2
    for sent in (native, jpeg):
        path = f"/studies/{sent.StudyInstanceUID}/series/{sent.SeriesInstanceUID}/instances/{sent.SOPInstanceUID}"
        got = gw.get(path, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        ds = pydicom.dcmread(BytesIO(got.content.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]))
        assert ds.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert ds.PatientName == sent.PatientName and (ds.pixel_array == sent.pixel_array).all()
    # a BulkDataURI without its part fails that instance alone
    lost = pydicom.dcmread(files[0])
    lost.SOPInstanceUID = generate_uid()
    body, headers = _json_body([to_json(lost, "urn:lost")], [])
    r = gw.post("/studies", content=body, headers=headers)
    assert r.status_code == 409 and "BulkDataURI" in r.text
    body, headers = _json_body([], [("urn:x", "application/octet-stream", b"x")])
    assert gw.post("/studies", content=body.replace(b"[]", b"{not json"), headers=headers).status_code == 400


def test_stow_of_two_studies_has_an_empty_top_level_retrieve_url(gw, files):
    """PS3.18 Table I.1-1: Retrieve URL (Type 2) is the URL of the study; instances of two
    studies: present and empty, each instance's own RetrieveURL still there."""
    one, two = pydicom.dcmread(files[0]), pydicom.dcmread(files[-2])
    assert one.StudyInstanceUID != two.StudyInstanceUID
    body, headers = _multipart([files[0].read_bytes(), files[-2].read_bytes()])
    r = gw.post("/studies", content=body, headers=headers)
    assert r.status_code == 200
    assert r.json()["00081190"] == {"vr": "UR"}
    assert {_val(i, "00081190")[0].split("/studies/")[1].split("/")[0] for i in r.json()["00081199"]["Value"]} == \
        {one.StudyInstanceUID, two.StudyInstanceUID}


def test_search_results_as_xml(gw, files):
    """QIDO-RS answers as multipart/related; type="application/dicom+xml" too: the same matches
    and attributes as the JSON answer."""
    from lxml import etree

    from omi_dsf.dicomweb.multipart import parse_media_type, parse_multipart
    ds = pydicom.dcmread(files[1])
    path = f"/studies/{ds.StudyInstanceUID}/instances"
    as_json = gw.get(path).json()
    r = gw.get(path, headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert r.status_code == 200
    parts = parse_multipart(r.content, parse_media_type(r.headers["content-type"]).params["boundary"])
    ns = {"d": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    docs = [etree.fromstring(p.body, etree.XMLParser(resolve_entities=False)) for p in parts]
    assert len(docs) == len(as_json) > 0
    for doc, item in zip(docs, as_json):
        assert {a.get("tag") for a in doc.findall("d:DicomAttribute", ns)} == set(item)
        assert doc.findtext("d:DicomAttribute[@tag='00081190']/d:Value", None, ns) == _val(item, "00081190")[0]



def _open_at(args) -> str:
    what, path, start = args
    while time.time() < start:   # all at once, as workers forked together
        pass
    try:
        if what == "gateway store":
            from omi_dsf.dicomweb.backends.store import StoreBackend
            from omi_dsf.dicomweb.config import StoreBackendConfig
            StoreBackend(StoreBackendConfig(type="store", path=path)).close()
        else:
            from omi_dsf.deid.store import SiteStore
            SiteStore(f"sqlite:///{path}/site.db").close()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - the answer is what failed
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("what", ["gateway store", "site state"])
def test_workers_opening_a_new_sqlite_file_together_all_succeed(tmp_path, what):
    """Workers start at once on one new SQLite file (gateway workers on their store, site workers
    on the site state): each must open it. Switching a new file to WAL takes a lock SQLite's busy
    timeout does not wait for; CI saw 'database is locked' from a gateway worker."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    for attempt in range(5):
        start = time.time() + 0.5
        with ctx.Pool(6) as pool:
            assert pool.map(_open_at, [(what, str(tmp_path / str(attempt)), start)] * 6) == ["ok"] * 6
