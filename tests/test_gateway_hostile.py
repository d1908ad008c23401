"""The gateway under hostile input (issue 16): each case that once gave a 5xx, a stall, unbounded
memory or patient data in the log, as a regression test. In process (starlette's TestClient) where
the HTTP layer does not matter; a real uvicorn server on 127.0.0.1 (BackgroundServer) where it does
(timeouts, URL and header size, connections); dcmqrscp where the PACS is the point (integration).
Times and memory are asserted as bounds only."""

from __future__ import annotations

import copy
import http.client
import json
import logging
import re
import socket
import struct
import threading
import time
import warnings
import zlib
from io import BytesIO
from pathlib import Path

import httpx
import jwt
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from starlette.testclient import TestClient

from conftest import free_port
from omi_dsf.dicomweb import part10
from omi_dsf.dicomweb.app import create_app
from omi_dsf.dicomweb.config import load_config, parse_config
from omi_dsf.dicomweb.matching import wildcard_match
from omi_dsf.dicomweb.multipart import dicom_body
from omi_dsf.dicomweb.server import BackgroundServer
from omi_dsf.testkit.legacy_pacs import Dcmqrscp

PATIENT = {"PatientName": "Secret^Jane", "PatientID": "PID-9931-SECRET", "PatientBirthDate": "19710314"}
SECRETS = ("Secret^Jane", "Secret", "PID-9931-SECRET", "19710314", "1971-03-14")


# -- building instances, good and bad -----------------------------------------------------------------

def instance(study: str | None = None, series: str | None = None, sop: str | None = None,
             **attrs) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in {**PATIENT, **attrs}.items():
        setattr(ds, key, value)
    return ds


def encode(ds: pydicom.Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def with_meta(ds: pydicom.Dataset, dataset_bytes: bytes, ts: str) -> bytes:
    """A Part 10 file whose data set is ``dataset_bytes`` as given (meta information from ``ds``)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buf.getvalue() + dataset_bytes


def odd_group_length(data: bytes, size: int) -> bytes:
    """``data`` with its (0002,0000) UL value ``size`` bytes long instead of 4 (pydicom: 500 before)."""
    assert data[132:138] == b"\x02\x00\x00\x00UL"
    value = data[140:144][:size].ljust(size, b"\0")
    return data[:138] + struct.pack("<H", size) + value + data[144:]


def header_bytes(ds: pydicom.Dataset) -> bytes:
    """The data set without Pixel Data, Explicit VR Little Endian."""
    ds = copy.deepcopy(ds)
    del ds.PixelData
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def deflate_bomb(ds: pydicom.Dataset, inflated_mb: int, pieces: int = 1) -> bytes:
    """A Deflated Explicit VR Little Endian instance with ``inflated_mb`` MB of zeros (about 1/1000
    of that on the wire): one Pixel Data element, or ``pieces`` private OB elements whose declared
    lengths each stay small (then only counting the inflated bytes finds it)."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [squeeze.compress(header_bytes(ds))]
    zeros = bytes(1 << 20)
    for i in range(pieces):
        tag = (0x7FE0, 0x0010) if pieces == 1 else (0x0029, 0x1000 + i)
        size = (inflated_mb << 20) // pieces
        out.append(squeeze.compress(struct.pack("<HH2sHL", *tag, b"OB", 0, size)))
        out += [squeeze.compress(zeros[:min(len(zeros), size - done)]) for done in range(0, size, len(zeros))]
    out.append(squeeze.flush())
    return with_meta(ds, b"".join(out), DeflatedExplicitVRLittleEndian)


def nested(ds: pydicom.Dataset, depth: int) -> bytes:
    """An instance with ``depth`` sequences each inside the last (undefined lengths)."""
    down = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    up = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return with_meta(ds, header_bytes(ds) + down * depth + up * depth, ExplicitVRLittleEndian)


def unknown_vr(ds: pydicom.Dataset) -> bytes:
    data = bytearray(header_bytes(ds))
    at = data.index(b"\x08\x00\x20\x00DA") + 4        # StudyDate's VR
    data[at:at + 2] = b"Q\x07"
    return with_meta(ds, bytes(data), ExplicitVRLittleEndian)


def stow(client, parts: list[bytes], url: str = "/studies"):
    body, ctype = dicom_body(parts)
    return client.post(url, content=body, headers={"Content-Type": ctype})


def failures(answer) -> list[tuple[int, str]]:
    return [(i["00081197"]["Value"][0], (i.get("00000902") or {}).get("Value", [""])[0])
            for i in answer.json().get("00081198", {}).get("Value", [])]


def store_config(root: Path, **limits) -> dict:
    return {"auth": {"anonymous": True}, "backends": {"STORE": {"type": "store", "path": str(root / "store")}},
            "limits": limits}


@pytest.fixture
def gw(tmp_path):
    with TestClient(create_app(parse_config(store_config(tmp_path, max_instance_mb=16))),
                    base_url="http://gw.test") as client:
        yield client


def served(cfg: dict) -> BackgroundServer:
    return BackgroundServer(parse_config({"listen": {"port": free_port()}, **cfg}))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS (Linux)


# -- wildcard matching ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, value", [
    ("*a*a*a*a*a*a*a*b", "a" * 64),                       # 16.4 s as a regex
    ("*?*?*?*?*?*?*?*?*?*?*?*?x", "y" * 64),              # 6.3 s as a regex
    ("*" + "a?" * 300 + "c*b", "a" * 10000 + "b"),
    ("*" + "?" * 1000 + "x", "x" * 5000),
])
def test_wildcard_matching_takes_linear_time(pattern, value):
    started = time.perf_counter()
    for _ in range(5):
        wildcard_match(pattern, value)
    assert time.perf_counter() - started < 0.5


