"""De-identification throughput and residual identifying values, side by side.

    python tools/bench/deid.py [--slices 200] [--size 512] [--repeat 3] [--no-corpus] [--keep DIR]

1. In process, on one synthetic CT study (omi_dsf.testkit.phantom, realistic fake identity),
   written once; each tool reads every file, de-identifies it and writes it out:
     baseline   plain pydicom read + write (no de-identification): the I/O floor
     ours       omi_dsf StudyPseudonymizer (PS3.15 E.1-1 + options, UID remap, site store, leak check)
     dicognito  dicognito.Anonymizer, if installed
     deid       pydicom/deid default recipe, if installed (first round only: slow)
2. The command line, process start included, on the same study: `python -m omi_dsf deid` against
   `python -m dicognito` (its console script is broken in 0.19.0).
3. A corpus: every DICOM candidate file pydicom, pydicom-data and deid-data ship (installed from
   PyPI here when missing), each de-identified on its own by ours (in process) and dicognito:
   files in, written, refused by reason, residual identifying values found by an independent
   scanner (below), images written that may show burned-in text.

Rounds interleave the tools so that load from other jobs on this shared machine hits them alike;
each figure is the median of the rounds; the load average is recorded before and after.

Residuals, synthetic study: our leak check's `find_leaks` with the original's identity.
Residuals, corpus: an independent scanner that shares no code with the leak check: the values of
the original's identifying attributes (names and their parts, IDs, accession number, birth date,
institution, station name, original UIDs except the standard's own 1.2.840.10008.*) searched in
every element of each written file: text as tokens (regex word boundaries, ignoring case), UIDs
by equality, undecoded bytes as substrings; not in pixel data, coded values (CS) or the
equipment's names (Manufacturer, model, software versions), which hold no patient's value and
where words like "Here" (an institution) or "Perfusion" (a name part) are not one.

Last line: one JSON object with figures, targets and "met". Targets (issue 5 and 15): ours at least
2x dicognito in process and through the CLI, zero residual values for ours (synthetic study and
corpus).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[2]
# this file is named deid.py: keep its folder off the path so `import deid` finds the package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from omi_dsf.deid.identity import Identity  # noqa: E402
from omi_dsf.deid.instance_io import FolderSink, FolderSource  # noqa: E402
from omi_dsf.deid.leakcheck import burned_in_problem, find_leaks  # noqa: E402
from omi_dsf.deid.pipeline import StudyPseudonymizer  # noqa: E402
from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider  # noqa: E402
from omi_dsf.deid.refusal import Refused  # noqa: E402
from omi_dsf.deid.store import SiteStore  # noqa: E402
from omi_dsf.testkit.phantom import write_ct_study  # noqa: E402

KEY = b"benchmark-key-not-a-secret-0123456789"
OPTIONS = ["retain-modified-dates", "retain-patient-characteristics"]
TARGET_VS_DICOGNITO = 2.0
CORPUS_PACKAGES = {"data_store": "pydicom-data==1.0.0", "deid_data": "deid-data==0.0.20"}
_NOT_DICOM_SUFFIXES = {".py", ".pyc", ".md", ".txt", ".json", ".dump", ".icc", ".gz", ".zip"}


# -- 1. in process ---------------------------------------------------------------------------------
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
        store.flush()           # as the command does: the UID map written before each file
        sink.write(out_.dataset, out_.data)
    store.sync()
    sink.close()     # every file complete, as the command waits for it
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


# -- 2. command line -------------------------------------------------------------------------------
def cli_ours(in_dir: Path, out: Path, key_file: Path, store: Path) -> None:
    cmd = [sys.executable, "-m", "omi_dsf", "deid", str(in_dir), str(out), "--domain", "bench",
           "--key-file", str(key_file), "--store", str(store)]
    for o in OPTIONS:
        cmd += ["--option", o]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)


def cli_dicognito(in_dir: Path, out: Path) -> None:
    importlib.import_module("dicognito")  # ImportError when not installed
    subprocess.run([sys.executable, "-m", "dicognito", "--quiet", "--seed", "bench",
                    "--output-directory", str(out), str(in_dir)], check=True, capture_output=True)


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


def interleaved(tools: dict, work: Path, rounds: int, first_round_only=()) -> tuple[dict, dict]:
    """Run every tool once per round, in turn; (name -> [(wall, cpu, out)], name -> why missing)."""
    runs: dict[str, list] = {}
    missing: dict[str, str] = {}
    for rnd in range(max(1, rounds)):
        for name, fn in tools.items():
            if name in missing or (name in first_round_only and rnd > 0):
                continue
            out = work / f"out-{name}-{rnd}"
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                fn(out, rnd)
            except ImportError as exc:
                missing[name] = f"not installed ({exc.name})"
                continue
            runs.setdefault(name, []).append((time.perf_counter() - wall, time.process_time() - cpu, out))
    return runs, missing


def figures(runs: list, n: int, mb: float, identity: Identity | None, cpu: bool = True) -> dict:
    wall = statistics.median(r[0] for r in runs)
    fig = {"available": True, "rounds": len(runs), "seconds_median": round(wall, 3),
           "seconds_all": [round(r[0], 3) for r in runs],
           "instances_per_s": round(n / wall, 1), "mb_per_s": round(mb / wall, 1)}
    if cpu:
        cpu_s = statistics.median(r[1] for r in runs)
        fig["cpu_seconds_median"] = round(cpu_s, 3)
        fig["instances_per_cpu_s"] = round(n / cpu_s, 1) if cpu_s > 0 else None
    if identity is not None:
        fig["residual_values"], fig["files_with_residuals"] = residuals(runs[-1][2], identity)
    return fig


# -- 3. corpus -------------------------------------------------------------------------------------
def corpus_files() -> tuple[list[Path], dict]:
    """Every DICOM candidate in pydicom's test files, pydicom-data and deid-data."""
    versions = {"pydicom": pydicom.__version__}
    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    for module, requirement in CORPUS_PACKAGES.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            requirement], check=True)
            importlib.invalidate_caches()
            mod = importlib.import_module(module)
        versions[requirement.split("==")[0]] = requirement.split("==")[1]
        roots.append(Path(mod.__file__).parent / "data")
    files = sorted(p for root in roots for p in root.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts and p.suffix.lower() not in _NOT_DICOM_SUFFIXES)
    return files, versions


