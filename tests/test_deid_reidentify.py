"""Returned results (SEG/SR referencing pseudonymized UIDs) get the original identity back."""

from __future__ import annotations

import copy

import pytest

from omi_dsf.deid.pipeline import StudyPseudonymizer
from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider
from omi_dsf.deid.reidentify import Reidentifier, ReidentifyError
from omi_dsf.deid.store import SiteStore
from omi_dsf.testkit import synthetic

KEY = b"reid-test-key-0123456789"


@pytest.fixture
def sent(tmp_path):
    store = SiteStore(tmp_path / "site.sqlite")
    provider = EmbeddedProvider(KEY, store)
    originals = [synthetic.ct_instance(i) for i in range(3)]
    sp = StudyPseudonymizer(key=KEY, domain="omi", provider=provider, store=store,
                            options=["retain-modified-dates"])
    out = [sp.process_one(copy.deepcopy(ds), f"i{i}") for i, ds in enumerate(originals)]
    return store, provider, originals, out


def test_seg_references_and_identity_are_restored(sent):
    store, provider, originals, out = sent
    seg = synthetic.returned_seg(out)
    ai_series = seg.SeriesInstanceUID
    Reidentifier(store, provider, "omi").reidentify(seg)
    first = originals[0]
    assert seg.PatientID == first.PatientID and seg.PatientName == first.PatientName
    assert seg.PatientBirthDate == first.PatientBirthDate
    assert seg.AccessionNumber == first.AccessionNumber and seg.StudyDate == first.StudyDate
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == first.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence] == \
        [o.SOPInstanceUID for o in originals]
    srcs = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for f in seg.PerFrameFunctionalGroupsSequence]
    assert srcs == [o.SOPInstanceUID for o in originals]
    ev = seg.CurrentRequestedProcedureEvidenceSequence[0]
    assert ev.StudyInstanceUID == first.StudyInstanceUID
    assert ev.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert seg.SeriesInstanceUID == ai_series  # the AI's own series stays new
    assert seg.PatientIdentityRemoved == "NO" and "DeidentificationMethod" not in seg


def test_reidentify_survives_a_restart(sent, tmp_path):
    store, _, originals, out = sent
    store.close()
    fresh = SiteStore(tmp_path / "site.sqlite")
    seg = synthetic.returned_seg(out)
    Reidentifier(fresh, EmbeddedProvider(KEY, fresh), "omi").reidentify(seg)
    assert seg.StudyInstanceUID == originals[0].StudyInstanceUID


def test_unknown_pseudonym_is_refused(sent):
    store, provider, _, out = sent
    seg = synthetic.returned_seg(out)
    seg.PatientID = "PSN-NOTOURS"
    with pytest.raises(ReidentifyError, match="not a pseudonym of domain 'omi'"):
        Reidentifier(store, provider, "omi").reidentify(seg)


def test_other_domain_cannot_reidentify(sent):
    store, provider, _, out = sent
    seg = synthetic.returned_seg(out)
    with pytest.raises(ReidentifyError):
        Reidentifier(store, provider, "another-domain").reidentify(seg)


def _all_uis(ds, out=None):
    out = [] if out is None else out
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _all_uis(item, out)
        elif elem.VR == "UI" and elem.value:
            out.extend(elem.value if elem.VM > 1 else [elem.value])
    return out


def _pseudonymized_study(tmp_path, seed: int):
    """A 4-slice CT study pseudonymized into a site store: (store, provider, originals, the
    pseudonymized datasets as sent, their pseudonymized UIDs)."""
    import pydicom

    from omi_dsf.testkit.phantom import write_ct_study

    paths = write_ct_study(tmp_path / "ct", slices=4, rows=32, cols=32, seed=seed)
    originals = [pydicom.dcmread(p) for p in paths]
    store = SiteStore(tmp_path / "site.sqlite")
    provider = EmbeddedProvider(KEY, store)
    sp = StudyPseudonymizer(key=KEY, domain="omi", provider=provider, store=store)
    sent = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(sp.process_encoded(p, p.name).data)) for p in paths]
    pseudo_uids = {d[kw].value for d in sent
                   for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}
    return store, provider, originals, sent, pseudo_uids


def test_real_seg_and_sr_are_mapped_back(tmp_path):
    """SEG and TID 1500 SR as the reference AI service builds them (highdicom), made from the
    pseudonymized images: after re-identification no pseudonymized UID is left anywhere."""
    import pydicom

    import numpy as np

    from omi_dsf.testkit.phantom import known_lung_mask
    from omi_dsf.inference.results import Algorithm, build_measurement_report, build_segmentation, result_uids

    store, provider, originals, sent, pseudo_uids = _pseudonymized_study(tmp_path, seed=8)

    algo = Algorithm("lung-seg", "1.0")
    uids = result_uids(sent[0].SeriesInstanceUID, algo)
    mask = known_lung_mask(slices=4, seed=8, rows=32, cols=32)
    labels = np.where(mask, 1, 0).astype(np.uint8)
    labels[:, :, 16:] *= 2                                   # left half: segment 2
    seg = build_segmentation(sent, labels, algo, uids)
    sr = build_measurement_report(sent, seg, (1000.0, 900.0), algo, uids)
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_encode(seg)))
    sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_encode(sr)))
    assert pseudo_uids & set(_all_uis(seg)) and pseudo_uids & set(_all_uis(sr))

    re_id = Reidentifier(store, provider, "omi")
    for obj in (seg, sr):
        re_id.reidentify(obj)
        assert not pseudo_uids & set(_all_uis(obj)), "a pseudonymized UID survived"
        assert obj.PatientID == originals[0].PatientID and obj.PatientName == originals[0].PatientName
        assert obj.StudyInstanceUID == originals[0].StudyInstanceUID
    originals_sop = {o.SOPInstanceUID for o in originals}
    seg_refs = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert seg_refs == originals_sop
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == originals[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == originals[0].FrameOfReferenceUID
    frame_src = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                 for f in seg.PerFrameFunctionalGroupsSequence}
    assert frame_src <= originals_sop
    evidence = {s.ReferencedSOPInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
                for r in e.ReferencedSeriesSequence for s in r.ReferencedSOPSequence}
    assert originals_sop <= evidence and uids.seg_instance in evidence   # the AI's own SEG keeps its UID


