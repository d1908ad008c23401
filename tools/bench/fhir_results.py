"""The return step's FHIR write and the consent lookup: a folder vs the DIC's FHIR store (HAPI FHIR JPA).

Side by side, interleaved, in one run: writing one result (DiagnosticReport, 3 Observations, Device,
Provenance; for the store also Patient, the study's ImagingStudy and the Endpoint, as one conditional
transaction) to a folder and to the store, for new studies and for retries of a written one; and
reading one patient's MII consents from a folder and from the store. Medians over --rounds.
Target: a result written to the store in under 2 s (median), a consent read in under 0.5 s.

    python tools/bench/fhir_results.py [--rounds N] [--dir DIR]

Starts its own store in DIR (default: a temporary folder) and stops it afterwards.
Last line: one JSON object with the figures, the targets and "met".
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from omi_dsf.consent.sources import from_fhir_server, from_folder  # noqa: E402
from omi_dsf.demo import PATIENT_SYSTEM, broad_consent, load_consent  # noqa: E402
from omi_dsf.fhirstore import FhirStore  # noqa: E402
from omi_dsf.inference import lungseg, results  # noqa: E402
from omi_dsf.testkit import phantom  # noqa: E402
from omi_dsf.testkit.procs import free_port  # noqa: E402
from omi_dsf.transfer.config import FhirResultsSettings  # noqa: E402
from omi_dsf.transfer.fhir import write_fhir_result  # noqa: E402

ALGO = results.Algorithm("lung-seg", "1.0.0")
GATEWAY = "https://gw.dic.example.org"


def made(folder: Path, seed: int):
    """One study's SEG and SR (as the return step holds them) and the FHIR bundle from the SR."""
    paths = phantom.write_ct_study(folder / f"ct{seed}", slices=4, rows=32, cols=32, seed=seed)
    source = [pydicom.dcmread(p) for p in paths]
    labels = lungseg.segment_lungs(phantom.phantom_hu(4, seed, 32, 32))
    uids = results.result_uids(source[0].SeriesInstanceUID, ALGO)
    seg = results.build_segmentation(source, labels, ALGO, uids)
    sr = results.build_measurement_report(source, seg, lungseg.volumes_ml(labels, (2.5, 0.7, 0.7)), ALGO, uids)
    datasets = [pydicom.dcmread(io.BytesIO(results.to_part10(d))) for d in (seg, sr)]
    return datasets, results.fhir_bundle_from_report(datasets[1]), str(source[0].PatientID)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    load = os.getloadavg()
    work = Path(args.dir or tempfile.mkdtemp(prefix="omi-bench-fhir-"))
    store = FhirStore(work / "store", port=free_port(), out=log)
    t0 = time.perf_counter()
    st = store.up(timeout=900)
    startup = time.perf_counter() - t0
    try:
        folder_target = FhirResultsSettings(folder=str(work / "results"))
        store_target = FhirResultsSettings(url=st.base_url, patient_identifier_system=PATIENT_SYSTEM)
        consents = work / "consents"
        consents.mkdir(exist_ok=True)
        warm, *cases = [made(work / "studies", 100 + i) for i in range(args.rounds + 1)]
        times: dict[str, list[float]] = {k: [] for k in ("folder_new", "store_new", "folder_retry", "store_retry",
                                                          "consent_folder", "consent_store")}
        with store.client() as c:
            for datasets, bundle, pid in cases:      # each patient's consent, in both places
                (consents / f"{pid}.json").write_text(json.dumps(broad_consent(pid)))
                load_consent(c, pid)
        # warm-up (first requests load HAPI's search and validation caches), not counted
        write_fhir_result(store_target, warm[1], "warm", warm[0], gateway_url=GATEWAY)
        for i, (datasets, bundle, pid) in enumerate(cases):
            pair = [("folder", folder_target), ("store", store_target)]
            if i % 2:
                pair.reverse()                       # interleaved: neither always goes first
            for name, target in pair:
                times[f"{name}_new"].append(timed(lambda: write_fhir_result(
                    target, bundle, f"bk{i}", datasets, gateway_url=GATEWAY)))
            for name, target in pair:
                times[f"{name}_retry"].append(timed(lambda: write_fhir_result(
                    target, bundle, f"bk{i}", datasets, gateway_url=GATEWAY)))
            reads = [("consent_folder", lambda: from_folder(consents, pid)),
                     ("consent_store", lambda: from_fhir_server(st.base_url, PATIENT_SYSTEM, pid))]
            for name, fn in (reads if i % 2 == 0 else reads[::-1]):
                times[name].append(timed(fn))
        with store.client() as c:
            held = {t: c.get(f"/{t}", params={"_summary": "count"}).json()["total"]
                    for t in ("ImagingStudy", "DiagnosticReport", "Observation", "Endpoint", "Device")}
    finally:
        store.down()
    med = {k: round(statistics.median(v), 4) for k, v in times.items()}
    summary = {
        "benchmark": "fhir_results",
        "load_avg_1m_at_start": round(load[0], 2),
        "rounds": args.rounds,
        "store_startup_s": round(startup, 1),
        "median_s": med,
        "store_vs_folder": {"new": round(med["store_new"] / med["folder_new"], 1),
                            "retry": round(med["store_retry"] / med["folder_retry"], 1),
                            "consent": round(med["consent_store"] / med["consent_folder"], 1)},
        "store_holds_after": held,
        "targets": {"store_new_median_s_max": 2.0, "consent_store_median_s_max": 0.5,
                    "no_duplicates": "ImagingStudy == DiagnosticReport == rounds + 1"},
        "met": med["store_new"] < 2.0 and med["consent_store"] < 0.5
               and held["ImagingStudy"] == held["DiagnosticReport"] == args.rounds + 1,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
