"""The DICOM JSON model (PS3.18 Annex F) as the Native DICOM Model XML (PS3.19 Annex A), for
WADO-RS metadata asked for as ``multipart/related; type="application/dicom+xml"``.

Built with lxml from the JSON object the gateway already makes (:func:`dicomjson.to_json`), so
both representations carry the same attributes and the same BulkDataURIs.
"""

from __future__ import annotations

import re

from lxml import etree
from pydicom.datadict import keyword_for_tag

NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_PN_PARTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_XML_SPACE = "{http://www.w3.org/XML/1998/namespace}space"
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")   # no XML 1.0 character


def _sub(parent: etree._Element, name: str, **attrs: str) -> etree._Element:
    return etree.SubElement(parent, f"{{{NAMESPACE}}}{name}", attrs)


def _text(value) -> str:
    """A value as XML text; characters XML 1.0 cannot carry become U+FFFD."""
    return _NOT_XML.sub("\ufffd", repr(value) if isinstance(value, float) else str(value))


def _person_name(parent: etree._Element, number: int, value: dict | str) -> None:
    pn = _sub(parent, "PersonName", number=str(number))
    groups = value if isinstance(value, dict) else {"Alphabetic": value}
    for group in ("Alphabetic", "Ideographic", "Phonetic"):
        text = groups.get(group)
        if not text:
            continue
        element = _sub(pn, group)
        for name, part in zip(_PN_PARTS, text.split("^")):
            if part:
                _sub(element, name).text = _text(part)


def _attributes(parent: etree._Element, obj: dict) -> None:
    for key in sorted(obj):
        attr = obj[key]
        tag = int(key, 16)
        vr = attr.get("vr", "UN")
        element = _sub(parent, "DicomAttribute", tag=key.upper(), vr=vr)
        keyword = keyword_for_tag(tag)
        if keyword:
            element.set("keyword", keyword)
        if tag >> 16 & 1:   # private: the creator is the (gggg,00xx) element's value
            creator = obj.get(f"{tag >> 16:04X}00{tag >> 8 & 0xFF:02X}", {}).get("Value")
            if creator and (tag & 0xFFFF) > 0xFF:
                element.set("privateCreator", _text(creator[0]))
        if "BulkDataURI" in attr:
            _sub(element, "BulkData", uri=attr["BulkDataURI"])
        elif "InlineBinary" in attr:
            _sub(element, "InlineBinary").text = attr["InlineBinary"]
        for number, value in enumerate(attr.get("Value", []), 1):
            if vr == "SQ":
                _attributes(_sub(element, "Item", number=str(number)), value or {})
            elif vr == "PN":
                _person_name(element, number, value or "")
            else:
                node = _sub(element, "Value", number=str(number))
                if value is not None:
                    node.text = _text(value)


def to_xml(obj: dict) -> bytes:
    """One instance's DICOM JSON object as a NativeDicomModel document (UTF-8, with declaration)."""
    root = etree.Element(f"{{{NAMESPACE}}}NativeDicomModel", nsmap={None: NAMESPACE})
    root.set(_XML_SPACE, "preserve")
    _attributes(root, obj)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")
