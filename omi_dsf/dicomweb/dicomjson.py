"""Datasets ↔ the DICOM JSON model (PS3.18 Annex F), with BulkDataURI for binary values."""

from __future__ import annotations

import json
import logging

from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.jsonrep import convert_to_python_number
from pydicom.multival import MultiValue
from pydicom.values import convert_value

log = logging.getLogger(__name__)

BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
PIXEL_DATA = 0x7FE00010
_INLINE_LIMIT = 1 << 62  # never turn nested binary values into BulkDataURI
# VRs whose JSON value is just the decoded value(s): converted straight from the raw element by
# pydicom's own converter, without a DataElement in the dataset (the gateway's STOW index
# conversion of a CT header: 2.3 -> 1.2 ms)
PLAIN_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT",
             "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"}


def _plain(raw: RawDataElement, encodings) -> dict:
    """What DataElement.to_json_dict gives for a raw element of a PLAIN_VRS VR."""
    value = convert_value(raw.VR, raw, encodings)
    values = list(value) if isinstance(value, (list, MultiValue)) else [] if value in (None, "") else [value]
    if not values:
        return {"vr": raw.VR}
    return {"vr": raw.VR, "Value": convert_to_python_number(values, raw.VR)}


def to_json(ds: Dataset, bulk_base: str | None = None, tags: set[int] | None = None) -> dict:
    """The DICOM JSON object of ``ds``'s top-level attributes (``tags`` restricts them).

    Binary values (and Pixel Data) become ``BulkDataURI`` = ``{bulk_base}/{tag}`` when ``bulk_base``
    is given, so metadata stays small; otherwise they are left out.
    """
    out: dict[str, dict] = {}
    encodings = None
    for elem in ds.elements():
        tag = int(elem.tag)
        if tag >> 16 == 0x0002 or tag & 0xFFFF == 0:  # file meta, group lengths
            continue
        if tags is not None and tag not in tags:
            continue
        key = f"{tag:08X}"
        if isinstance(elem, RawDataElement) and elem.VR in PLAIN_VRS and elem.value is not None:
            if encodings is None:
                encodings = ds.original_character_set or ds._character_set
            try:
                out[key] = _plain(elem, default_encoding if tag == 0x00080005 else encodings)
                continue
            except Exception:  # pydicom's own path below decides (warning, UN, or left out)
                pass
        if isinstance(elem, RawDataElement):
            try:
                elem = ds[tag]
            except Exception as exc:
                log.debug("attribute %s left out of JSON: %s", key, type(exc).__name__)
                continue
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
