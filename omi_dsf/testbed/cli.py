"""`python -m omi_dsf testbed up|status|down|logs`: the multi-site DSF test bed."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "testbed",
        help="a multi-site DSF test bed on 127.0.0.1 (FHIR + BPE per site, PostgreSQL, mTLS)",
        description="Start, inspect and stop a DSF 1.9 or 2.x test bed: a requester DIC and an AI provider "
        "(optionally a second DIC), each with a DSF FHIR and BPE server, one PostgreSQL cluster, a "
        "generated test CA and allow list, and the OMI plugin from dist/ in every BPE.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=argparse.SUPPRESS,
                        help="test bed folder (default: .testbed)")
    p.add_argument("--dir", default=".testbed", help="test bed folder (default: .testbed)")
    act = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    up = act.add_parser("up", parents=[common], help="start everything and wait until the plugin is deployed")
    up.add_argument("--sites", type=int, default=2, help="2 (DIC + AI provider) or 3 (+ a 2nd DIC)")
    add_dsf_home_arguments(up)
    up.add_argument("--base-port", type=int, default=8200,
                    help="site i uses base+20i+1 (FHIR), +2 (BPE), +11/+12 (status); "
                    "PostgreSQL base+99 (default 8200)")
    up.add_argument("--heap", help="JVM -Xmx per server (default: 512m; 1g for a DSF 2.x FHIR server)")
    up.add_argument("--plugin", action="append", type=Path, metavar="JAR",
                    help="plugin jar for every BPE (repeatable; default: dist/*.jar)")
    up.add_argument("--no-plugin", action="store_true", help="start the BPEs without any plugin")
    up.add_argument("--no-fhir-store", action="store_true",
                    help="no FHIR store of its own for a requester DIC (default: one HAPI FHIR server each)")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait (default 600)")
    up.set_defaults(func=_up)

    st = act.add_parser("status", parents=[common], help="what runs where")
    st.set_defaults(func=_status)

    down = act.add_parser("down", parents=[common], help="stop every process the test bed started")
    down.add_argument("--purge", action="store_true", help="also delete the test bed folder")
    down.set_defaults(func=_down)

    lg = act.add_parser("logs", parents=[common], help="tail a server's log")
    lg.add_argument("server", nargs="?", help="postgres, dic-fhir, dic-bpe, dic-store, ai-fhir, ai-bpe, ... "
                    "(or <server>-console); default: all")
    lg.add_argument("-n", "--lines", type=int, default=40)
    lg.add_argument("-f", "--follow", action="store_true")
    lg.set_defaults(func=_logs)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def add_dsf_home_arguments(p: argparse.ArgumentParser) -> None:
    """--dsf-home and --site-dsf-home, shared by `testbed up` and `demo`."""
    p.add_argument("--dsf-home", help="DSF distribution (1.9 or 2.x) with fhir/ and bpe/ for every site "
                   "(default: $DSF_HOME or /opt/dsf-1.9.0); the version is read from it")
    p.add_argument("--site-dsf-home", action="append", default=[], type=_site_home, metavar="SITE=PATH",
                   help="another distribution for one site (repeatable), e.g. ai=/opt/dsf-2.1.0 for a "
                   "1.9 DIC and a 2.1 provider in one federation")


def _site_home(text: str) -> tuple[str, str]:
    site, sep, path = text.partition("=")
    if not sep or not site or not path:
        raise argparse.ArgumentTypeError(f"expected SITE=PATH (e.g. ai=/opt/dsf-2.1.0), not {text!r}")
    return site, path


def _bed(args: argparse.Namespace, **kw):
    from omi_dsf.testbed.bed import TestBed

    return TestBed(Path(args.dir), **kw)


def _up(args: argparse.Namespace) -> int:
    plugins = [] if args.no_plugin else args.plugin
    bed = _bed(args, sites=args.sites, dsf_home=args.dsf_home, base_port=args.base_port,
               heap=args.heap, plugins=plugins, site_dsf_homes=dict(args.site_dsf_home),
               fhir_store=not args.no_fhir_store)
    return bed.up(timeout=args.timeout)


def _status(args: argparse.Namespace) -> int:
    return _bed(args).status()


def _down(args: argparse.Namespace) -> int:
    return _bed(args).down(purge=args.purge)


def _logs(args: argparse.Namespace) -> int:
    files = [str(f) for f in _bed(args).log_path(args.server)]
    cmd = ["tail", "-n", str(args.lines)] + (["-F"] if args.follow else []) + files
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
