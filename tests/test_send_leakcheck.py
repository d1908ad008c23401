"""The send step's leak check (omi_dsf.transfer.outgoing.collect) on a pseudonymized outbox folder: each
file is parsed once, a hit anywhere in any file (after the pixel data too) stops the send."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from omi_dsf.deid.store import SiteStore
from omi_dsf.steps.settings import step_settings
from omi_dsf.steps.api import StepContext
from omi_dsf.steps.pseudonymize import pseudonymize
from omi_dsf.testkit.phantom import write_ct_study
from omi_dsf.transfer.errors import TransferError
from omi_dsf.transfer.outgoing import collect


@pytest.fixture
def outbox(tmp_path):
    paths = write_ct_study(tmp_path / "pacs" / "study", slices=5, rows=32, cols=32, seed=9)
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    key = tmp_path / "site.key"
    key.write_text("send-leakcheck-key-0123456789")
    cfg = {"domain": "omi-send", "key_file": str(key), "store": str(tmp_path / "site.sqlite"),
           "source": {"kind": "folder", "path": str(tmp_path / "pacs" / "study")},
           "sink": {"kind": "folder", "path": str(tmp_path / "outbox" / "{business_key}")}}
    out = pseudonymize({"study-instance-uid": str(originals[0].StudyInstanceUID)},
                       StepContext(topic="pseudonymize", business_key="bk", site={"pseudonymization": cfg}))
    files = sorted((tmp_path / "outbox" / "bk").glob("*.dcm"))
    return cfg, out["pseudonymized-study-instance-uid"], files, originals


def _collect(cfg, pseudo_uid):
    store = SiteStore(cfg["store"])
    try:
        # the pseudonymize step's pseudonymized-study-location (business key "bk")
        return collect(step_settings({"pseudonymization": cfg}).pseudonymization, store, pseudo_uid,
                       cfg["sink"]["path"].format(business_key="bk"))
    finally:
        store.close()


def _edit(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def test_clean_outbox_passes_whole(outbox):
    cfg, pseudo_uid, files, _ = outbox
    study = _collect(cfg, pseudo_uid)
    assert study.files == files
    assert study.sop_uids == [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    assert study.bytes == sum(f.stat().st_size for f in files)


def test_value_after_the_pixel_data_is_found(outbox):
    cfg, pseudo_uid, files, originals = outbox
    name = str(originals[0].PatientName)

    def plant(ds):
        block = ds.private_block(0x7FE1, "OMI TEST", create=True)   # written after (7FE0,0010)
        block.add_new(0x10, "LO", name)
    _edit(files[2], plant)
    with pytest.raises(TransferError, match=r"instance 3 \(SOPInstanceUID 2\.25\.\d+\): identifying value in private \(7FE1,1010\): PatientName \(rule: ") as err:
        _collect(cfg, pseudo_uid)
    assert name not in str(err.value)


def test_original_uid_of_a_later_instance_is_found_in_an_earlier_one(outbox):
    cfg, pseudo_uid, files, originals = outbox
    later = {str(o.SOPInstanceUID) for o in originals}

    def plant(ds):
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = sorted(later)[-1]     # an original UID, from any instance
        ds.ReferencedImageSequence = Sequence([ref])
    _edit(files[0], plant)
    with pytest.raises(TransferError, match=r"instance 1 \(SOPInstanceUID 2\.25\.\d+\): identifying value in ReferencedImageSequence \(0008,1140\)\[0\]\.ReferencedSOPInstanceUID \(0008,1155\): original UID"):
        _collect(cfg, pseudo_uid)


def test_other_patient_id_and_missing_flags_stop_the_send(outbox):
    cfg, pseudo_uid, files, _ = outbox
    _edit(files[3], lambda ds: setattr(ds, "PatientIdentityRemoved", "NO"))
    with pytest.raises(TransferError, match=r"instance 4 \(SOPInstanceUID 2\.25\.\d+\): PatientIdentityRemoved \(0012,0062\) is not YES"):
        _collect(cfg, pseudo_uid)
    _edit(files[3], lambda ds: setattr(ds, "PatientIdentityRemoved", "YES"))
    _edit(files[1], lambda ds: setattr(ds, "PatientID", "PSN-SOMEONEELSE"))
    with pytest.raises(TransferError, match="instance 2 has another PatientID"):
        _collect(cfg, pseudo_uid)


def test_unreadable_instance_and_other_studies(outbox):
    cfg, pseudo_uid, files, _ = outbox
    # an instance of another study in the same folder is left out, not sent
    _edit(files[4], lambda ds: setattr(ds, "StudyInstanceUID", "2.25.1"))
    assert _collect(cfg, pseudo_uid).files == files[:4]
    files[0].write_bytes(b"not a DICOM file at all")
    with pytest.raises(TransferError, match="unreadable"):
        _collect(cfg, pseudo_uid)


def test_original_uid_inside_a_sequence_stored_as_un_stops_the_send(outbox):
    """What a converter that did not know the tag writes: ReferencedRTPlanSequence as UN, its
    item in implicit VR little endian (PS3.5 6.2.2), holding another instance's original UID."""
    import struct

    from pydicom.dataelem import RawDataElement
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.tag import Tag
    cfg, pseudo_uid, files, originals = outbox
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"
    item.ReferencedSOPInstanceUID = str(originals[4].SOPInstanceUID)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, item)
    value = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(buf.getvalue())) + buf.getvalue()

    def plant(ds):
        ds[0x300C0002] = RawDataElement(Tag(0x300C0002), "UN", len(value), value, 0, False, True)
    _edit(files[1], plant)
    assert pydicom.dcmread(files[1]).get_item(0x300C0002).VR == "UN"
    with pytest.raises(TransferError, match=r"instance 2 \(SOPInstanceUID 2\.25\.\d+\): identifying value in"
                                        r" ReferencedRTPlanSequence \(300C,0002\)\[0\]\.ReferencedSOPInstanceUID"
                                        r" \(0008,1155\): original UID"):
        _collect(cfg, pseudo_uid)
