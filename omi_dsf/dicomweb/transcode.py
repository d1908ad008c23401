"""Transfer syntax conversion of Part 10 instances and frames, for WADO-RS clients that ask for a
syntax the data are not in (both backends' retrieval paths call it).

What the gateway can make (pydicom with pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg,
pylibjpeg-rle and pyjpegls as its decoders and encoders):

* from any syntax it can decode (uncompressed, deflated, big endian, RLE, JPEG baseline/extended/
  lossless, JPEG-LS, JPEG 2000) to Explicit or Implicit VR Little Endian: decompression loses nothing
  more than the source already lost;
* to the lossless compressed syntaxes pydicom can encode: RLE Lossless, JPEG-LS Lossless and
  JPEG 2000 Lossless (from decoded pixels, so a lossy source stays as lossy as it was).

It never encodes a lossy syntax (JPEG baseline, JPEG 2000, JPEG-LS near-lossless): a client that
names one gets the instances already stored in it, and :class:`NotAcceptable` (406) for the others;
so does one that names a syntax the gateway cannot make (JPEG Lossless, whose encoder pydicom lacks).
An instance without pixel data asked for in a compressed syntax is sent in Explicit VR Little Endian.
"""

from __future__ import annotations

from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless)

from .errors import NotAcceptable

NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian}
LOSSLESS_TARGETS = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
PIXEL_DATA = 0x7FE00010


def _available(kind, uid: str) -> bool:
    try:
        return bool(kind(UID(uid)).is_available)
    except (NotImplementedError, ValueError, KeyError):
        return False


def can_decode(ts: str) -> bool:
    return ts in UNCOMPRESSED or _available(get_decoder, ts)


def can_make(ts: str) -> bool:
    """Whether the gateway can write instances in ``ts`` (from anything it can decode)."""
    return ts in NATIVE or (ts in LOSSLESS_TARGETS and _available(get_encoder, ts))


def choose(stored: str, wanted: list[str]) -> str | None:
    """The syntax to send an instance stored in ``stored`` in, given the client's acceptable
    syntaxes in its order of preference ("*": as stored); None when none can be had."""
    for ts in wanted:
        if ts in ("*", stored):
            return stored
        if can_make(ts) and can_decode(stored):
            return ts
    return None


def _save(ds: Dataset, ts: str) -> bytes:
    out = BytesIO()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.save_as(out, implicit_vr=ts == ImplicitVRLittleEndian, little_endian=True, enforce_file_format=True)
    return out.getvalue()


def to_syntax(ds: Dataset, stored: str, ts: str) -> tuple[bytes, str]:
    """``ds`` (read from data in ``stored``) written in ``ts``; (bytes, the syntax written)."""
    try:
        if PIXEL_DATA not in ds:
            return _save(ds, ts if ts in NATIVE else ExplicitVRLittleEndian), ts if ts in NATIVE else ExplicitVRLittleEndian
        if UID(stored).is_compressed:
            ds.decompress()    # to Explicit VR Little Endian, pixel data native
        if ts in NATIVE:
            return _save(ds, ts), ts
        ds.compress(UID(ts), generate_instance_uid=False)   # lossless only (see LOSSLESS_TARGETS)
        return _save(ds, ts), ts
    except NotAcceptable:
        raise
    except Exception as exc:  # noqa: BLE001 - a decoder that fails on this data, odd pixel attributes
        raise NotAcceptable(f"transfer-syntax {ts}: the instance stored as {stored} could not be converted "
                            f"({type(exc).__name__}); ask for transfer-syntax=*") from None


def convert(data: bytes, wanted: list[str]) -> tuple[bytes, str]:
    """A Part 10 instance in the first of ``wanted`` that it is in or can be converted to:
    (bytes, its transfer syntax). :class:`NotAcceptable` when none can."""
    ds = dcmread(BytesIO(data))
    stored = str(ds.file_meta.TransferSyntaxUID)
    ts = choose(stored, wanted)
    if ts is None:
        raise NotAcceptable(f"transfer-syntax {', '.join(wanted)[:200]}: the instance is stored as {stored} and "
                            "the gateway cannot convert it to that (it converts to uncompressed and to the lossless "
                            "RLE, JPEG-LS and JPEG 2000 syntaxes; never to lossy ones); ask for transfer-syntax=*")
    if ts == stored:
        return data, stored
    return to_syntax(ds, stored, ts)


def native_frames(ds: Dataset, numbers: list[int]) -> list[bytes]:
    """Frames of a compressed instance, decoded to native little endian pixel data."""
    from pydicom.pixels import iter_pixels   # noqa: PLC0415 - only for this path
    wanted = set(numbers)
    found: dict[int, bytes] = {}
    try:
        for k, arr in enumerate(iter_pixels(ds), 1):   # colour as RGB, like pixel_array
            if k in wanted:
                found[k] = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            if len(found) == len(wanted):
                break
    except Exception as exc:  # noqa: BLE001 - no decoder, corrupt data
        raise NotAcceptable(f"the frames stored as {ds.file_meta.TransferSyntaxUID} cannot be decoded "
                            f"({type(exc).__name__}); ask for transfer-syntax=*") from None
    return [found[k] for k in numbers]
