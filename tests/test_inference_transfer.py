"""The infer step's DICOMweb transfers: the streaming multipart parser, WADO-RS and STOW-RS against
the project's gateway (store backend)."""

from __future__ import annotations

import random

import pydicom
import pytest

from conftest import free_port
from omi_dsf.dicomweb.errors import BadRequest
from omi_dsf.dicomweb.multipart import MultipartReader, Truncated, iter_bodies
from omi_dsf.dicomweb_client import DicomwebClient, DicomwebRefused
from omi_dsf.inference import results
from omi_dsf.inference.transfer import StoreFailed, retrieve_series, store_instances
from omi_dsf.peer import Peer
from omi_dsf.testkit import phantom


def _message(boundary: bytes, bodies: list[bytes]) -> bytes:
    return (b"preamble to ignore\r\n"
            + b"".join(b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + body + b"\r\n"
                       for body in bodies)
            + b"--" + boundary + b"--\r\nepilogue")


def test_parser_finds_every_body_however_the_bytes_arrive():
    rng = random.Random(7)
    boundary = b"b0undary-7"
    # bodies that hold pieces of the delimiter, line breaks and nothing at all
    bodies = [rng.randbytes(rng.randint(0, 4000)) for _ in range(15)]
    bodies += [b"", b"\r\n--b0undary", b"--b0undary-", b"\r\n\r\n", b"x\r\n--b0undary-"]
    message = _message(boundary, bodies)
    for _ in range(200):
        parser, got, pos = MultipartReader(boundary.decode()), [], 0
        while pos < len(message):
            step = rng.choice([1, 2, 7, 64, 999, 5000])
            got += [part.body for part in parser.feed(message[pos:pos + step])]
            pos += step
        parser.close()
        assert got == bodies


def test_truncated_body_and_missing_boundary_are_errors():
    parser = MultipartReader("xyz")
    message = _message(b"xyz", [b"abc", b"def"])
    assert [p.body for p in parser.feed(message[:message.index(b"\r\n--xyz--")])] == [b"abc"]  # "def" may go on
    with pytest.raises(BadRequest, match="closing boundary missing"):
        parser.close()


def test_client_reads_bodies_and_tells_cut_off_from_malformed():
    message = _message(b"a b", [b"abc", b"def"])
    chunks = [message[i:i + 5] for i in range(0, len(message), 5)]
    assert list(iter_bodies('multipart/related; type="application/dicom"; boundary="a b"', chunks)) == [b"abc", b"def"]
    cut = message[:message.index(b"def") + 1]
    with pytest.raises(Truncated, match="ended inside part 2"):
        list(iter_bodies('multipart/related; boundary="a b"', [cut]))
    for ctype, problem in (("multipart/related", "missing or bad multipart boundary"),
                           ("application/dicom+json", "application/dicom\\+json, not multipart/related")):
        with pytest.raises(BadRequest, match=problem) as err:
            list(iter_bodies(ctype, [message]))
        assert not isinstance(err.value, Truncated)   # malformed, not cut off


def test_series_in_and_results_out_through_the_gateway(tmp_path):   # the gateway in this process: a unit test
    from omi_dsf.dicomweb.config import parse_config
    from omi_dsf.dicomweb.server import BackgroundServer
    from dicomweb_client.api import DICOMwebClient

    cfg = parse_config({"listen": {"host": "127.0.0.1", "port": free_port()}, "auth": {"anonymous": True},
                        "backends": {"INBOX": {"type": "store", "path": str(tmp_path / "store")}}})
    paths = phantom.write_ct_study(tmp_path / "ct", slices=4, rows=32, cols=32, seed=30)
    sent = {str(pydicom.dcmread(p).SOPInstanceUID): p.read_bytes() for p in paths}
    first = pydicom.dcmread(paths[0])
    with BackgroundServer(cfg) as gw, DicomwebClient(Peer(gw.url, timeout=30)) as dicomweb:
        DICOMwebClient(gw.url).store_instances([pydicom.dcmread(p) for p in paths])   # an independent client
        got = retrieve_series(dicomweb, str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
        assert {str(ds.SOPInstanceUID) for ds in got} == set(sent)
        for ds in got:  # as stored, not converted
            assert ds.PixelData == pydicom.dcmread(paths[int(ds.InstanceNumber) - 1]).PixelData
        with pytest.raises(DicomwebRefused) as refused:
            retrieve_series(dicomweb, str(first.StudyInstanceUID), "1.2.3.4")
        assert refused.value.status == 404

        sr_like = results.to_part10(first)  # any instance: STOW takes the bytes as they are
        store_instances(dicomweb, [sr_like])
        with pytest.raises(StoreFailed, match="STOW-RS HTTP 409"):
            store_instances(dicomweb, [b"not DICOM at all"])