def _encode(ds) -> bytes:
    import io
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _real_seg(tmp_path, transfer_syntax=None):
    """A highdicom SEG made from pseudonymized images, as Part 10 bytes (optionally re-encoded)."""
    import pydicom

    import numpy as np

    from omi_dsf.testkit.phantom import known_lung_mask
    from omi_dsf.inference.results import Algorithm, build_segmentation, result_uids

    store, provider, originals, sent, pseudo_uids = _pseudonymized_study(tmp_path, seed=9)
    algo = Algorithm("lung-seg", "1.0")
    labels = np.where(known_lung_mask(slices=4, seed=9, rows=32, cols=32), 1, 0).astype(np.uint8)
    labels[:, :, 16:] *= 2
    seg = build_segmentation(sent, labels, algo, result_uids(sent[0].SeriesInstanceUID, algo))
    if transfer_syntax is not None:
        seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_encode(seg)))
        seg.file_meta.TransferSyntaxUID = transfer_syntax
        buf = pydicom.filebase.DicomBytesIO()
        seg.save_as(buf, implicit_vr=transfer_syntax.is_implicit_VR, little_endian=True)
        return store, provider, originals, pseudo_uids, buf.getvalue()
    return store, provider, originals, pseudo_uids, _encode(seg)


def test_uid_deep_in_per_frame_items_is_mapped_and_untouched_sequences_stay_raw(tmp_path):
    """Read from bytes as the return step does: the source image UID three sequences deep in every
    per-frame item is mapped back, while sequences without any UID element are neither converted
    nor changed, so they are written out byte for byte as they came."""
    import pydicom
    from pydicom.dataelem import RawDataElement

    store, provider, originals, pseudo_uids, data = _real_seg(tmp_path)
    before = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    Reidentifier(store, provider, "omi").reidentify(seg)

    frames = seg.PerFrameFunctionalGroupsSequence
    assert len(frames) == 8
    src = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID for f in frames]
    assert set(src) == {o.SOPInstanceUID for o in originals}
    untouched = (0x00209111, 0x00209113, 0x0062000A)   # frame content, plane position, segment identification
    for f in frames:
        for tag in untouched:
            assert isinstance(f.get_item(tag), RawDataElement)
        assert isinstance(f.DerivationImageSequence[0].get_item(0x00089215), RawDataElement)  # derivation code
    assert isinstance(seg.get_item(0x52009229), RawDataElement)   # shared functional groups

    out = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_encode(seg)))
    assert out.get_item(0x52009229).value == before.get_item(0x52009229).value
    for f_out, f_in in zip(out.PerFrameFunctionalGroupsSequence, before.PerFrameFunctionalGroupsSequence):
        for tag in untouched:
            assert f_out.get_item(tag).value == f_in.get_item(tag).value
    assert not pseudo_uids & set(_all_uis(out)), "a pseudonymized UID survived"


def test_implicit_vr_seg_is_mapped_back_everywhere(tmp_path):
    """Implicit VR names no VR in the bytes: every sequence is looked into."""
    import pydicom
    from pydicom.uid import ImplicitVRLittleEndian

    store, provider, originals, pseudo_uids, data = _real_seg(tmp_path, ImplicitVRLittleEndian)
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    assert seg.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert pseudo_uids & set(_all_uis(seg))
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    Reidentifier(store, provider, "omi").reidentify(seg)
    assert not pseudo_uids & set(_all_uis(seg)), "a pseudonymized UID survived"
    assert seg.StudyInstanceUID == originals[0].StudyInstanceUID


def test_uid_in_an_undefined_length_un_inside_an_explicit_sequence_is_mapped(sent):
    """An undefined-length UN element is read as an implicit VR sequence: the explicit VR
    sequence around it spells "UN" but not "UI", and must still be looked into."""
    import io

    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.tag import Tag

    store, provider, originals, out = sent
    seg = synthetic.returned_seg(out)
    inner = pydicom.Dataset()
    inner.ReferencedSOPInstanceUID = out[1].SOPInstanceUID
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, inner)
    items = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + buf.getvalue() + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    holder = pydicom.Dataset()
    holder.add_new(0x00090010, "LO", "OMI TEST")
    holder._dict[Tag(0x00091001)] = RawDataElement(Tag(0x00091001), "UN", 0xFFFFFFFF, items, 0, False, True)
    seg.ContributingEquipmentSequence = [holder]
    data = io.BytesIO()
    seg.save_as(data, implicit_vr=False, little_endian=True)
    back = pydicom.dcmread(io.BytesIO(data.getvalue()), force=True)
    raw = back.get_item(0x0018A001)   # contributing equipment
    assert b"UN" in raw.value and b"UI" not in raw.value
    Reidentifier(store, provider, "omi").reidentify(back)
    assert back.ContributingEquipmentSequence[0][0x00091001].value[0].ReferencedSOPInstanceUID == \
        originals[1].SOPInstanceUID