_NAME_KWS = ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
             "PatientMotherBirthName", "OtherPatientNames", "NameOfPhysiciansReadingStudy")
_VALUE_KWS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "InstitutionName", "InstitutionAddress",
              "StationName", "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator")
_GENERIC = {"anonymized", "anonymous", "unknown", "none", "null", "test", "patient", "name", "physician"}


def needles(path: Path) -> dict[str, str]:
    """value (lower case) -> kind: the original's identifying values (independent of omi_dsf)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
    found: dict[str, str] = {}

    def add(value: str, kind: str) -> None:
        value = value.strip(" \x00")
        if len(value) >= 4 and value.lower() not in _GENERIC:
            found.setdefault(value.lower(), kind)

    for elem in ds.iterall():
        kw = elem.keyword
        try:
            value = elem.value
        except Exception:
            continue
        values = list(value) if isinstance(value, (list, tuple)) or getattr(elem, "VM", 1) > 1 else [value]
        if elem.VR == "UI":
            for v in values:
                if str(v) and not str(v).startswith("1.2.840.10008."):
                    add(str(v), "original UID")
        elif kw in _NAME_KWS:
            for v in values:
                add(str(v), kw)
                for part in str(v).replace("=", "^").split("^"):
                    add(part, f"name part of {kw}")
        elif kw in _VALUE_KWS:
            for v in values:
                add(str(v), kw)
        elif kw == "PatientBirthDate":
            for v in values:
                add(str(v), kw)
    return found


_NOT_SCANNED_VRS = {"CS", "SQ", "US", "SS", "UL", "SL", "FL", "FD", "AT", "OF", "OD", "OL", "OV", "SV", "UV"}
_EQUIPMENT = {0x00080070, 0x00081090, 0x00181020}   # Manufacturer, model, software versions


def scan(written: Path, wanted: dict[str, str]) -> Counter:
    """Kinds of the original's values found in the written file's elements (pixel data, coded
    values and the equipment's names excepted): text as tokens (regex word boundaries, ignoring
    case), UIDs by equality, undecoded bytes (OB, UN, private) as substrings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(written, force=True)
        elems = list(ds.file_meta.iterall()) + list(ds.iterall()) if hasattr(ds, "file_meta") else list(ds.iterall())
    texts = {v: k for v, k in wanted.items() if k != "original UID"}
    uids = {v for v, k in wanted.items() if k == "original UID"}
    pattern = re.compile("|".join(rf"\b{re.escape(v)}\b" for v in sorted(texts, key=len, reverse=True)) or "(?!)")
    found: Counter = Counter()
    for elem in elems:
        if elem.tag in (0x7FE00010, 0x7FE00008, 0x7FE00009) or elem.VR in _NOT_SCANNED_VRS or elem.tag in _EQUIPMENT:
            continue
        value = elem.value
        if isinstance(value, (bytes, bytearray)):
            low = bytes(value).decode("latin-1").lower()
            hits = [k for v, k in wanted.items() if v in low]
        else:
            values = list(value) if isinstance(value, (list, tuple)) or getattr(elem, "VM", 1) > 1 else [value]
            hits = []
            for v in values:
                text = str(v).strip(" \x00").lower()
                if elem.VR == "UI":
                    hits += ["original UID"] if text in uids else []
                else:
                    hits += [texts.get(m.group(0), "identifying text") for m in pattern.finditer(text)]
        found.update(hits)
    return found


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker, reason in (("no pixel recipe covers", "burned-in text, no pixel recipe"),
                           ("not a DICOM file", "not a dataset"), ("missing PatientID", "no PatientID"),
                           ("missing StudyInstanceUID", "no StudyInstanceUID/SOPInstanceUID"),
                           ("truncated", "truncated"), ("unreadable", "unreadable"),
                           ("usable image description", "pixels without image description"),
                           ("cannot be decoded", "pixels cannot be decoded"),
                           ("is encapsulated", "no header, compressed pixels")):
        if marker in text:
            return reason
    if "identifying value in" in text:
        return "leak check: " + text.split("(rule: ")[-1].rstrip(")")
    return f"other: {text.split(': ', 1)[-1][:60]}" if isinstance(exc, Refused) else f"error: {type(exc).__name__}"


