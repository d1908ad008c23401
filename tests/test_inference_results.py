"""Result objects: DICOM SEG and SR TID 1500 referencing the source, FHIR per the MII imaging module."""

from __future__ import annotations

from io import BytesIO

import highdicom as hd
import numpy as np
import pydicom
import pytest

from omi_dsf.inference import lungseg, results


from omi_dsf.testkit import phantom

ALGO = results.Algorithm("lung-seg", "1.0.0")
MII = results.MII


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    paths = phantom.write_ct_study(tmp_path_factory.mktemp("ct"), slices=6, rows=64, cols=64, seed=5)
    source = [pydicom.dcmread(p) for p in paths]
    labels = lungseg.segment_lungs(phantom.phantom_hu(6, 5, 64, 64))
    volumes = lungseg.volumes_ml(labels, (2.5, 0.7, 0.7))
    uids = results.result_uids(source[0].SeriesInstanceUID, ALGO)
    seg = results.build_segmentation(source, labels, ALGO, uids)
    sr = results.build_measurement_report(source, seg, volumes, ALGO, uids)
    bundle = results.build_fhir_bundle(source[0], volumes, ALGO, uids)
    return source, labels, volumes, uids, seg, sr, bundle


def _reread(ds):
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _texts(group, code_value):
    """TEXT values of the direct children of a measurement group with concept name DCM `code_value`."""
    children = group[0].ContentSequence
    return [i.TextValue for i in children if i.ConceptNameCodeSequence[0].CodeValue == code_value]


def test_uids_are_deterministic_and_distinct(made):
    source, *_, uids, _seg, _sr, _b = made
    assert results.result_uids(source[0].SeriesInstanceUID, ALGO) == uids
    assert results.result_uids(source[0].SeriesInstanceUID, results.Algorithm("lung-seg", "1.0.1")) != uids
    assert len({uids.seg_series, uids.seg_instance, uids.sr_series, uids.sr_instance}) == 4


def test_segmentation_references_source_and_names_algorithm(made):
    source, labels, _v, uids, seg, _sr, _b = made
    seg = hd.seg.Segmentation.from_dataset(_reread(seg))
    assert seg.SOPInstanceUID == uids.seg_instance and seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.PatientID == source[0].PatientID
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    referenced = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for r in s.ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in source}
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Right lung", "Left lung"]
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("lung-seg", "1.0.0")
    assert seg.SoftwareVersions == "1.0.0" and seg.ManufacturerModelName == "lung-seg"
    # the mask survives encoding, slice by slice in source order
    for number in (lungseg.RIGHT, lungseg.LEFT):
        mask = seg.get_pixels_by_source_instance(
            [ds.SOPInstanceUID for ds in source], segment_numbers=[number])[..., 0]
        assert np.array_equal(mask.astype(bool), labels == number)


def test_report_holds_volumes_in_ml_and_algorithm(made):
    source, _l, volumes, uids, seg, sr, _b = made
    sr = hd.sr.Comprehensive3DSR.from_dataset(_reread(sr))
    assert sr.SOPInstanceUID == uids.sr_instance and sr.StudyInstanceUID == source[0].StudyInstanceUID
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    found = {}
    for group in groups:
        (m,) = group.get_measurements()
        assert m.name == hd.sr.CodedConcept("118565006", "SCT", "Volume") and m.unit.value == "ml"
        assert _texts(group, "111001") == ["lung-seg"] and _texts(group, "111003") == ["1.0.0"]  # TID 4019
        assert group.referenced_segment.referenced_sop_instance_uid == uids.seg_instance
        found[group.finding_sites[0].value.value] = m.value
    assert found == {"3341006": pytest.approx(round(volumes[0], 1)), "44029006": pytest.approx(round(volumes[1], 1))}
    evidence = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert uids.seg_instance in evidence and source[0].SOPInstanceUID in evidence