def test_wildcard_matching_agrees_with_a_regex():
    import itertools
    for n in range(6):
        for pattern in map("".join, itertools.product("ab*?", repeat=n)):
            rx = re.compile("".join(".*" if c == "*" else "." if c == "?" else c for c in pattern), re.DOTALL)
            for m in range(5):
                for value in map("".join, itertools.product("ab", repeat=m)):
                    assert wildcard_match(pattern, value) == bool(rx.fullmatch(value)), (pattern, value)


def test_a_backtracking_query_stalls_nothing(tmp_path):
    """The store matches itself: the issue's queries answer at once, and /health meanwhile."""
    with served(store_config(tmp_path)) as server:
        ds = instance(StudyDescription="a" * 64, InstitutionName="y" * 64)
        assert stow(httpx.Client(base_url=server.url), [encode(ds)]).status_code == 200
        slowest, stop = [0.0], threading.Event()

        def query_forever():
            with httpx.Client(base_url=server.url, timeout=30) as c:
                while not stop.is_set():
                    for params in ({"StudyDescription": "*a*a*a*a*a*a*a*b"},
                                   {"InstitutionName": "*?*?*?*?*?*?*?*?*?*?*?*?x"}):
                        t = time.perf_counter()
                        level = "/studies" if "StudyDescription" in params else "/series"
                        assert c.get(level, params=params).json() == []
                        slowest[0] = max(slowest[0], time.perf_counter() - t)

        worker = threading.Thread(target=query_forever)
        worker.start()
        try:
            with httpx.Client(base_url=server.url, timeout=10) as c:
                for _ in range(20):
                    t = time.perf_counter()
                    assert c.get("/health").status_code == 200
                    assert time.perf_counter() - t < 1.0
                    time.sleep(0.02)
        finally:
            stop.set()
            worker.join(30)
        assert slowest[0] < 2.0


def test_a_query_past_its_time_limit_is_503(tmp_path):
    cfg = parse_config(store_config(tmp_path, query_timeout=1e-9))
    with TestClient(create_app(cfg)) as c:
        r = c.get("/studies")
        assert r.status_code == 503 and "limits.query_timeout" in r.json()["error"]


# -- STOW-RS: limits, broken files, conflicts ----------------------------------------------------------

