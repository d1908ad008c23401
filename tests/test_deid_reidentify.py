"""Returned results (SEG/SR referencing pseudonymized UIDs) get the original identity back."""

from __future__ import annotations

import copy

import pytest

from omi_dsf.deid import synthetic
from omi_dsf.deid.pipeline import StudyPseudonymizer
from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider
from omi_dsf.deid.reidentify import Reidentifier, ReidentifyError
from omi_dsf.deid.store import SiteStore

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
