"""Datasets ↔ the DICOM JSON model (PS3.18 Annex F), with BulkDataURI for binary values."""

from __future__ import annotations

import json
import logging
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
PIXEL_DATA = 0x7FE00010
_INLINE_LIMIT = 1 << 62  # never turn nested binary values into BulkDataURI


def to_json(ds: Dataset, bulk_base: str | None = None, tags: set[int] | None = None) -> dict:
    """The DICOM JSON object of ``ds``'s top-level attributes (``tags`` restricts them).

    Binary values (and Pixel Data) become ``BulkDataURI`` = ``{bulk_base}/{tag}`` when ``bulk_base``
    is given, so metadata stays small; otherwise they are left out.
    """
    out: dict[str, dict] = {}
    for elem in ds:
        tag = int(elem.tag)
        if tag >> 16 == 0x0002 or tag & 0xFFFF == 0:  # file meta, group lengths
            continue
        if tags is not None and tag not in tags:
            continue
        key = f"{tag:08X}"
        if elem.VR in BULK_VRS or tag == PIXEL_DATA:
            if bulk_base and elem.value is not None and len(elem.value or b""):
                out[key] = {"vr": elem.VR if elem.VR in BULK_VRS else "OW",
                            "BulkDataURI": f"{bulk_base}/{key}"}
            elif elem.value is None or not len(elem.value or b""):
                out[key] = {"vr": elem.VR}
            continue
        try:
            out[key] = elem.to_json_dict(None, _INLINE_LIMIT)
        except Exception as exc:  # an undecodable value must not break the whole answer
            log.debug("attribute %s left out of JSON: %s", key, type(exc).__name__)
    return out


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def from_json(obj: dict) -> Dataset:
    """A dataset from a DICOM JSON object (BulkDataURI values are left empty)."""
    return Dataset.from_json(obj, bulk_data_uri_handler=lambda *_: b"")
