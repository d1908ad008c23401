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
    """How to send instances: as stored (``transfer_syntax`` None) or converted to Explicit VR LE."""
    transfer_syntax: str | None


def _is_multipart_ok(mt: MediaType, part_types: tuple[str, ...]) -> bool:
    if mt.mime in ("*/*", "multipart/*"):
        return True
    if mt.mime != "multipart/related":
        return False
    t = mt.type_param
    return t is None or t in part_types or t in ("*/*", "application/*")


def choose_instance_media(accept: list[MediaType]) -> InstanceChoice:
    """Negotiate ``multipart/related; type="application/dicom"`` (and its transfer-syntax)."""
    for mt in accept:
        if _is_multipart_ok(mt, (DICOM,)) or mt.mime == DICOM:
            ts = mt.params.get("transfer-syntax")
            if ts in (None, "", "*"):
                return InstanceChoice(None)
            if ts == ExplicitVRLittleEndian:
                return InstanceChoice(ExplicitVRLittleEndian)
            return InstanceChoice(ts)  # honoured when instances are stored in it
    raise NotAcceptable('Accept: the gateway sends multipart/related; type="application/dicom"')


def convert(data: bytes, choice: InstanceChoice) -> bytes:
    """The instance as the client asked for it (re-encoding only uncompressed data)."""
    if choice.transfer_syntax is None:
        return data
    ds = dcmread(BytesIO(data))
    stored = str(ds.file_meta.TransferSyntaxUID)
    if stored == choice.transfer_syntax:
        return data
    if choice.transfer_syntax == ExplicitVRLittleEndian and stored in UNCOMPRESSED_TS:
        out = BytesIO()
        ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
        return out.getvalue()
    raise NotAcceptable(f"transfer-syntax {choice.transfer_syntax}: the instance is stored as {stored} "
                        "and the gateway does not transcode compressed data; ask for transfer-syntax=*")


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


def choose_frame_media(accept: list[MediaType], ts: str) -> tuple[str, str, bool]:
    """(part media type, transfer syntax to announce, single part?) for frames stored in ``ts``.

    Uncompressed frames go out as application/octet-stream (Explicit VR Little Endian); compressed
    ones as stored, under their image media type, or as octet-stream when the client says
    ``transfer-syntax=*`` (or names the stored syntax). The gateway does not decompress.
    """
    native = ts in UNCOMPRESSED_TS
    if native:
        ts = ExplicitVRLittleEndian
    part = OCTET if native else FRAME_MEDIA.get(ts, OCTET)
    for mt in accept:
        want = mt.params.get("transfer-syntax")
        if mt.mime == "*/*":
            return part, ts, False
        if mt.mime in ("multipart/related", "multipart/*"):
            t = mt.type_param
            if native and t in (None, "*/*", OCTET) and want in (None, "", "*", ts):
                return OCTET, ts, False
            if not native and t in (None, "*/*", part) and want in (None, "", "*", ts):
                return part, ts, False
            if not native and t == OCTET and want in ("*", ts):
                return OCTET, ts, False
        elif mt.mime == OCTET and want in ((None, "", "*", ts) if native else ("*", ts)):
            return OCTET, ts, True
        elif not native and mt.mime == part and want in (None, "", "*", ts):
            return part, ts, True
    raise NotAcceptable(f'Accept: frames are available as multipart/related; type="{part}"; '
                        f"transfer-syntax={ts} (or transfer-syntax=*)")


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