@pytest.mark.parametrize("pieces", [1, 64])   # one huge element (seen at once), or many (counted)
def test_a_deflate_bomb_is_refused_with_bounded_memory(gw, pieces):
    ds = instance()
    bomb = deflate_bomb(ds, 64, pieces)      # 4 parts of 64 MB inflated each; max_instance_mb is 16
    assert len(bomb) < 1 << 20
    reset_peak_rss()
    before = peak_rss_mb()
    started = time.monotonic()
    r = stow(gw, [bomb] * 4)
    assert time.monotonic() - started < 20
    assert peak_rss_mb() - before < 100      # (was: the whole inflated data set, 4 x 500 MB)
    assert r.status_code == 413, r.text
    assert failures(r) == [(0xA700, "inflates to more than 16 MB (limits.max_instance_mb)")] * 4
    assert r.json()["00081198"]["Value"][0]["00081155"]["Value"] == [ds.SOPInstanceUID]
    assert gw.get("/studies", params={"StudyInstanceUID": ds.StudyInstanceUID}).json() == []


def test_a_deflated_instance_within_the_limit_is_stored_as_sent(gw):
    data = Path(get_testdata_file("image_dfl.dcm")).read_bytes()
    ds = pydicom.dcmread(BytesIO(data))
    assert stow(gw, [data]).status_code == 200
    r = gw.get(f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    assert r.status_code == 200 and data in r.content


@pytest.mark.parametrize("make, reason", [
    (lambda ds: encode(ds)[:-1000], "cut off"),
    (lambda ds: encode(ds)[:-1], "cut off"),
    (lambda ds: nested(ds, 65), "nested deeper than 64"),
    (lambda ds: nested(ds, 2000), "nested deeper than 64"),     # pydicom: RecursionError
    (lambda ds: unknown_vr(ds), "unknown VR"),
    (lambda ds: odd_group_length(encode(ds), 3), "not a DICOM Part 10"),     # a UL of 3 bytes
    (lambda ds: odd_group_length(encode(ds), 6), "not a DICOM Part 10"),
    (lambda ds: with_meta(ds, header_bytes(ds), "1.2.840.10008.1.2.1.x"), "transfer syntax"),
    (lambda ds: with_meta(ds, header_bytes(ds), "1.2.3.4"), "transfer syntax"),
    (lambda ds: b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff", "cut off"),
])
def test_a_broken_file_fails_alone_and_is_never_served(gw, make, reason):
    bad, good = instance(), instance()
    r = stow(gw, [make(bad), encode(good)])
    assert r.status_code == 202, r.text
    [(status, why)] = failures(r)
    assert reason in why and status in (0xC000, 0xC122)
    if "transfer syntax" in reason:
        assert status == 0xC122
    assert gw.get("/instances", params={"SOPInstanceUID": bad.SOPInstanceUID}).json() == []
    back = gw.get(f"/studies/{good.StudyInstanceUID}/series/{good.SeriesInstanceUID}/instances/{good.SOPInstanceUID}")
    assert encode(good) in back.content


def test_the_same_instance_elsewhere_is_a_conflict_and_nothing_moves(gw):
    first = instance()
    data = encode(first)
    assert stow(gw, [data]).status_code == 200
    assert stow(gw, [data]).status_code == 200                         # same again: idempotent
    for other in (instance(sop=first.SOPInstanceUID),                   # another study
                  instance(study=first.StudyInstanceUID, sop=first.SOPInstanceUID),   # another series
                  instance(study=first.StudyInstanceUID, series=first.SeriesInstanceUID,
                           sop=first.SOPInstanceUID, PatientID="SOMEONE-ELSE")):      # another patient
        r = stow(gw, [encode(other)])
        assert r.status_code == 409, r.text
        [(status, why)] = failures(r)
        assert status == 0xA770 and "already stored" in why
    found = gw.get("/instances", params={"SOPInstanceUID": first.SOPInstanceUID}).json()
    assert [f["0020000D"]["Value"][0] for f in found] == [first.StudyInstanceUID]
    back = gw.get(f"/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}/instances/"
                  f"{first.SOPInstanceUID}")
    assert data in back.content


def test_stow_limits_name_themselves(tmp_path):
    cfg = parse_config(store_config(tmp_path, max_parts=2, max_instance_mb=1, max_body_mb=1))
    with TestClient(create_app(cfg)) as c:
        r = stow(c, [encode(instance())] * 3)
        assert r.status_code == 413 and "limits.max_parts" in r.json()["error"]
        big = instance()
        big.PixelData = bytes(2 << 20)
        r = stow(c, [encode(big)])
        assert r.status_code == 413 and "limits.max_body_mb" in r.json()["error"]
    cfg = parse_config(store_config(tmp_path, max_instance_mb=1))
    with TestClient(create_app(cfg)) as c:
        r = stow(c, [encode(big)])
        assert r.status_code == 413 and "limits.max_instance_mb" in r.json()["error"]


def test_an_upload_that_broke_off_is_visible(gw, monkeypatch):
    from omi_dsf.dicomweb import app as app_module
    monkeypatch.setattr(app_module, "STOW_BATCH_PARTS", 2)
    study = generate_uid()
    sent = [instance(study=study) for _ in range(5)]
    body, ctype = dicom_body(encode(ds) for ds in sent)
    cut = body[:body.rindex(b"\r\n--omi-")]                 # the last part never ends
    r = gw.post("/studies", content=cut, headers={"Content-Type": ctype})
    assert r.status_code == 400 and "closing boundary missing" in r.json()["error"]
    stored = r.json()["stored"]
    assert stored == [ds.SOPInstanceUID for ds in sent[:4]]
    found = gw.get(f"/studies/{study}/instances")
    assert sorted(i["00080018"]["Value"][0] for i in found.json()) == sorted(stored)
    assert "Incomplete upload" in found.headers["warning"] and study in found.headers["warning"]
    assert "Incomplete upload" in gw.get("/studies").headers.get("warning", "")
    assert stow(gw, [encode(ds) for ds in sent]).status_code == 200     # sent again, whole
    assert "warning" not in gw.get(f"/studies/{study}/instances").headers


def test_a_client_that_goes_away_mid_upload_leaves_an_incomplete_study(tmp_path, monkeypatch):
    from omi_dsf.dicomweb import app as app_module
    monkeypatch.setattr(app_module, "STOW_BATCH_PARTS", 1)
    with served(store_config(tmp_path)) as server:
        study = generate_uid()
        body, ctype = dicom_body(encode(instance(study=study)) for _ in range(3))
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) * 2 // 3])
            time.sleep(0.5)
        deadline = time.monotonic() + 10
        with httpx.Client(base_url=server.url) as c:
            while "Incomplete upload" not in c.get(f"/studies/{study}/instances").headers.get("warning", ""):
                assert time.monotonic() < deadline, "the cut-off upload is not marked"
                time.sleep(0.1)
            assert 1 <= len(c.get(f"/studies/{study}/instances").json()) <= 2


# -- WADO-RS and QIDO-RS parameters -------------------------------------------------------------------

@pytest.fixture
def stored(gw):
    ds = instance()
    assert stow(gw, [encode(ds)]).status_code == 200
    return ds, f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def test_frame_lists_are_merged_and_bounded(gw, stored):
    ds, path = stored
    r = gw.get(path + "/frames/" + ",".join(["1"] * 2000))
    assert r.status_code == 200 and len(r.content) < len(ds.PixelData) + 1000   # one frame, not 2000
    r = gw.get(path + "/frames/" + ",".join(map(str, range(1, 1002))))
    assert r.status_code == 400 and "limits.max_frames" in r.json()["error"]
    for odd in ("²", "١", "1,²", "-1", "0", "1e3", " ", "999999999999999999999999"):
        r = gw.get(path + "/frames/" + odd)
        assert r.status_code in (400, 404), (odd, r.status_code)


@pytest.mark.parametrize("params", [{"quality": "²"}, {"quality": "١٠"}, {"viewport": "²,²"},
                                    {"viewport": "64,٦٤"}, {"window": "nan,400"}, {"window": "40,inf"},
                                    {"window": "1e400,1"}, {"window": "٤٠,400"}])
def test_rendered_parameters_are_checked(gw, stored, params):
    r = gw.get(stored[1] + "/rendered", params=params)
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("params", [
    {"-0000001": "x"}, {"FFFEE000": "x"}, {"00000000": "x"}, {"00020010": "x"}, {"0x100010": "x"},
    {"includefield": "-0000001"}, {"includefield": "FFFEE0DD"}, {"PixelData": "x"}, {"a\x1bb\r\n": ""},
    {"Müller\"\\": "x"},
])
def test_odd_query_names_are_ignored_and_named(gw, params):
    """PS3.18 8.3: a parameter the gateway does not support is ignored; the Warning names it."""
    r = gw.get("/studies", params=params)
    assert r.status_code == 200, (params, r.text)
    name = next(iter(params)) if "includefield" not in params else params["includefield"]
    if name.isascii() and name.isprintable() and '"' not in name:
        assert name in r.headers["warning"]
    else:   # control characters, quotes and non-ASCII never reach the header
        assert "?" in r.headers["warning"] and all(" " <= c <= "~" for c in r.headers["warning"])
    assert r.headers["warning"].startswith("299 ")


@pytest.mark.parametrize("params", [
    {"SeriesNumber": "nan"}, {"SeriesNumber": "1e400"}, {"InstanceNumber": "²"}, {"Rows": "-1"},
    {"Rows": "70000"}, {"PatientWeight": "nan"}, {"PatientWeight": "inf"}, {"PatientWeight": "1e400"},
    {"PatientWeight": "12345678901234567"}, {"StudyDate": "٢٠٢٠٠١٠١"},
])
def test_odd_query_keys_are_400(gw, params):
    level = "/instances" if {"InstanceNumber", "Rows"} & set(params) else \
        "/series" if "SeriesNumber" in params else "/studies"
    r = gw.get(level, params=params)
    assert r.status_code == 400, (params, r.text)


def _signed(header: dict, claims: dict, key) -> str:
    """An RS256 token signed as it is (pyjwt itself refuses to write a list as "iss" or "kid")."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    signing_input = b".".join(jwt.utils.base64url_encode(json.dumps(part).encode()) for part in (header, claims))
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()


def test_a_token_with_odd_claims_is_401(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "idp.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cfg = parse_config({"auth": {"jwt": [{"issuer": "https://idp.test", "key_file": str(tmp_path / "idp.pem")}]},
                        "backends": {"S": {"type": "store", "path": str(tmp_path / "s")}}})
    exp = int(time.time()) + 60
    with TestClient(create_app(cfg)) as c:
        for claims, headers in (({"iss": ["https://idp.test"], "exp": exp}, None),
                                ({"iss": {"a": 1}, "exp": exp}, None),
                                ({"iss": "https://idp.test", "exp": "soon"}, None),
                                ({"iss": "https://idp.test", "exp": exp}, {"kid": ["x"]})):
            token = _signed({"alg": "RS256", "typ": "JWT", **(headers or {})}, claims, key)
            r = c.get("/studies", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401, (claims, r.text)
        for junk in ("a.b.c", "e30.e30.", "x" * 5000, "\u00e9.\u00e9.\u00e9"):
            r = c.get("/studies", headers={"Authorization": f"Bearer {junk}".encode()})
            assert r.status_code == 401


# -- logs ---------------------------------------------------------------------------------------------

def test_no_patient_data_or_uids_in_the_log(tmp_path, caplog, monkeypatch):
    """At the default level (INFO): no value pydicom complains about, no UID from a path, no
    exception message; the issue saw a birth date, name and ID, and every 5xx's path."""
    cfg = parse_config({**store_config(tmp_path), "backends": {
        "STORE": {"type": "store", "path": str(tmp_path / "store")},
        "DOWN": {"type": "dimse", "host": "127.0.0.1", "port": free_port(), "connect_timeout": 1}}})
    with warnings.catch_warnings():   # (the client's side: writing the odd values warns too)
        warnings.simplefilter("ignore")
        odd = instance(PatientBirthDate="1971-03-14", StudyDate="2020/01/01", PatientAge="forty")
        parts = [encode(odd), encode(odd)[:-10], nested(odd, 100), unknown_vr(odd)]
    uids = [odd.StudyInstanceUID, odd.SeriesInstanceUID, odd.SOPInstanceUID]
    caplog.clear()                    # (what pydicom logged while the test built them)
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")          # the gateway's own filters come before this one
        with TestClient(create_app(cfg), raise_server_exceptions=False) as c:
            _hostile_requests(c, parts, uids, monkeypatch)
    text = "\n".join(f"{rec.name} {rec.getMessage()} {rec.exc_text or ''}" for rec in caplog.records
                     if not rec.name.startswith("httpx"))   # (the test's own client logs its URLs)
    text += "\n".join(str(w.message) for w in seen)
    assert "ValueError" in text and "{uid}" in text     # the error lines are there, without what they hid
    for secret in (*SECRETS, *uids):
        assert secret not in text, secret


def _hostile_requests(c, parts, uids, monkeypatch):
    assert stow(c, parts).status_code == 202
    path = f"/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"
    assert c.get(path + "/metadata").status_code == 200
    assert c.get(path + "/rendered").status_code == 200
    assert c.get("/studies", params={"PatientName": "Secret*"}).status_code == 200
    assert c.get("/aets/DOWN" + path).status_code == 502
    assert c.get(f"/aets/DOWN/studies/{uids[0]}/series").status_code == 502
    from omi_dsf.dicomweb import wado

    secret_message = " ".join([*PATIENT.values(), *uids])

    def explode(*_):
        raise ValueError(secret_message)
    monkeypatch.setattr(wado, "choose_frame_media", explode)
    r = c.get(path + "/frames/1")
    assert r.status_code == 500 and "Secret" not in r.text and "logged as" in r.json()["error"]


# -- the HTTP layer: a real server --------------------------------------------------------------------

def _port(server: BackgroundServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def test_half_sent_requests_do_not_hold_the_server(tmp_path):
    """1,000 clients that open a connection and send half a request (or nothing): /health answers
    meanwhile, and after header_timeout every one of them has been answered 408 and closed."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2500:   # both ends of 1,000 connections are in this process
        if hard != resource.RLIM_INFINITY and hard < 2500:
            pytest.skip(f"open-files limit {hard} is below the 2,500 this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536, hard))
    with served(store_config(tmp_path, header_timeout=2)) as server:
        port, socks = _port(server), []
        try:
            for i in range(1000):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall([b"", b"GET /studies HTTP/1.1\r\nHost: x\r\n", b"POST /stud"][i % 3])
                socks.append(s)
            with httpx.Client(base_url=server.url, timeout=5) as c:
                t = time.perf_counter()
                assert c.get("/health").status_code == 200
                assert c.get("/studies").status_code == 200
                assert time.perf_counter() - t < 2
            deadline = time.monotonic() + 20
            answers = []
            for s in socks:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                data = b""
                while chunk := s.recv(4096):   # until the server closes it
                    data += chunk
                answers.append(data)
            assert all(a.startswith(b"HTTP/1.1 408") and b"header_timeout" in a for a in answers)
        finally:
            for s in socks:
                s.close()


def test_a_stalled_body_is_408_and_the_connection_closes(tmp_path):
    with served(store_config(tmp_path, body_timeout=1)) as server:
        body, ctype = dicom_body([encode(instance())])
        with socket.create_connection(("127.0.0.1", _port(server)), timeout=10) as s:
            started = time.monotonic()
            s.sendall(f"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            assert data.startswith(b"HTTP/1.1 408") and b"body_timeout" in data
            assert b"connection: close" in data.lower()
            assert time.monotonic() - started < 8


def test_url_and_header_limits(tmp_path):
    with served(store_config(tmp_path, max_query_bytes=2048, max_header_bytes=4096)) as server:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            r = c.get("/studies", params={"PatientName": "x" * 3000})
            assert r.status_code == 414 and "limits.max_query_bytes" in r.json()["error"]
            assert c.get("/health").status_code == 200
        with socket.create_connection(("127.0.0.1", _port(server)), timeout=10) as s:
            s.sendall(b"GET /studies HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"y" * 3000)   # headers that keep coming
            time.sleep(0.2)
            s.sendall(b"y" * 3000)
            answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 431") and b"limits.max_header_bytes" in answer
        assert httpx.get(server.url + "/health").status_code == 200


def test_too_many_requests_at_once_is_503_and_health_still_answers(tmp_path):
    with served(store_config(tmp_path, max_concurrent=1, body_timeout=10)) as server:
        body, ctype = dicom_body([encode(instance())])
        with socket.create_connection(("127.0.0.1", _port(server)), timeout=10) as slow:
            slow.sendall(f"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:50])
            time.sleep(0.3)
            with httpx.Client(base_url=server.url, timeout=10) as c:
                r = c.get("/studies")
                assert r.status_code == 503 and "limits.max_concurrent" in r.json()["error"]
                assert r.headers["retry-after"] == "1"
                assert c.get("/health").status_code == 200
            slow.sendall(body[50:])
            assert slow.recv(12).startswith(b"HTTP/1.1 200")
        with httpx.Client(base_url=server.url, timeout=10) as c:
            assert c.get("/studies").status_code == 200


def test_the_connection_stays_usable_after_a_stow_error(tmp_path):
    """The issue saw a reset after a STOW 500. A STOW error after the body was read keeps the
    connection; one answered before (415) says ``Connection: close``, and the next request goes
    out on a new one."""
    with served(store_config(tmp_path)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", _port(server), timeout=10)
        try:
            body, ctype = dicom_body([b"not dicom", encode(instance())[:500]])
            for payload, headers, kept in ((body, {"Content-Type": ctype}, True),
                                           (body[:-20], {"Content-Type": ctype}, True),   # closing boundary cut
                                           (b"{}", {"Content-Type": "multipart/related; boundary=x"}, True),
                                           (body, {"Content-Type": "application/json"}, False)):
                conn.request("POST", "/studies", body=payload, headers=headers)
                first = conn.sock
                answer = conn.getresponse()
                assert 400 <= answer.status < 500
                assert (answer.getheader("connection") != "close") == kept
                answer.read()
                conn.request("GET", "/health")
                assert conn.getresponse().read() == b'{"status":"ok"}'
                assert (conn.sock is first) == kept      # the same connection, or a new one as announced
        finally:
            conn.close()


# -- a real PACS (dcmqrscp) -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pacs_gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-pacs")
    ds = instance(StudyDescription="a" * 64, InstitutionName="y" * 64)
    path = root / "one.dcm"
    path.write_bytes(encode(ds))
    with Dcmqrscp(root / "dcmqrscp") as pacs:
        pacs.load([path])
        with served({"auth": {"anonymous": True}, "backends": {
                "PACS": {"type": "dimse", "host": "127.0.0.1", "port": pacs.port, "called_aet": pacs.aet}}}) as server:
            yield server, ds


@pytest.mark.integration
def test_dimse_backend_client_errors_are_400(pacs_gateway):
    server, ds = pacs_gateway
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for params in ({"PatientWeight": "nan"}, {"PatientWeight": "1e400"}, {"StudyDate": "٢٠٢٠٠١٠١"},
                       {"NumberOfStudyRelatedInstances": "nan"}, {"StudyID": "x" * 2000}):
            r = c.get("/studies", params=params)
            assert r.status_code == 400, (params, r.text)
        r = c.get("/studies", params={"PatientName": "Müller*"})
        assert r.status_code == 200


@pytest.mark.integration
def test_dimse_backtracking_patterns_answer_quickly(pacs_gateway):
    server, ds = pacs_gateway
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for level, params in (("/studies", {"StudyDescription": "*a*a*a*a*a*a*a*b"}),       # 22.8 s before
                              ("/series", {"InstitutionName": "*?*?*?*?*?*?*?*?*?*?*?*?x"}),
                              ("/studies", {"StudyDescription": "*a*a*a*a*a*a*a*a"})):
            started = time.monotonic()
            r = c.get(level, params=params)
            assert r.status_code == 200 and time.monotonic() - started < 5
            if "StudyDescription" in params:   # (dcmqrscp ignores InstitutionName: no answer to check)
                assert len(r.json()) == (1 if params["StudyDescription"].endswith("*a") else 0)


@pytest.mark.integration
def test_dimse_stow_fails_only_the_instance_with_a_bad_transfer_syntax(pacs_gateway):
    server, _ = pacs_gateway
    bad, good = instance(), instance()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = stow(c, [with_meta(bad, header_bytes(bad), "1.2.840.10008.1.2.4.x"), encode(good)])
        assert r.status_code == 202, r.text
        assert failures(r) == [(0xC122, "transfer syntax '1.2.840.10008.1.2.4.x' is not supported")]
        assert r.json()["00081199"]["Value"][0]["00081155"]["Value"] == [good.SOPInstanceUID]


def test_part10_check_never_raises_anything_else():
    """The walker on cut and flipped bytes of real files: Refused or fine, nothing else."""
    import random
    rng = random.Random(16)
    sources = [encode(instance()), Path(get_testdata_file("image_dfl.dcm")).read_bytes(),
               Path(get_testdata_file("JPEG2000.dcm")).read_bytes(), nested(instance(), 5)]
    for data in sources:
        for _ in range(300):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(128, len(mutated))
                mutated[at] = rng.randrange(256)
            cut = bytes(mutated[:rng.randrange(128, len(mutated) + 1)])
            try:
                part10.check(cut, 1 << 20)
            except part10.Refused:
                pass


def test_json_error_bodies_are_json(gw):
    r = gw.get("/studies", params={"limit": "x"})
    assert r.headers["content-type"] == "application/json" and json.loads(r.text)["status"] == 400


# -- configuration ------------------------------------------------------------------------------------

def test_odd_configurations_are_config_errors(tmp_path):
    """Every key of a full configuration replaced by values of the wrong type or range: a
    ConfigError naming the key, never another exception (the issue saw tracebacks)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from omi_dsf.dicomweb.config import ConfigError
    (tmp_path / "ca.pem").write_text("not a certificate")
    (tmp_path / "idp.pem").write_text("not a key")
    full = {"listen": {"host": "127.0.0.1", "port": 8042}, "base_url": "https://gw.test", "name": "gw",
            "tls": {"certfile": "ca.pem", "keyfile": "ca.pem", "client_ca": "ca.pem", "require_client_cert": True},
            "auth": {"anonymous": False, "jwt": [{"issuer": "https://idp.test", "key_file": "idp.pem",
                                                  "audience": "gw", "algorithms": ["RS256"]}]},
            "dimse": {"calling_aet": "OMIGW", "move_destination": {"aet": "OMIGW", "port": 11114, "host": "h"}},
            "default": "PACS", "max_results": 10, "stream_queue": 2, "cors_origins": ["https://v.test"],
            "limits": {"max_body_mb": 1, "max_instance_mb": 1, "max_parts": 1, "max_frames": 1, "max_query_bytes": 64,
                       "max_header_bytes": 1024, "max_concurrent": 1, "header_timeout": 1, "body_timeout": 1.5,
                       "query_timeout": 1},
            "backends": {"PACS": {"type": "dimse", "host": "h", "port": 104, "retrieve": "move", "dimse_timeout": 3},
                         "OUT": {"type": "store", "path": "out"}}}
    paths = []

    def walk(node, path=()):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (i,))
    walk(full)
    odd = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(), st.text(max_size=8),
                    st.sampled_from(["", "-1", "nan", "\x00", "../x", "inf"]), st.lists(st.integers(), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(path=st.sampled_from(paths[1:]), value=odd)
    def check(path, value):
        cfg = copy.deepcopy(full)
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        try:
            parse_config(cfg, tmp_path)
        except ConfigError:
            pass
    check()
    with pytest.raises(ConfigError, match=r"auth.jwt\[0\].key_file"):   # a key that does not load
        parse_config({**full, "tls": None}, tmp_path)
    (tmp_path / "latin1.yaml").write_bytes(b"name: M\xfcller\n")
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(tmp_path / "latin1.yaml")
