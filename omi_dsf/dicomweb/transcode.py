"""Transfer syntax conversion of Part 10 instances and frames, for WADO-RS clients that ask for a
syntax the data are not in (both backends' retrieval paths call it).

What the gateway can make (pydicom with pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg,
pylibjpeg-rle, pyjpegls and python-gdcm as its decoders and encoders; imagecodecs for JPEG
Lossless monochrome):

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

import multiprocessing
import os
import struct
import threading
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filewriter import write_file_meta_info
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless)

try:   # libjpeg-turbo's JPEG Lossless decoder (imagecodecs); without it pydicom's plug-ins decode
    import imagecodecs
except ImportError:  # pragma: no cover - a dependency; only an installation without it
    imagecodecs = None

from .errors import NotAcceptable
from .part10 import read_meta

NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian}
LOSSLESS_TARGETS = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
# compressed syntaxes whose decoded monochrome pixels are exactly what was encoded
LOSSLESS_SOURCES = {RLELossless, JPEGLSLossless, JPEG2000Lossless, "1.2.840.10008.1.2.4.57",
                    "1.2.840.10008.1.2.4.70"}
PIXEL_DATA = 0x7FE00010
JPEG_LOSSLESS = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
# pydicom's JPEG Lossless plug-in: GDCM when installed (CPU per 512x512 16-bit CT slice 4.2 ms
# against pylibjpeg-libjpeg's 9 ms; imagecodecs' libjpeg-turbo, used for monochrome, 2.5 ms)
FAST_PLUGIN = {ts: "gdcm" for ts in JPEG_LOSSLESS}


def _available(kind, uid: str) -> bool:
    try:
        return bool(kind(UID(uid)).is_available)
    except (NotImplementedError, ValueError, KeyError):
        return False


def plugin(ts: str) -> str:
    """The decoding plug-in to use for ``ts`` ("" lets pydicom choose)."""
    name = FAST_PLUGIN.get(str(ts), "")
    try:
        return name if name and name in get_decoder(UID(ts)).available_plugins else ""
    except (NotImplementedError, ValueError, KeyError):
        return ""


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
            ds.decompress(decoding_plugin=plugin(stored), generate_instance_uid=False)   # to Explicit VR LE
        if ts in NATIVE:
            return _save(ds, ts), ts
        ds.compress(UID(ts), generate_instance_uid=False)   # lossless only (see LOSSLESS_TARGETS)
        return _save(ds, ts), ts
    except NotAcceptable:
        raise
    except Exception as exc:  # noqa: BLE001 - a decoder that fails on this data, odd pixel attributes
        raise NotAcceptable(f"transfer-syntax {ts}: the instance stored as {stored} could not be converted "
                            f"({type(exc).__name__}); ask for transfer-syntax=*") from None


# (7FE0,0010) OB (or, as some writers have it, OW) of undefined length
_ENCAPSULATED_PIXELS = (b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff", b"\xe0\x7f\x10\x00OW\x00\x00\xff\xff\xff\xff")
_ITEM, _SEQ_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"


def _fragments_end(data: bytes, start: int) -> int | None:
    """Offset just past the sequence delimiter of encapsulated pixel data whose first item is at
    ``start``; None when the items do not end there."""
    pos = start
    while pos + 8 <= len(data):
        tag, length = data[pos:pos + 4], struct.unpack_from("<L", data, pos + 4)[0]
        if tag == _SEQ_END:
            return pos + 8
        if tag != _ITEM or pos + 8 + length > len(data):
            return None
        pos += 8 + length
    return None


def _decoded_frames(head: Dataset, value: bytes, stored: str, data: bytes) -> bytes:
    """Native little endian pixel data of the encapsulated ``value``: JPEG Lossless by imagecodecs
    (libjpeg-turbo), each frame checked against Rows, Columns and BitsAllocated; anything else by
    pydicom's decoder on the whole instance."""
    rows, cols, bits = int(head.Rows), int(head.Columns), int(head.BitsAllocated)
    if stored in JPEG_LOSSLESS and imagecodecs is not None:
        frames = generate_frames(value, number_of_frames=int(head.get("NumberOfFrames", 1) or 1))
        out = []
        for frame in frames:
            arr = imagecodecs.jpeg8_decode(frame)
            if arr.shape != (rows, cols) or arr.dtype.itemsize * 8 != bits:
                raise ValueError("decoded frame does not fit Rows, Columns, BitsAllocated")
            out.append(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        return b"".join(out)
    ds = dcmread(BytesIO(data))
    return bytes(get_decoder(UID(stored)).as_buffer(ds, decoding_plugin=plugin(stored))[0])


def _native_splice(data: bytes, stored: str) -> bytes | None:
    """A compressed single-sample instance (monochrome, palette) in Explicit VR Little Endian,
    built by splicing: the stored file's data set bytes up to Pixel Data (an encapsulated syntax
    encodes its data set in Explicit VR Little Endian), Pixel Data decoded to native, then what
    followed it. Only the header is parsed and nothing is re-encoded (CPU per 512x512 CT slice:
    12 ms by pydicom's decompress and save, 4 ms so; the transcoding benchmark). None when the
    instance is not such a case (then the general path)."""
    if UID(stored) not in LOSSLESS_SOURCES:
        return None
    head = dcmread(BytesIO(data), stop_before_pixels=True)
    if int(head.get("SamplesPerPixel", 1) or 1) != 1 or 0x7FE00000 in head:
        return None
    at = max(data.rfind(header) for header in _ENCAPSULATED_PIXELS)   # the last: not an icon's
    end = _fragments_end(data, at + 12) if at > 0 else None
    if end is None:
        return None
    pixels = _decoded_frames(head, bytes(data[at + 12:end - 8]), stored, data)
    if len(pixels) % 2:
        pixels += b"\x00"
    meta = FileMetaDataset(head.file_meta)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    _, start = read_meta(data)
    out.write(memoryview(data)[start:at])
    out.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, len(pixels)))
    out.write(pixels)
    out.write(memoryview(data)[end:])
    return out.getvalue()