def corpus_ours(files: list[Path], out: Path) -> dict:
    out.mkdir()
    refused: Counter = Counter()
    written: dict[Path, Path] = {}
    for n, p in enumerate(files):
        store = SiteStore()
        sp = StudyPseudonymizer(key=KEY, domain="bench", provider=EmbeddedProvider(KEY, store), store=store)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = sp.process_encoded(p, p.name)
        except Exception as exc:  # a crash is counted by its type: it is a finding too
            refused[_reason(exc)] += 1
            continue
        finally:
            store.close()
        target = out / f"{n:04d}.dcm"
        target.write_bytes(result.data)
        written[p] = target
    return {"written": written, "refused": refused}


def corpus_dicognito(files: list[Path], out: Path) -> dict:
    from dicognito.anonymizer import Anonymizer
    out.mkdir()
    refused: Counter = Counter()
    written: dict[Path, Path] = {}
    for n, p in enumerate(files):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p, force=True)
                Anonymizer(seed="bench").anonymize(ds)
                target = out / f"{n:04d}.dcm"
                ds.save_as(target)
        except Exception as exc:
            refused[f"error: {type(exc).__name__}"] += 1
            continue
        written[p] = target
    return {"written": written, "refused": refused}


def corpus_section(work: Path) -> dict:
    files, versions = corpus_files()
    wanted = {p: needles(p) for p in files}
    result = {"files_in": len(files), "sources": versions, "tools": {}}
    for name, fn in (("ours", corpus_ours), ("dicognito", corpus_dicognito)):
        t0 = time.perf_counter()
        try:
            run = fn(files, work / f"corpus-{name}")
        except ImportError as exc:
            result["tools"][name] = {"available": False, "why": f"not installed ({exc.name})"}
            continue
        seconds = time.perf_counter() - t0
        kinds: Counter = Counter()
        files_with = 0
        maybe_text = 0
        for original, target in run["written"].items():
            found = scan(target, wanted[original])
            kinds.update(found)
            files_with += bool(found)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                maybe_text += burned_in_problem(pydicom.dcmread(target, stop_before_pixels=False, force=True)) is not None
        result["tools"][name] = {
            "available": True, "seconds": round(seconds, 1), "written": len(run["written"]),
            "refused": sum(run["refused"].values()), "refused_by_reason": dict(run["refused"].most_common()),
            "residual_values": sum(kinds.values()), "files_with_residuals": files_with,
            "residuals_by_kind": dict(kinds.most_common()), "written_pixels_may_show_text": maybe_text}
    return result


