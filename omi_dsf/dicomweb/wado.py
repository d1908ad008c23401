"""WADO-RS pieces that do not touch the network: media-type negotiation, transfer syntax,
metadata, frames and bulk data out of a Part 10 instance."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless,
                         JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless,
                         JPEGLSNearLossless, RLELossless, UID)

from . import transcode
from .dicomjson import BULK_VRS, PIXEL_DATA, to_json
from .errors import BadRequest, NotAcceptable, NotFound
from .multipart import MediaType

DICOM = "application/dicom"
OCTET = "application/octet-stream"
UNCOMPRESSED_TS = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.1.99",
                   "1.2.840.10008.1.2.2"}
# Media types of compressed frames (PS3.18 Table 8.7.3-2).
FRAME_MEDIA = {JPEGBaseline8Bit: "image/jpeg", JPEGExtended12Bit: "image/jpeg", JPEGLosslessSV1: "image/jpeg",
               "1.2.840.10008.1.2.4.57": "image/jpeg", JPEGLSLossless: "image/jls",
               JPEGLSNearLossless: "image/jls", JPEG2000Lossless: "image/jp2", JPEG2000: "image/jp2",
               RLELossless: "image/dicom-rle"}


@dataclass
class InstanceChoice:
    """How to send instances: the acceptable transfer syntaxes, best first ("*": as stored)."""
    wanted: list[str]

    @property
    def as_stored(self) -> bool:
        return self.wanted[0] == "*"


def _is_multipart_ok(mt: MediaType, part_types: tuple[str, ...]) -> bool:
    if mt.mime in ("*/*", "multipart/*"):
        return True
    if mt.mime != "multipart/related":
        return False
    t = mt.type_param
    return t is None or t in part_types or t in ("*/*", "application/*")


def choose_instance_media(accept: list[MediaType]) -> InstanceChoice:
    """Negotiate ``multipart/related; type="application/dicom"`` and the transfer syntaxes the
    client takes, in its order. Without a transfer-syntax parameter instances go as stored."""
    wanted: list[str] = []
    for mt in accept:
        if _is_multipart_ok(mt, (DICOM,)) or mt.mime == DICOM:
            ts = mt.params.get("transfer-syntax")
            ts = "*" if ts in (None, "", "*") else ts
            if ts not in wanted:
                wanted.append(ts)
    if not wanted:
        raise NotAcceptable('Accept: the gateway sends multipart/related; type="application/dicom"')
    return InstanceChoice(wanted)


def wants_bulk(accept: list[MediaType]) -> bool:
    """The client asks a study, series or instance for its bulk data
    (``multipart/related; type="application/octet-stream"``) before any DICOM representation."""
    for mt in accept:
        if mt.mime == "multipart/related" and mt.type_param == OCTET:
            return True
        if _is_multipart_ok(mt, (DICOM,)) or mt.mime == DICOM:
            return False
    return False


def read(data: bytes) -> Dataset:
    return dcmread(BytesIO(data))


def metadata(data: bytes, bulk_base: str) -> dict:
    return to_json(read(data), bulk_base)


def ascii_int(text: str) -> int | None:
    """A non-negative decimal integer in ASCII digits ("²" and "٣" are digits to str.isdigit)."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def parse_frame_list(text: str, max_frames: int = 1000) -> list[int]:
    """Frame numbers in the order asked, each once; more than ``max_frames`` is a 400."""
    frames: dict[int, None] = {}
    for item in text.split(","):
        number = ascii_int(item)
        if number is None or number < 1:
            raise BadRequest(f"frames: {item.strip()[:20]!r} is not a frame number (1, 2, …)")
        frames[number] = None
        if len(frames) > max_frames:
            raise BadRequest(f"frames: more than limits.max_frames ({max_frames}) frame numbers")
    return list(frames)


def frame_count(ds: Dataset) -> int:
    """NumberOfFrames (1 when absent); NotFound when it is not a number."""
    value = ds.get("NumberOfFrames", 1)
    try:
        n = int(value or 1)
    except (TypeError, ValueError, OverflowError):
        raise NotFound("the instance's NumberOfFrames is not a number") from None
    if n < 1:
        raise NotFound("the instance has no frames")
    return n