def test_fhir_bundle_follows_mii_imaging_module(made):
    source, _l, volumes, uids, _seg, _sr, bundle = made
    resources = [e["resource"] for e in bundle["entry"]]
    by_type = {}
    for r in resources:
        by_type.setdefault(r["resourceType"], []).append(r)
    assert sorted(by_type) == ["Device", "DiagnosticReport", "Observation", "Provenance"]
    (device,) = by_type["Device"]
    assert device["deviceName"][0]["name"] == "lung-seg" and device["version"][0]["value"] == "1.0.0"
    (report,) = by_type["DiagnosticReport"]
    assert report["meta"]["profile"] == [MII + "mii-pr-bildgebung-radiologischer-befund"]
    codes = {(c["system"], c["code"]) for c in report["category"][0]["coding"]}
    assert {("http://loinc.org", "18748-4"), ("http://snomed.info/sct", "4201000179104"),
            ("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD")} == codes
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{source[0].StudyInstanceUID}"
    assert "lung-seg 1.0.0" in report["conclusion"]
    assert len(report["result"]) == 3
    values = {}
    for obs in by_type["Observation"]:
        assert obs["meta"]["profile"] == [MII + "mii-pr-bildgebung-radiologische-messung"]
        assert obs["valueQuantity"]["system"] == "http://unitsofmeasure.org" and obs["valueQuantity"]["code"] == "mL"
        assert obs["method"]["coding"][0]["system"] == "http://snomed.info/sct"
        assert obs["device"]["display"] == "lung-seg 1.0.0"
        assert {e["url"]: e["valueId"] for e in obs["extension"]} == {
            MII + "mii-ex-bildgebung-series-uid": uids.sr_series,
            MII + "mii-ex-bildgebung-sop-instanz-uid": uids.sr_instance}
        values[obs["bodySite"]["coding"][0]["code"]] = obs["valueQuantity"]["value"]
    right, left = (round(v, 1) for v in volumes)
    assert values == {"3341006": right, "44029006": left, "39607008": pytest.approx(right + left)}
    (prov,) = by_type["Provenance"]
    assert prov["agent"][0]["who"]["reference"] == bundle["entry"][0]["fullUrl"]
    # every internal reference resolves inside the bundle
    urls = {e["fullUrl"] for e in bundle["entry"]}
    assert {r["reference"] for r in report["result"]} <= urls