def print_corpus(c: dict) -> None:
    print(f"\ncorpus: {c['files_in']} files ({', '.join(f'{k} {v}' for k, v in c['sources'].items())})")
    print(f"{'tool':<10} {'written':>8} {'refused':>8} {'residual values':>16} {'files':>6} {'pixels may show text':>21}")
    for name, t in c["tools"].items():
        if not t["available"]:
            print(f"{name:<10} {t['why']}")
            continue
        print(f"{name:<10} {t['written']:>8} {t['refused']:>8} {t['residual_values']:>16} "
              f"{t['files_with_residuals']:>6} {t['written_pixels_may_show_text']:>21}")
    for name, t in c["tools"].items():
        if t.get("available"):
            print(f"refused by reason ({name}):")
            for reason, n in t["refused_by_reason"].items():
                print(f"  {n:>4}  {reason}")
            if t["residuals_by_kind"]:
                print(f"residuals by kind ({name}): " + ", ".join(f"{k} {v}" for k, v in t["residuals_by_kind"].items()))


# -- main ------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512, help="rows = columns")
    ap.add_argument("--repeat", type=int, default=3,
                    help="interleaved rounds; figures are medians (the machine is shared; deid runs once)")
    ap.add_argument("--no-corpus", action="store_true", help="skip the corpus run")
    ap.add_argument("--keep", type=Path, help="keep the work folder here")
    args = ap.parse_args()

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="omi-bench-deid-"))
    try:
        t0 = time.perf_counter()
        files = write_ct_study(work / "in", slices=args.slices, rows=args.size, cols=args.size, seed=11)
        gen_s = time.perf_counter() - t0
        n = len(files)
        mb = sum(p.stat().st_size for p in files) / 1e6
        identity = Identity()
        for p in files:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            identity.add_dataset(ds)
            identity.add_uids(str(ds[t].value) for t in ("SOPInstanceUID", "StudyInstanceUID",
                                                            "SeriesInstanceUID", "FrameOfReferenceUID"))
        for p in files:  # warm the page cache so that the first tool does not pay for it
            p.read_bytes()
        key_file = work / "site.key"
        key_file.write_bytes(KEY)

        tools = {
            "baseline": lambda o, r: run_baseline(files, o),
            "ours": lambda o, r: run_ours(work / "in", o, work / f"site-{r}.sqlite"),
            "dicognito": lambda o, r: run_dicognito(files, o),
            "deid": lambda o, r: run_deid(files, o),
            "ours_cli": lambda o, r: cli_ours(work / "in", o, key_file, work / f"cli-{r}.sqlite"),
            "dicognito_cli": lambda o, r: cli_dicognito(work / "in", o),
        }
        runs, missing = interleaved(tools, work, args.repeat, first_round_only=("deid",))
        results = {}
        for name in tools:
            if name in missing:
                results[name] = {"available": False, "why": missing[name]}
            else:
                results[name] = figures(runs[name], n, mb, None if name == "baseline" else identity,
                                        cpu=not name.endswith("_cli"))

        base = results["baseline"]["instances_per_s"]
        ours = results["ours"]["instances_per_s"]
        print(f"study: {n} instances, {args.size}x{args.size}, {mb:.1f} MB (generated in {gen_s:.1f} s);"
              f" medians of {args.repeat} interleaved rounds")
        print(f"{'tool':<14} {'inst/s':>8} {'MB/s':>8} {'vs base':>8} {'vs ours':>8} {'inst/cpu-s':>10}"
              f" {'residual attrs':>15} {'files':>6}")
        for name, r in results.items():
            if not r["available"]:
                print(f"{name:<14} {r['why']}")
                continue
            ips = r["instances_per_s"]
            ref = results["ours_cli"] if name.endswith("_cli") and results["ours_cli"]["available"] else results["ours"]
            res = "-" if r.get("residual_values") is None else str(r["residual_values"])
            files_ = "-" if r.get("files_with_residuals") is None else str(r["files_with_residuals"])
            print(f"{name:<14} {ips:>8.1f} {r['mb_per_s']:>8.1f} {ips / base:>8.2f} {ips / ref['instances_per_s']:>8.2f}"
                  f" {r.get('instances_per_cpu_s') or 0:>10.1f} {res:>15} {files_:>6}")

        def ratio(a: str, b: str, key: str = "instances_per_s"):
            ra, rb = results.get(a, {}), results.get(b, {})
            return round(ra[key] / rb[key], 2) if ra.get("available") and rb.get("available") and rb.get(key) else None

        corpus = None if args.no_corpus else corpus_section(work)
        if corpus:
            print_corpus(corpus)
        load_after = os.getloadavg()
        vs_dicognito = ratio("ours", "dicognito")
        vs_dicognito_cli = ratio("ours_cli", "dicognito_cli")
        corpus_ours_residuals = (corpus["tools"]["ours"]["residual_values"] if corpus else None)
        summary = {
            "benchmark": "deid",
            "instances": n, "image": f"{args.size}x{args.size}", "mb": round(mb, 1),
            "options": OPTIONS, "repeat": args.repeat, "statistic": "median",
            "load_avg_1m": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
            "figures": results,
            "ratios": {"ours_vs_baseline": round(ours / base, 2), "ours_vs_dicognito": vs_dicognito,
                       "ours_vs_dicognito_cpu": ratio("ours", "dicognito", "instances_per_cpu_s"),
                       "ours_vs_deid": ratio("ours", "deid"), "ours_cli_vs_dicognito_cli": vs_dicognito_cli},
            "corpus": corpus,
            "targets": {"ours_vs_dicognito_min": TARGET_VS_DICOGNITO,
                        "ours_cli_vs_dicognito_cli_min": TARGET_VS_DICOGNITO,
                        "ours_residual_values_max": 0, "ours_corpus_residual_values_max": 0},
        }
        summary["met"] = bool(vs_dicognito is not None and vs_dicognito >= TARGET_VS_DICOGNITO
                              and vs_dicognito_cli is not None and vs_dicognito_cli >= TARGET_VS_DICOGNITO
                              and results["ours"]["residual_values"] == 0
                              and results["ours_cli"].get("residual_values") == 0
                              and corpus_ours_residuals in (0, None if args.no_corpus else 0))
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        print(json.dumps(summary))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
