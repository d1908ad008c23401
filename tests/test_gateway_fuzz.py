"""Bounded fuzzing of the gateway (issue 16): a few hundred hypothesis-made requests against a real
server on 127.0.0.1 — QIDO-RS keys and values, WADO-RS paths and parameters, STOW-RS bodies made of
cut, flipped and spliced instances in odd multipart framing, and QIDO-RS through dcmqrscp. After
every request: no 5xx, an answer within its time, /health answering; at the end the data stored
before the fuzzing is byte for byte what it was."""

from __future__ import annotations

import hashlib
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from omi_dsf.dicomweb.multipart import iter_bodies, part_head
from test_gateway_hostile import encode, instance, nested, served, store_config, stow

# the gateway runs in this process (unit tests); only the fuzzing through dcmqrscp (a process) is integration
pytestmark = [pytest.mark.timeout(600)]

FUZZ = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ANSWER_WITHIN = 30.0     # seconds: longer is a hang
HEALTH_WITHIN = 2.0
UNSENDABLE = (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError)   # refused by the client itself

ODD = ["", " ", "*", "?", "**", "*?*?*?*?*?*?x", "*a*a*a*a*a*b", "\\", "\\\\", ",", ",,", "-", "--", "nan", "inf",
       "-inf", "1e400", "-1", "0", "²", "١٢", "𝟘", "\x00", "\x1b[2J", "\u202e", "é", "'", '"', "%", "%00", "..",
       "../", "9" * 400, "1" * 70, "19710314", "20200101-", "-20200101", "20200101-20191231", "1.2.3", "1..2",
       ".1", "1.2.840.10008.1.2", "x" * 2000, "true", "false", "all", "Doe^Jane", "=?", "&", "#"]
KEYS = ["PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber",
        "ModalitiesInStudy", "Modality", "SeriesNumber", "SeriesDescription", "InstanceNumber", "Rows", "PatientWeight",
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstitutionName", "includefield",
        "limit", "offset", "fuzzymatching", "00100010", "0020000D", "-0000001", "FFFEE000", "7FE00010", "00080005",
        "00090010", "PixelData", "ReferencedSOPSequence", "ReferencedSOPSequence.ReferencedSOPInstanceUID", "x", ""]
text = st.one_of(st.sampled_from(ODD), st.text(max_size=30), st.lists(st.sampled_from(ODD), min_size=2, max_size=4).map("".join))
uid = st.one_of(st.sampled_from(["1.2.3", "1.2.840.10008.1.2", "0", "1." + "9" * 70, "1.02", "x"]), text)


# a new connection for every health check (no keep-alive), from one client: building a client per
# check (httpx.get) loads the system CA bundle each time, a third of the fuzzing's time
_HEALTH = httpx.Client(timeout=HEALTH_WITHIN, limits=httpx.Limits(max_keepalive_connections=0))
_CLIENT = httpx.Client(timeout=ANSWER_WITHIN)


def _health(url: str) -> None:
    t = time.perf_counter()
    assert _HEALTH.get(url + "/health").status_code == 200
    assert time.perf_counter() - t < HEALTH_WITHIN


