"""De-identification throughput and residual identifying values, side by side.

    python tools/bench/deid.py [--slices 200] [--size 512] [--keep DIR]

One synthetic CT study (omi_dsf.inference.phantom, realistic fake identity) is written once;
then each tool reads every file, de-identifies it and writes it out:
  baseline   plain pydicom read + write (no de-identification): the I/O floor
  ours       omi_dsf StudyPseudonymizer (PS3.15 E.1-1 + options, UID remap, site store, leak check)
  dicognito  dicognito.Anonymizer, if installed
  deid       pydicom/deid default recipe, if installed
For every tool's output our leak check's `find_leaks` counts the attributes that still hold an
identifying value of the original (name or name parts, IDs, accession number, birth date,
institution, original UIDs). Last line: one JSON object with figures, targets and "met".
Targets (issue 5): ours at least 2x dicognito's instances/s, and zero residual values for ours.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[2]
# this file is named deid.py: keep its folder off the path so `import deid` finds the package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from omi_dsf.deid.identity import Identity  # noqa: E402
from omi_dsf.deid.instance_io import FolderSink, FolderSource  # noqa: E402
from omi_dsf.deid.leakcheck import find_leaks  # noqa: E402
from omi_dsf.deid.pipeline import StudyPseudonymizer  # noqa: E402
from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider  # noqa: E402
from omi_dsf.deid.store import SiteStore  # noqa: E402
from omi_dsf.inference.phantom import write_ct_study  # noqa: E402

KEY = b"benchmark-key-not-a-secret-0123456789"
OPTIONS = ["retain-modified-dates", "retain-patient-characteristics"]
TARGET_VS_DICOGNITO = 2.0


def run_baseline(files, out: Path) -> None:
    out.mkdir()
    for p in files:
        ds = pydicom.dcmread(p)
        ds.save_as(out / p.name)


def run_ours(in_dir: Path, out: Path, store_path: Path) -> None:
    store = SiteStore(store_path)
    sp = StudyPseudonymizer(key=KEY, domain="bench", provider=EmbeddedProvider(KEY, store),
                            store=store, options=OPTIONS)
    sink = FolderSink(out)
    for out_ in sp.process(FolderSource(in_dir)):
        sink.write(out_.dataset, out_.data)
    store.close()


def run_dicognito(files, out: Path) -> None:
    from dicognito.anonymizer import Anonymizer
    out.mkdir()
    anon = Anonymizer(seed="bench")
    for p in files:
        ds = pydicom.dcmread(p)
        anon.anonymize(ds)
        ds.save_as(out / p.name)


def run_deid(files, out: Path) -> None:
    import logging

    from deid.dicom import replace_identifiers
    logging.getLogger("deid").setLevel(logging.ERROR)
    out.mkdir()
    replace_identifiers(dicom_files=[str(p) for p in files], save=True, output_folder=str(out),
                        overwrite=True, remove_private=True)


def residuals(out: Path, identity: Identity) -> tuple[int, int]:
    """(attributes holding an identifying value, files with at least one)."""
    hits = files = 0
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        n = len(find_leaks(pydicom.dcmread(p), identity))
        hits += n
        files += n > 0
    return hits, files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512, help="rows = columns")
    ap.add_argument("--repeat", type=int, default=3,
                    help="interleaved rounds, each tool's best counts (the machine is shared; deid runs once)")
    ap.add_argument("--keep", type=Path, help="keep the work folder here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="omi-bench-deid-"))
    try:
        t0 = time.perf_counter()
        files = write_ct_study(work / "in", slices=args.slices, rows=args.size, cols=args.size, seed=11)
        gen_s = time.perf_counter() - t0
        mb = sum(p.stat().st_size for p in files) / 1e6
        identity = Identity()
        for p in files:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            identity.add_dataset(ds)
            identity.add_uids(str(ds[t].value) for t in ("SOPInstanceUID", "StudyInstanceUID",
                                                            "SeriesInstanceUID", "FrameOfReferenceUID"))
        for p in files:  # warm the page cache so that the first tool does not pay for it
            p.read_bytes()

        tools = {
            "baseline": lambda o: run_baseline(files, o),
            "ours": lambda o: run_ours(work / "in", o, work / "site.sqlite"),
            "dicognito": lambda o: run_dicognito(files, o),
            "deid": lambda o: run_deid(files, o),
        }
        # Rounds interleave the tools (baseline, ours, dicognito, baseline, ...) so that load from
        # other jobs on this shared machine hits them alike; each tool's best round counts.
        # deid is slow and runs in the first round only.
        results: dict[str, dict] = {}
        best: dict[str, tuple[float, float, Path]] = {}
        missing: dict[str, str] = {}
        for rnd in range(max(1, args.repeat)):
            for name, fn in tools.items():
                if name in missing or (name == "deid" and rnd > 0):
                    continue
                out = work / f"out-{name}-{rnd}"
                wall, cpu = time.perf_counter(), time.process_time()
                try:
                    fn(out)
                except ImportError as exc:
                    missing[name] = f"not installed ({exc.name})"
                    continue
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, cpu, out)
        for name in tools:
            if name in missing:
                results[name] = {"available": False, "why": missing[name]}
                continue
            secs, cpu, out = best[name]
            hits, bad_files = residuals(out, identity) if name != "baseline" else (None, None)
            results[name] = {"available": True, "seconds": round(secs, 3), "cpu_seconds": round(cpu, 3),
                             "instances_per_s": round(len(files) / secs, 1), "mb_per_s": round(mb / secs, 1),
                             "instances_per_cpu_s": round(len(files) / cpu, 1) if cpu > 0 else None,
                             "residual_values": hits, "files_with_residuals": bad_files}

        base = results["baseline"]["instances_per_s"]
        print(f"study: {len(files)} instances, {args.size}x{args.size}, {mb:.1f} MB (generated in {gen_s:.1f} s)")
        print(f"{'tool':<10} {'inst/s':>8} {'MB/s':>8} {'vs base':>8} {'vs ours':>8} {'inst/cpu-s':>10}"
              f" {'residual attrs':>15} {'files':>6}")
        ours = results["ours"]["instances_per_s"]
        for name, r in results.items():
            if not r["available"]:
                print(f"{name:<10} {r['why']}")
                continue
            ips = r["instances_per_s"]
            res = "-" if r["residual_values"] is None else str(r["residual_values"])
            files_ = "-" if r["files_with_residuals"] is None else str(r["files_with_residuals"])
            print(f"{name:<10} {ips:>8.1f} {r['mb_per_s']:>8.1f} {ips / base:>8.2f} {ips / ours:>8.2f}"
                  f" {r['instances_per_cpu_s'] or 0:>10.1f} {res:>15} {files_:>6}")

        dic = results.get("dicognito", {})
        vs_dicognito = round(ours / dic["instances_per_s"], 2) if dic.get("available") else None
        summary = {
            "benchmark": "deid",
            "instances": len(files), "image": f"{args.size}x{args.size}", "mb": round(mb, 1),
            "options": OPTIONS, "repeat": args.repeat,
            "figures": {name: r for name, r in results.items()},
            "ratios": {"ours_vs_baseline": round(ours / base, 2), "ours_vs_dicognito": vs_dicognito,
                       "ours_vs_dicognito_cpu": round(results["ours"]["instances_per_cpu_s"]
                                                      / dic["instances_per_cpu_s"], 2)
                       if dic.get("available") and dic.get("instances_per_cpu_s") else None,
                       "ours_vs_deid": round(ours / results["deid"]["instances_per_s"], 2)
                       if results.get("deid", {}).get("available") else None},
            "targets": {"ours_vs_dicognito_min": TARGET_VS_DICOGNITO, "ours_residual_values_max": 0},
        }
        summary["met"] = bool(vs_dicognito is not None and vs_dicognito >= TARGET_VS_DICOGNITO
                              and results["ours"]["residual_values"] == 0)
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        print(json.dumps(summary))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
