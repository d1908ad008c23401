"""Unit tests of the QIDO engine against a quirky in-memory "PACS" (no servers)."""

from __future__ import annotations

from pydicom.dataset import Dataset

from omi_dsf.dicomweb.attributes import INSTANCE, SERIES, STUDY
from omi_dsf.dicomweb.qido import search
from omi_dsf.dicomweb.query import parse_qido

S1, S2 = "1.2.826.1.1", "1.2.826.1.2"


def _ds(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


class QuirkyPacs:
    """Like a legacy PACS: ignores keys it does not know, leaves out ModalitiesInStudy and the
    NumberOf… attributes, returns one study match per instance (pynetdicom's qrscp does)."""

    trusts_matching = True

    def __init__(self):
        self.series = {S1: [("1.2.826.1.1.1", "CT", 3), ("1.2.826.1.1.2", "SR", 1)], S2: [("1.2.826.1.2.1", "MR", 2)]}
        self.finds: list[tuple[str, dict]] = []
        self.asked: list[tuple[str, dict, set]] = []
        self.summaries = 0

    def find(self, level, match, returns, scope):
        self.finds.append((level, dict(match)))
        self.asked.append((level, dict(match), set(returns)))
        if level == STUDY:
            out = []
            for study, pid in ((S1, "P1"), (S2, "P2")):
                if 0x00100020 in match and match[0x00100020] != pid:
                    continue
                n = sum(k for _, _, k in self.series[study])
                out += [_ds(StudyInstanceUID=study, PatientID=pid, PatientName="Doe^J") for _ in range(n)]
            return out
        if level == SERIES:
            return [_ds(StudyInstanceUID=scope[STUDY], SeriesInstanceUID=uid, Modality=m)
                    for uid, m, _ in self.series[scope[STUDY]]]
        uid, _, n = next(s for s in self.series[scope[STUDY]] if s[0] == scope[SERIES])
        return [_ds(SOPInstanceUID=f"{uid}.{i}", InstanceNumber=i) for i in range(1, n + 1)]

    def study_summary(self, study):
        self.summaries += 1
        series = self.series[study]
        return {0x00080061: sorted({m for _, m, _ in series}), 0x00201206: len(series),
                0x00201208: sum(n for *_, n in series)}

    def series_count(self, study, series):
        return next(n for uid, _, n in self.series[study] if uid == series)


def _v(obj, tag):
    return obj.get(tag, {}).get("Value")


def test_duplicates_merged_and_missing_attributes_computed():
    pacs = QuirkyPacs()
    result = search(pacs, parse_qido([], STUDY), "http://gw", 100)
    assert [_v(s, "0020000D")[0] for s in result.items] == [S1, S2]   # 6 matches → 2 studies
    first = result.items[0]
    assert _v(first, "00080061") == ["CT", "SR"] and _v(first, "00201206") == [2] and _v(first, "00201208") == [4]
    assert _v(first, "00081190") == [f"http://gw/studies/{S1}"]
    assert not result.truncated


def test_computing_can_be_switched_off():
    pacs = QuirkyPacs()
    pacs.compute_missing = False
    first = search(pacs, parse_qido([], STUDY), "http://gw", 100).items[0]
    assert "00080061" not in first and "00201208" not in first and pacs.summaries == 0


def test_modalities_in_study_is_matched_even_though_the_pacs_ignores_it():
    pacs = QuirkyPacs()
    result = search(pacs, parse_qido([("ModalitiesInStudy", "MR")], STUDY), "http://gw", 100)
    assert [_v(s, "0020000D")[0] for s in result.items] == [S2]
    result = search(pacs, parse_qido([("ModalitiesInStudy", "SR")], STUDY), "http://gw", 100)
    assert [_v(s, "0020000D")[0] for s in result.items] == [S1]


def test_summaries_are_computed_only_for_the_page():
    pacs = QuirkyPacs()
    result = search(pacs, parse_qido([("limit", "1"), ("offset", "1")], STUDY), "http://gw", 100)
    assert [_v(s, "0020000D")[0] for s in result.items] == [S2]
    assert pacs.summaries == 1


def test_relational_series_search_walks_down_with_study_attributes():
    pacs = QuirkyPacs()
    result = search(pacs, parse_qido([("PatientID", "P1"), ("Modality", "CT")], SERIES), "http://gw", 100)
    assert len(result.items) == 1
    series = result.items[0]
    assert _v(series, "00100020") == ["P1"] and _v(series, "00201209") == [3]
    assert _v(series, "00081190") == [f"http://gw/studies/{S1}/series/1.2.826.1.1.1"]
    assert pacs.finds[0] == (STUDY, {0x00100020: "P1"})
    assert pacs.finds[1][0] == SERIES and pacs.finds[1][1] == {0x00080060: "CT"}


def test_instances_within_a_study_carry_their_series_and_are_cut_with_a_warning():
    pacs = QuirkyPacs()
    result = search(pacs, parse_qido([], INSTANCE, study_uid=S1), "http://gw", 3)
    assert len(result.items) == 3 and result.truncated
    assert {_v(i, "0020000E")[0] for i in result.items} == {"1.2.826.1.1.1"}
    everything = search(pacs, parse_qido([("limit", "10")], INSTANCE, study_uid=S1), "http://gw", 100)
    assert len(everything.items) == 4 and not everything.truncated


def test_includefield_limits_what_comes_back():
    pacs = QuirkyPacs()
    plain = search(pacs, parse_qido([], STUDY), "http://gw", 100).items[0]
    assert "00100010" in plain  # PatientName is a default return attribute
    q = parse_qido([("includefield", "StudyDescription")], SERIES, study_uid=S1)
    series = search(pacs, q, "http://gw", 100).items[0]
    assert "00100020" not in series  # study attributes are not repeated when the URL fixes the study


def test_includedefaults_false_returns_what_includefield_names_and_the_uids():
    pacs = QuirkyPacs()
    q = parse_qido([("includefield", "InstanceNumber"), ("includedefaults", "false")], INSTANCE, study_uid=S1)
    items = search(pacs, q, "http://gw", 100).items
    assert len(items) == 4
    assert set(items[0]) == {"0020000D", "0020000E", "00080018", "00200013", "00081190"}
    asked = [returns for level, _, returns in pacs.asked if level == INSTANCE]
    assert asked and all(0x00280010 not in r and 0x00080016 not in r for r in asked)   # no Rows, SOPClassUID
    with_defaults = search(pacs, parse_qido([], INSTANCE, study_uid=S1), "http://gw", 100).items[0]
    assert pacs.asked[-1][0] == INSTANCE and {0x00280010, 0x00080016} <= pacs.asked[-1][2]
    assert "00200013" in with_defaults and "00080016" not in items[0]
    study = search(pacs, parse_qido([("includedefaults", "false")], STUDY), "http://gw", 100).items[0]
    assert set(study) == {"0020000D", "00081190"} and pacs.summaries == 0   # nothing computed


def test_the_source_character_set_is_named_and_names_are_decoded():
    class Latin1Pacs(QuirkyPacs):
        def find(self, level, match, returns, scope):
            found = super().find(level, match, returns, scope)
            if level == STUDY:
                for ds in found:
                    ds.SpecificCharacterSet = "ISO_IR 100"
                    ds.PatientName = "M\u00fcller^J\u00fcrgen"
            return found

    study = search(Latin1Pacs(), parse_qido([], STUDY), "http://gw", 100).items[0]
    assert _v(study, "00080005") == ["ISO_IR 100"]
    assert _v(study, "00100010") == [{"Alphabetic": "M\u00fcller^J\u00fcrgen"}]
    plain = search(QuirkyPacs(), parse_qido([], STUDY), "http://gw", 100).items[0]
    assert "00080005" not in plain      # absent in the source: absent in the answer