def test_fhir_can_be_made_again_from_the_sr_alone(made):
    source, _l, volumes, uids, _seg, sr, bundle = made
    # e.g. at the requester after re-identification: the SR header then carries the local patient
    reread = _reread(sr)
    reread.PatientID = "LOCAL-42"
    algorithm, got_volumes, got_uids = results.read_measurement_report(reread)
    assert algorithm == ALGO and got_uids == uids
    assert got_volumes == pytest.approx(tuple(round(v, 1) for v in volumes))
    again = results.fhir_bundle_from_report(reread)
    observations = [e["resource"] for e in again["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert {o["subject"]["identifier"]["value"] for o in observations} == {"LOCAL-42"}
    assert [o["valueQuantity"] for o in observations] == [
        e["resource"]["valueQuantity"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    not_a_report = _reread(sr)
    del not_a_report.ContentSequence[-1]  # drop the imaging measurements
    with pytest.raises(ValueError, match="not a lung volume report"):
        results.read_measurement_report(not_a_report)


def test_label_slices_must_match_sources(made):
    source, labels, _v, uids, *_ = made
    with pytest.raises(ValueError, match="5 label slices for 6 source images"):
        results.build_segmentation(source, labels[:5], ALGO, uids)


@pytest.mark.parametrize("size", [64, 30])  # 30x30: frames of 900 bits, not whole bytes
def test_prepared_segmentation_equals_highdicoms_own(tmp_path, size):
    """The SEG made before the mask is known and filled afterwards holds the same frames as
    highdicom makes from the mask, and its bytes read back as that mask."""
    paths = phantom.write_ct_study(tmp_path, slices=5, rows=size, cols=size, seed=8)
    source = [pydicom.dcmread(p) for p in paths][::-1]  # any order: frames follow `source`
    labels = lungseg.segment_lungs(np.stack([phantom.phantom_hu(5, 8, size, size)[int(ds.InstanceNumber) - 1]
                                             for ds in source]))
    assert set(np.unique(labels)) == {0, lungseg.RIGHT, lungseg.LEFT}
    uids = results.result_uids(source[0].SeriesInstanceUID, ALGO)
    direct = results._segmentation(source, labels, ALGO, uids)
    seg, blob = results.prepare_segmentation(source, ALGO, uids).fill(labels)
    packed = (int(direct.NumberOfFrames) * size * size + 7) // 8
    assert seg.PixelData[:packed] == direct.PixelData[:packed]  # the padding byte may differ: ours is 0
    assert np.array_equal(seg.pixel_array, direct.pixel_array)
    reread = hd.seg.Segmentation.from_dataset(pydicom.dcmread(BytesIO(blob)))
    mask = reread.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in source], combine_segments=True)
    assert np.array_equal(mask, labels)
    with pytest.raises(ValueError, match="label slices of 16x16 for images of"):
        results.prepare_segmentation(source, ALGO, uids).fill(np.zeros((5, 16, 16), np.uint8))


def test_a_seg_whose_frames_cannot_be_told_is_made_whole_from_the_mask(made, seg_without_derivation):
    source, labels, _v, uids, *_ = made
    real = seg_without_derivation
    prepared = results.prepare_segmentation(source, ALGO, uids)
    assert not isinstance(prepared, results.PreparedSegmentation)
    seg, blob = prepared.fill(labels)
    assert seg.PixelData == real(source, labels, ALGO, uids).PixelData  # the mask, as highdicom packs it
    assert pydicom.dcmread(BytesIO(blob)).SOPInstanceUID == uids.seg_instance
    with pytest.raises(ValueError, match="5 label slices for 6 source images"):
        prepared.fill(labels[:5])


def test_seg_and_sr_from_instances_read_with_their_pixels_left_in_the_bytes_are_the_same(made):
    """The infer step reads instances with their Pixel Data left in the WADO-RS part (`read_instance`):
    its SEG and SR are byte for byte those made from instances read whole (but for what differs
    each time they are made), and making them loads no Pixel Data."""
    from omi_dsf.inference.volume import PIXEL_DATA, read_instance

    source, labels, volumes, uids, *_ = made
    parts = [results.to_part10(ds) for ds in source]
    whole = [pydicom.dcmread(BytesIO(part)) for part in parts]
    light = [read_instance(part, defer_bytes=1024) for part in parts]   # (64x64 slices: 8 KB)

    def made_from(datasets):
        seg, seg_blob = results.prepare_segmentation(datasets, ALGO, uids).fill(labels)
        sr = results.build_measurement_report(datasets, seg, volumes, ALGO, uids)
        return [_timeless(seg_blob), _timeless(results.to_part10(sr))]

    assert made_from(light) == made_from(whole)
    assert all(ds.get_item(PIXEL_DATA, keep_deferred=True).value is None for ds in light)


def _timeless(part10: bytes) -> bytes:
    """The object with what differs each time it is made blanked: dates and times (creation, content,
    contribution) and the SEG's Dimension Organization UID (highdicom draws a new one)."""
    ds = pydicom.dcmread(BytesIO(part10))
    for elem in ds.iterall():
        if elem.VR in ("DA", "TM", "DT") or elem.tag == 0x00209164:
            elem.value = ""
    return results.to_part10(ds)


@pytest.mark.parametrize("volumes", [(1523.45, 1400.04), (0.0, 3.0), (12.0, 1e-3)])
def test_prepared_report_equals_the_one_made_with_the_volumes(made, volumes):
    """The SR made before the volumes are known (while the model runs) and filled in afterwards is
    byte for byte the one made with them (but for its dates and times), its volumes read back."""
    source, _labels, _v, uids, seg, *_ = made
    prepared = results.prepare_measurement_report(source, seg, ALGO, uids)
    sr, blob = prepared.fill(volumes)
    direct = results.to_part10(results.build_measurement_report(source, seg, volumes, ALGO, uids))
    assert _timeless(blob) == _timeless(direct)
    assert results.read_measurement_report(pydicom.dcmread(BytesIO(blob)))[1] == tuple(round(v, 1) for v in volumes)
    with pytest.raises(ValueError, match="1 volumes for 2 lungs"):
        prepared.fill(volumes[:1])
