"""`build` and `validate` commands."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omi_dsf.spec.model import SpecError


def register(sub) -> None:
    p = sub.add_parser("build", help="spec → BPMN + FHIR resources → validated DSF plugin jar in dist/")
    p.add_argument("--spec", type=Path, help="spec file (default: omi_dsf/spec/omi.yaml)")
    p.add_argument("--check", action="store_true", help="only check that bpmn/ and fhir_profiles/ match the spec")
    p.add_argument("--no-package", action="store_true", help="render and validate, but do not run Maven")
    p.add_argument("--skip-java-tests", action="store_true", help="skip the DSF validator tests in the Maven build")
    p.set_defaults(func=_build)

    v = sub.add_parser("validate", help="validate a DSF process plugin folder or jar (ours or any other)")
    v.add_argument("path", type=Path, nargs="+")
    v.set_defaults(func=_validate)


def _build(args) -> int:
    from omi_dsf.generate.build import BuildError, build, check

    try:
        if args.check:
            stale = check(args.spec)
            for line in stale:
                print(line, file=sys.stderr)
            if stale:
                print(f"build --check: {len(stale)} generated file(s) are stale", file=sys.stderr)
                return 1
            print("build --check: bpmn/ and fhir_profiles/ match the spec")
            return 0
        t0 = time.monotonic()
        result = build(args.spec, package=not args.no_package, skip_tests=args.skip_java_tests)
    except (SpecError, BuildError) as exc:
        for line in exc.findings:
            print(line, file=sys.stderr)
        print(f"build failed: {len(exc.findings)} finding(s); nothing was written", file=sys.stderr)
        return 1
    print(f"rendered and validated {result.files} files from {result.spec.source.name}")
    if result.jar:
        print(f"plugin: {result.jar} ({result.jar.stat().st_size} bytes) in {time.monotonic() - t0:.1f}s")
    return 0


def _validate(args) -> int:
    from omi_dsf.validate.plugin import validate_path

    total = 0
    for path in args.path:
        findings = validate_path(path)
        for f in findings:
            print(f.render())
        total += len(findings)
        print(f"{path}: {len(findings)} finding(s)", file=sys.stderr)
    return 1 if total else 0
