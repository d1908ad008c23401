"""Unit tests: DICOM JSON → Native DICOM Model XML (PS3.19) on pydicom's multi-SOP-class test files."""

from __future__ import annotations

import pydicom
import pytest
from lxml import etree
from pydicom.data import get_testdata_file

from omi_dsf.dicomweb.dicomjson import to_json
from omi_dsf.dicomweb.dicomxml import NAMESPACE, to_xml

NS = {"d": NAMESPACE}
PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


def _count(obj: dict) -> int:
    """Attributes in a JSON object, nested items included."""
    return sum(1 + sum(_count(item or {}) for item in a.get("Value", []) if a.get("vr") == "SQ")
               for a in obj.values())


@pytest.mark.parametrize("name", ["test-SR.dcm", "rtplan.dcm", "waveform_ecg.dcm", "liver_1frame.dcm",
                                  "examples_palette.dcm", "nested_priv_SQ.dcm", "CT_small.dcm"])
def test_every_attribute_nested_items_too(name):
    obj = to_json(pydicom.dcmread(get_testdata_file(name)), "http://gw/bulk")
    root = etree.fromstring(to_xml(obj), PARSER)
    assert len(root.findall(".//d:DicomAttribute", NS)) == _count(obj)
    for key, attr in obj.items():
        node = root.find(f"d:DicomAttribute[@tag='{key}']", NS)
        assert node.get("vr") == attr["vr"]
        if "BulkDataURI" in attr:
            assert node.find("d:BulkData", NS).get("uri") == attr["BulkDataURI"]
        elif attr["vr"] not in ("SQ", "PN"):
            assert [v.text for v in node.findall("d:Value", NS)] == \
                [None if v is None else str(v) for v in attr.get("Value", [])]


def test_person_names_private_creators_and_odd_characters():
    obj = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John^^Dr", "Ideographic": "山田^太郎"}]},
           "00091010": {"vr": "LO", "Value": ["x\x01y"]}, "00090010": {"vr": "LO", "Value": ["ACME 1.0"]}}
    root = etree.fromstring(to_xml(obj), PARSER)
    pn = root.find("d:DicomAttribute[@tag='00100010']/d:PersonName[@number='1']", NS)
    assert [(e.tag.split("}")[1], e.text) for e in pn.find("d:Alphabetic", NS)] == \
        [("FamilyName", "Doe"), ("GivenName", "John"), ("NamePrefix", "Dr")]
    assert pn.find("d:Ideographic/d:FamilyName", NS).text == "山田"
    private = root.find("d:DicomAttribute[@tag='00091010']", NS)
    assert private.get("privateCreator") == "ACME 1.0" and private.find("d:Value", NS).text == "x\ufffdy"