def frame_bytes(ds: Dataset, numbers: list[int]) -> tuple[list[bytes], str]:
    """The requested frames and the transfer syntax they are in."""
    if PIXEL_DATA not in ds:
        raise NotFound("the instance has no pixel data")
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    n = frame_count(ds)
    for k in numbers:
        if k > n:
            raise NotFound(f"frames: frame {k} does not exist; the instance has {n}")
    if ts.is_compressed:
        wanted = set(numbers)
        found: dict[int, bytes] = {}
        try:   # keeps only the frames asked for
            for k, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=n), 1):
                if k in wanted:
                    found[k] = frame
                if len(found) == len(wanted):
                    break
        except Exception as exc:  # noqa: BLE001 - malformed encapsulation in the stored data
            raise NotFound(f"the instance's compressed frames cannot be split ({type(exc).__name__})") from None
        if len(found) < len(wanted):
            raise NotFound("the instance's compressed pixel data holds fewer frames than NumberOfFrames")
        return [found[k] for k in numbers], str(ts)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        raise NotFound("the instance lacks Rows, Columns or BitsAllocated: no frames to serve") from None
    size = rows * cols * spp * bits // 8
    pixels = ds.PixelData
    if ts == "1.2.840.10008.1.2.2":
        raise NotAcceptable("big-endian pixel data is not served as frames")
    return [bytes(pixels[(k - 1) * size:k * size]) for k in numbers], ExplicitVRLittleEndian


def choose_frame_media(accept: list[MediaType], ts: str) -> tuple[str, str, bool, bool]:
    """(part media type, transfer syntax to announce, single part?, decode?) for frames stored in ``ts``.

    Uncompressed frames go out as application/octet-stream (Explicit VR Little Endian); compressed
    ones as stored, under their image media type, or as octet-stream when the client says
    ``transfer-syntax=*`` (or names the stored syntax); decoded to Explicit VR Little Endian when
    the client asks for octet-stream without a syntax or with that one (and a decoder exists).
    """
    native = ts in UNCOMPRESSED_TS
    if native:
        ts = ExplicitVRLittleEndian
    part = OCTET if native else FRAME_MEDIA.get(ts, OCTET)
    decodable = not native and transcode.can_decode(ts)
    plain = (None, "", ExplicitVRLittleEndian)
    for mt in accept:
        want = mt.params.get("transfer-syntax")
        if mt.mime == "*/*":
            return part, ts, False, False
        if mt.mime in ("multipart/related", "multipart/*"):
            t = mt.type_param
            if native and t in (None, "*/*", OCTET) and want in (None, "", "*", ts):
                return OCTET, ts, False, False
            if not native and t in (None, "*/*", part) and want in (None, "", "*", ts):
                return part, ts, False, False
            if not native and t == OCTET and want in ("*", ts):
                return OCTET, ts, False, False
            if decodable and t == OCTET and want in plain:
                return OCTET, ExplicitVRLittleEndian, False, True
        elif mt.mime == OCTET and want in ((None, "", "*", ts) if native else ("*", ts)):
            return OCTET, ts, True, False
        elif mt.mime == OCTET and decodable and want in plain:
            return OCTET, ExplicitVRLittleEndian, True, True
        elif not native and mt.mime == part and want in (None, "", "*", ts):
            return part, ts, True, False
    raise NotAcceptable(f'Accept: frames are available as multipart/related; type="{part}"; '
                        f"transfer-syntax={ts} (or transfer-syntax=*)"
                        + ("" if native or not decodable else
                           f', or decoded as type="{OCTET}"; transfer-syntax={ExplicitVRLittleEndian}'))


def bulk_value(ds: Dataset, tag_text: str) -> bytes:
    try:
        tag = int(tag_text, 16)
    except ValueError:
        raise BadRequest(f"bulk data tag {tag_text[:20]!r} is not 8 hexadecimal digits") from None
    if len(tag_text) != 8:
        raise BadRequest(f"bulk data tag {tag_text[:20]!r} is not 8 hexadecimal digits")
    if tag not in ds:
        raise NotFound(f"the instance has no attribute {tag_text.upper()}")
    elem = ds[tag]
    if elem.VR not in BULK_VRS and tag != PIXEL_DATA:
        raise NotFound(f"attribute {tag_text.upper()} is not bulk data")
    value = elem.value
    return bytes(value) if value is not None else b""


def bulk_values(ds: Dataset) -> list[tuple[int, bytes, str | None]]:
    """The instance's top-level bulk data: (tag, value, transfer syntax of the value or None).
    Compressed Pixel Data is decoded to native little endian when a decoder exists, else sent as
    stored (its fragments, with the stored syntax)."""
    out: list[tuple[int, bytes, str | None]] = []
    for elem in ds.elements():
        tag = int(elem.tag)
        if tag >> 16 == 0x0002 or (elem.VR not in BULK_VRS and tag != PIXEL_DATA):
            continue
        value = ds[tag].value
        if not value:
            continue
        if tag == PIXEL_DATA:
            ts = UID(str(ds.file_meta.TransferSyntaxUID))
            if ts.is_compressed and transcode.can_decode(ts):
                n = frame_count(ds)
                out.append((tag, b"".join(transcode.native_frames(ds, list(range(1, n + 1)))), ExplicitVRLittleEndian))
                continue
            out.append((tag, bytes(value), str(ts) if ts.is_compressed else ExplicitVRLittleEndian))
            continue
        out.append((tag, bytes(value), None))
    return out
