"""STOW-RS of metadata and bulk data (PS3.18 10.5.1.2.2): a ``multipart/related;
type="application/dicom+json"`` body whose ``application/dicom+json`` parts hold DICOM JSON
instances (an array, or one object) and whose other parts hold the bulk data they reference by
``BulkDataURI`` (matched against each part's ``Content-Location``). Each instance becomes a Part 10
file, which then goes the way of any ``application/dicom`` part (checked, parsed, stored).

Bulk data parts are ``application/octet-stream`` (native values; Pixel Data in Explicit VR Little
Endian) or, for Pixel Data only, a compressed image media type naming its ``transfer-syntax``
(one part per frame: the parts named by the same Content-Location, in order, are the frames).
"""

from __future__ import annotations

import json
from io import BytesIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian

from .errors import BadRequest
from .multipart import Part, parse_media_type

DICOM_JSON = "application/dicom+json"
CANNOT_UNDERSTAND = 0xC000
PIXEL_DATA = "7FE00010"

Failure = tuple[str, str, int, str]   # SOP Class UID, SOP Instance UID, Failure Reason, why


def _uid(obj: dict, key: str) -> str:
    value = obj.get(key, {}).get("Value") or [""]
    return str(value[0]) if isinstance(value[0], str) else ""


def _objects(part: Part) -> list[dict]:
    try:
        data = json.loads(part.body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"a {DICOM_JSON} part is not JSON ({type(exc).__name__})") from None
    objects = data if isinstance(data, list) else [data]
    if not all(isinstance(o, dict) for o in objects):
        raise BadRequest(f"a {DICOM_JSON} part must hold DICOM JSON objects (an array of them, or one)")
    return objects


def to_part10(parts: list[Part]) -> tuple[list[bytes], list[Failure]]:
    """The instances a metadata-and-bulk-data body describes, as Part 10 files; and those that
    cannot be built (a BulkDataURI without its part, attributes pydicom cannot read)."""
    metadata: list[dict] = []
    bulk: dict[str, list[Part]] = {}
    for part in parts:
        mime = parse_media_type(part.content_type).mime if part.content_type else DICOM_JSON
        if mime == DICOM_JSON:
            metadata += _objects(part)
        else:
            location = part.headers.get("content-location", "")
            if not location:
                raise BadRequest("a bulk data part has no Content-Location (the BulkDataURI it holds)")
            bulk.setdefault(location, []).append(part)
    if not metadata:
        raise BadRequest(f"no {DICOM_JSON} part: nothing describes the instances")
    files: list[bytes] = []
    failed: list[Failure] = []
    for obj in metadata:
        sop_class, sop = _uid(obj, "00080016"), _uid(obj, "00080018")
        try:
            files.append(_instance(obj, bulk))
        except LookupError as exc:
            failed.append((sop_class, sop, CANNOT_UNDERSTAND, str(exc)[:64]))
        except Exception as exc:  # noqa: BLE001 - whatever pydicom makes of untrusted JSON
            failed.append((sop_class, sop, CANNOT_UNDERSTAND, f"metadata cannot be read ({type(exc).__name__})"))
    return files, failed


def _instance(obj: dict, bulk: dict[str, list[Part]]) -> bytes:
    pixel_syntax: list[str] = []
    compressed_frames: list[bytes] = []

    def value(tag: str, vr: str, uri: str) -> bytes:
        found = bulk.get(uri)
        if not found:
            raise LookupError("a BulkDataURI has no part")
        if tag.upper() == PIXEL_DATA:
            media = parse_media_type(found[0].content_type or "application/octet-stream")
            ts = media.params.get("transfer-syntax")
            if ts and UID(ts).is_compressed:
                pixel_syntax.append(ts)
                compressed_frames.extend(p.body for p in found)
                return b""
        return b"".join(p.body for p in found)

    meta = {k: v for k, v in obj.items() if not k.startswith("0002")}
    ds = Dataset.from_json(meta, bulk_data_uri_handler=value)
    ts = UID(pixel_syntax[0]) if pixel_syntax else ExplicitVRLittleEndian
    if compressed_frames:
        ds.PixelData = encapsulate(compressed_frames)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    out = BytesIO()
    ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return out.getvalue()
