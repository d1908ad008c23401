"""The study's UIDs listed while the first instances are read and de-identified: no instance is
leak-checked, or handed on, before the listing is in, and the outcome is that of listing first."""

from __future__ import annotations

import io

import pydicom
import pytest

from omi_dsf.deid.leakcheck import LeakError
from omi_dsf.deid.pipeline import StudyPseudonymizer
from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider
from omi_dsf.deid.store import SiteStore
from omi_dsf.testkit.phantom import write_ct_study

KEY = b"listing-test-key-0123456789"
UNREAD = "1.2.826.0.1.3680043.8.498.4242424242"   # an instance the listing names and the reading never delivers


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    paths = write_ct_study(tmp_path_factory.mktemp("listing") / "in", slices=4, rows=32, cols=32, seed=9)
    return [p.read_bytes() for p in paths]


def _uids(blobs) -> set[str]:
    found = set()
    for blob in blobs:
        ds = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True)
        found |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    return found


def _naming_unread(blob: bytes, keyword: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(blob))
    setattr(ds, keyword, f"see {UNREAD}")
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _pseudonymizer(options=()) -> StudyPseudonymizer:
    store = SiteStore()
    return StudyPseudonymizer(key=KEY, domain="omi", provider=EmbeddedProvider(KEY, store), store=store,
                              options=list(options))


class LateListing:
    """A listing still under way until the pipeline waits for it; records what had happened then."""

    def __init__(self, uids: set[str], pulled: list, sent: list):
        self.uids, self.pulled, self.sent = uids, pulled, sent
        self.at_result: tuple[int, int] | None = None

    def done(self) -> bool:
        return False

    def result(self) -> set[str]:
        self.at_result = (len(self.pulled), len(self.sent))
        return self.uids


def _run(sp, blobs, listing=None, pulled=None, sent=None):
    pulled = [] if pulled is None else pulled
    sent = [] if sent is None else sent

    def source():
        for n, blob in enumerate(blobs, 1):
            pulled.append(n)
            yield f"instance {n}", blob
    for out in sp.process(source(), listing=listing):
        sent.append(out)
    return sent


def test_nothing_is_checked_or_handed_on_before_the_listing(study):
    pulled, sent = [], []
    listing = LateListing(_uids(study), pulled, sent)
    out = _run(_pseudonymizer(), study, listing, pulled, sent)
    assert listing.at_result == (4, 0)       # all four read and de-identified meanwhile, none yielded
    assert len(out) == 4 and _pseudonymizer().identity.uids == set()
    first = _pseudonymizer()
    first.identity.add_uids(_uids(study))
    assert [o.data for o in _run(first, study)] == [o.data for o in out]   # as if listed first


def test_an_instance_naming_a_uid_only_the_listing_knows_is_refused(study):
    blobs = [_naming_unread(study[0], "Manufacturer")] + study[1:]   # a kept attribute
    listing = LateListing(_uids(study) | {UNREAD}, [], [])
    with pytest.raises(LeakError, match=r"^instance 1 \(SOPInstanceUID 2\.25\.\d+\): identifying value in "
                                        r"Manufacturer \(0008,0070\): original UID") as err:
        _run(_pseudonymizer(), blobs, listing)
    assert UNREAD not in str(err.value)
    # without the listing's UID the same instance passes: what refused it was the listing
    assert len(_run(_pseudonymizer(), blobs, LateListing(_uids(study), [], []))) == 4


def test_an_instance_de_identified_before_the_listing_is_cleaned_as_if_listed_first(study):
    """Clean Descriptors removes every original UID it knows from free text: an instance
    de-identified before the listing came in is de-identified again once its check fails."""
    blobs = [_naming_unread(study[0], "SeriesDescription")] + study[1:]
    first = _pseudonymizer(["clean-descriptors"])
    first.identity.add_uids(_uids(study) | {UNREAD})
    expected = [o.data for o in _run(first, blobs)]
    late = _run(_pseudonymizer(["clean-descriptors"]), blobs, LateListing(_uids(study) | {UNREAD}, [], []))
    assert [o.data for o in late] == expected
    assert UNREAD.encode() not in expected[0]


def test_instances_waiting_for_the_listing_are_bounded(study, monkeypatch):
    sp = _pseudonymizer()
    monkeypatch.setattr(sp, "HOLD_INSTANCES", 2)
    pulled, sent = [], []
    listing = LateListing(_uids(study), pulled, sent)
    assert len(_run(sp, study, listing, pulled, sent)) == 4
    assert listing.at_result == (2, 0)


def test_a_failed_listing_fails_the_study_before_anything_is_handed_on(study):
    class Failed(LateListing):
        def result(self):
            raise FileNotFoundError("the study")
    sent = []
    with pytest.raises(FileNotFoundError):
        _run(_pseudonymizer(), study, Failed(set(), [], sent), sent=sent)
    assert sent == []