def convert(data: bytes, wanted: list[str]) -> tuple[bytes, str]:
    """A Part 10 instance in the first of ``wanted`` that it is in or can be converted to:
    (bytes, its transfer syntax). :class:`NotAcceptable` when none can."""
    try:
        stored = read_meta(data)[0].transfer_syntax
        ds = None
    except Exception:  # noqa: BLE001 - not what part10 reads: pydicom decides
        ds = dcmread(BytesIO(data))
        stored = str(ds.file_meta.TransferSyntaxUID)
    ts = choose(stored, wanted)
    if ts is None:
        raise NotAcceptable(f"transfer-syntax {', '.join(wanted)[:200]}: the instance is stored as {stored} and "
                            "the gateway cannot convert it to that (it converts to uncompressed and to the lossless "
                            "RLE, JPEG-LS and JPEG 2000 syntaxes; never to lossy ones); ask for transfer-syntax=*")
    if ts == stored:
        return data, stored
    if ts == ExplicitVRLittleEndian and UID(stored).is_compressed:
        try:
            spliced = _native_splice(data, stored)
        except Exception:  # noqa: BLE001 - the general path below decides (and names the failure)
            spliced = None
        if spliced is not None:
            return spliced, ts
    return to_syntax(ds if ds is not None else dcmread(BytesIO(data)), stored, ts)


def native_frames(ds: Dataset, numbers: list[int]) -> list[bytes]:
    """Frames of a compressed instance, decoded to native little endian pixel data."""
    from pydicom.pixels import iter_pixels   # noqa: PLC0415 - only for this path
    wanted = set(numbers)
    found: dict[int, bytes] = {}
    try:
        ts = str(ds.file_meta.TransferSyntaxUID)
        for k, arr in enumerate(iter_pixels(ds, decoding_plugin=plugin(ts)), 1):   # colour as RGB
            if k in wanted:
                found[k] = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            if len(found) == len(wanted):
                break
    except Exception as exc:  # noqa: BLE001 - no decoder, corrupt data
        raise NotAcceptable(f"the frames stored as {ds.file_meta.TransferSyntaxUID} cannot be decoded "
                            f"({type(exc).__name__}); ask for transfer-syntax=*") from None
    return [found[k] for k in numbers]


def _convert_in_worker(data: bytes, wanted: list[str]) -> tuple[bytes, str] | tuple[None, str]:
    """:func:`convert` in a worker process; a refusal comes back as (None, its message)."""
    try:
        return convert(data, wanted)
    except NotAcceptable as exc:
        return None, exc.message


def pool_size() -> int:
    """Transcoding processes for the whole gateway: the machine's cores, at most 4."""
    return min(4, os.cpu_count() or 1)


def _decoded_in_threads(data: bytes, wanted: list[str]) -> bool:
    """Whether converting ``data`` is JPEG Lossless decoded by libjpeg-turbo into the spliced
    uncompressed instance (:func:`_native_splice`): the decoder releases the interpreter lock, and
    the rest is a header parse and a few copies, so threads convert it for less CPU than worker
    processes, which must be sent each instance and send back twice its size."""
    if imagecodecs is None or not wanted or wanted[0] != ExplicitVRLittleEndian:
        return False
    try:
        return read_meta(data)[0].transfer_syntax in JPEG_LOSSLESS
    except Exception:  # noqa: BLE001 - not what part10 reads: the general path decides
        return False


class Pool:
    """Worker processes that transcode, so that decoding runs beside the event loop and the
    retrieval thread instead of sharing one interpreter lock with them: instances of one answer
    are converted several at a time and sent in order. JPEG Lossless to uncompressed goes to
    threads instead (:func:`_decoded_in_threads`). Started at the first use; ``size`` 0 or 1
    converts in the calling thread (what a one-core machine gets)."""

    def __init__(self, size: int | None = None):
        self.size = pool_size() if size is None else size
        self._executor: ProcessPoolExecutor | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, data: bytes, wanted: list[str]) -> Future:
        if self.size >= 2 and _decoded_in_threads(data, wanted):
            with self._lock:
                if self._threads is None:
                    self._threads = ThreadPoolExecutor(self.size, thread_name_prefix="transcode")
                return self._threads.submit(_convert_in_worker, data, wanted)
        if self.size < 2:
            done: Future = Future()
            try:
                done.set_result(_convert_in_worker(data, wanted))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                done.set_exception(exc)
            return done
        with self._lock:
            for _ in range(2):
                if self._executor is None:   # forkserver: never fork the gateway's threads
                    self._executor = ProcessPoolExecutor(self.size,
                                                         mp_context=multiprocessing.get_context("forkserver"))
                try:
                    return self._executor.submit(_convert_in_worker, data, wanted)
                except BrokenProcessPool:   # a worker died (killed, out of memory): start afresh
                    self._executor.shutdown(wait=False, cancel_futures=True)
                    self._executor = None
            raise BrokenProcessPool("transcoding workers cannot be started")

    @staticmethod
    def result(outcome: tuple) -> tuple[bytes, str]:
        data, ts = outcome
        if data is None:
            raise NotAcceptable(ts)
        return data, ts

    def close(self) -> None:
        with self._lock:
            if self._threads is not None:
                self._threads.shutdown(wait=False, cancel_futures=True)
                self._threads = None
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