def _check(answer: httpx.Response) -> None:
    assert answer.status_code < 500, (answer.request.method, str(answer.request.url)[:300], answer.status_code,
                                      answer.text[:300])


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A store gateway holding one study, and what it holds (to compare after the fuzzing)."""
    root = tmp_path_factory.mktemp("fuzz")
    with served(store_config(root, max_instance_mb=8, header_timeout=5, body_timeout=5)) as server:
        seed = [instance(), nested(instance(), 3)]
        with httpx.Client(base_url=server.url, timeout=ANSWER_WITHIN) as c:
            assert stow(c, [encode(seed[0]), seed[1]]).status_code == 200
            ds = seed[0]
            wado = f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
            before = snapshot(c, ds.StudyInstanceUID, wado)
            yield {"url": server.url, "ds": ds, "wado": wado, "client": c}
            assert snapshot(c, ds.StudyInstanceUID, wado) == before, "the fuzzing changed stored data"


def snapshot(c: httpx.Client, study: str, wado: str) -> tuple:
    instances = c.get(f"/studies/{study}/instances", params={"includefield": "all"}).json()
    answer = c.get(wado)
    [data] = iter_bodies(answer.headers["content-type"], [answer.content])
    return sorted(str(i) for i in instances), hashlib.sha256(data).hexdigest()


# -- QIDO-RS -------------------------------------------------------------------------------------------

qido_paths = st.sampled_from(["/studies", "/series", "/instances", "/studies/{S}/series", "/studies/{S}/instances",
                              "/studies/{S}/series/{Se}/instances", "/studies/{x}/series", "/aets/{x}/studies"])


@FUZZ
@given(path=qido_paths, params=st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), text), text), max_size=5),
       x=uid)
def test_fuzz_qido(seeded, path, params, x):
    ds = seeded["ds"]
    path = path.format(S=ds.StudyInstanceUID, Se=ds.SeriesInstanceUID, x=x)
    try:
        answer = seeded["client"].get(path, params=params, headers={"Accept": "application/dicom+json"})
    except UNSENDABLE:
        return   # (not even a request httpx can send)
    _check(answer)
    _health(seeded["url"])


# -- WADO-RS -------------------------------------------------------------------------------------------

suffixes = st.one_of(
    st.sampled_from(["", "/metadata", "/rendered", "/thumbnail", "/frames/1", "/bulk/7FE00010", "/bulk/00100010"]),
    st.builds(lambda f: "/frames/" + f, st.one_of(text, st.lists(st.integers(-2, 3000).map(str), min_size=1,
                                                                 max_size=300).map(",".join))),
    st.builds(lambda f, tail: f"/frames/{f}{tail}", text, st.sampled_from(["/rendered", "/thumbnail"])),
    st.builds(lambda t: "/bulk/" + t, text))
accepts = st.one_of(st.none(), st.sampled_from([
    "application/dicom+json", 'multipart/related; type="application/dicom"; transfer-syntax=*',
    'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1', "application/octet-stream",
    'multipart/related; type="application/octet-stream"', "image/png", "image/*;q=nan", "*/*;q=1e400", "text/html",
    'multipart/related; type="image/jpeg"', ";;;", "*/*;q=-1, image/gif"]), text)
render_params = st.lists(st.tuples(st.sampled_from(["quality", "viewport", "window", "annotation", "x"]), text),
                         max_size=3)


@FUZZ
@given(level=st.sampled_from(["study", "series", "instance", "other"]), suffix=suffixes, accept=accepts,
       params=render_params, x=uid)
def test_fuzz_wado(seeded, level, suffix, accept, params, x):
    ds = seeded["ds"]
    path = {"study": f"/studies/{ds.StudyInstanceUID}",
            "series": f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}",
            "instance": seeded["wado"],
            "other": f"/studies/{ds.StudyInstanceUID}/series/{x}/instances/{ds.SOPInstanceUID}"}[level] + suffix
    headers = {"Accept": accept} if accept is not None else {}
    try:
        answer = seeded["client"].get(path, params=params, headers=headers)
    except UNSENDABLE:
        return
    _check(answer)
    _health(seeded["url"])


# -- STOW-RS -------------------------------------------------------------------------------------------

_SOURCES = [encode(instance()), nested(instance(), 8),
            open(get_testdata_file("image_dfl.dcm"), "rb").read(), open(get_testdata_file("JPEG2000.dcm"), "rb").read()]


@st.composite
def broken_instances(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(_SOURCES)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "splice", "zero"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "splice":
            other = draw(st.sampled_from(_SOURCES))
            data[at:] = other[draw(st.integers(0, len(other) - 1)):]
        elif kind == "zero":
            data[at:at + 8] = bytes(8)
    return bytes(data)


@st.composite
def stow_bodies(draw) -> tuple[bytes, str]:
    boundary = draw(st.sampled_from(["b0", "omi-x", "a" * 70, "ü"]))
    parts = draw(st.lists(broken_instances(), min_size=0, max_size=4))
    framing = draw(st.sampled_from(["ok", "no-close", "no-crlf", "bad-head", "odd-type", "junk"]))
    head = part_head("b0", "application/dicom") if framing != "odd-type" else b"--b0\r\nContent-Type: " + \
        draw(st.sampled_from([b"text/plain", b"application/dicom; transfer-syntax=\xff", b"", b";"])) + b"\r\n\r\n"
    if framing == "bad-head":
        head = b"--b0\r\nno colon here\r\n\r\n"
    body = b"".join(head.replace(b"b0", boundary.encode("utf-8")) + p + (b"\r\n" if framing != "no-crlf" else b"")
                    for p in parts)
    if framing != "no-close":
        body += f"--{boundary}--\r\n".encode("utf-8")
    if framing == "junk":
        body = draw(st.binary(max_size=200)) + body
    ctype = draw(st.sampled_from([f'multipart/related; type="application/dicom"; boundary={boundary}',
                                  f"multipart/related; boundary={boundary}", "multipart/related",
                                  f'multipart/related; type="application/json"; boundary={boundary}',
                                  "application/dicom", f"multipart/related; boundary=\"{boundary}\"; x=\"y"]))
    return body, ctype


@FUZZ
@given(body=stow_bodies(), url=st.sampled_from(["/studies", "/studies/{S}", "/studies/1.2.3"]))
def test_fuzz_stow(seeded, body, url):
    payload, ctype = body
    url = url.format(S=seeded["ds"].StudyInstanceUID)
    try:
        answer = seeded["client"].post(url, content=payload,
                                       headers={"Content-Type": ctype.encode("utf-8").decode("latin-1")})
    except UNSENDABLE:
        return
    _check(answer)
    _health(seeded["url"])


# -- QIDO-RS through a real PACS -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pacs_url(tmp_path_factory, dcmqrscp):
    root = tmp_path_factory.mktemp("fuzz-pacs")
    (root / "one.dcm").write_bytes(encode(instance(StudyDescription="a" * 64)))
    dcmqrscp.load([root / "one.dcm"])
    with served({"auth": {"anonymous": True}, "backends": {
            "PACS": {"type": "dimse", "host": "127.0.0.1", "port": dcmqrscp.port, "called_aet": dcmqrscp.aet,
                     "dimse_timeout": 20}}}) as server:
        yield server.url


@pytest.mark.integration
@settings(FUZZ, max_examples=80)
@given(path=st.sampled_from(["/studies", "/series", "/instances"]),
       params=st.lists(st.tuples(st.sampled_from(KEYS), text), min_size=1, max_size=3))
def test_fuzz_qido_through_dcmqrscp(pacs_url, path, params):
    try:
        answer = _CLIENT.get(pacs_url + path, params=params)
    except UNSENDABLE:
        return
    _check(answer)
    _health(pacs_url)
