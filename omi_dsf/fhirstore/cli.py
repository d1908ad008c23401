"""`python -m omi_dsf fhir-store up|status|down|build`: the DIC's FHIR store (HAPI FHIR JPA, R4)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fhir-store", help="the DIC's FHIR store: a HAPI FHIR JPA server (R4) on 127.0.0.1",
        description="Start, inspect and stop a HAPI FHIR JPA server (R4) with its data in a folder "
        "(H2, or PostgreSQL with --db-url). FHIR base: http://127.0.0.1:PORT/fhir.")
    act = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, required=True, help="the store's folder (data, logs, state)")

    up = act.add_parser("up", parents=[common], help="start the store and wait until it answers (safe when it runs)")
    up.add_argument("--port", type=int, help="port on 127.0.0.1 (default: the last one used, else 8090)")
    up.add_argument("--heap", help="JVM -Xmx (default 768m)")
    up.add_argument("--db-url", help="jdbc:postgresql://HOST:PORT/DB instead of the H2 database in the folder")
    up.add_argument("--db-user", help="database user (PostgreSQL)")
    up.add_argument("--db-password-file", help="file whose first line is the database password")
    up.add_argument("--tls-cert", help="PEM server certificate (chain): serve HTTPS")
    up.add_argument("--tls-key", help="PEM private key of --tls-cert")
    up.add_argument("--tls-key-password-file", help="file whose first line is the password of --tls-key")
    up.add_argument("--tls-ca", help="CA file to check the server with (default: --tls-cert)")
    up.add_argument("--validate", action="store_true",
                    help="validate every resource sent (base spec and profiles the store holds); refuse errors")
    up.add_argument("--unknown-profiles", choices=("error", "warning"), default="error",
                    help="with --validate: a claimed profile the store does not hold is an error (default) "
                    "or a warning (a store without the profiles' packages)")
    up.add_argument("--timeout", type=float, default=300, help="seconds to wait for start-up (default 300)")
    up.set_defaults(func=_up)

    st = act.add_parser("status", parents=[common], help="whether it runs, and where")
    st.set_defaults(func=lambda a: _store(a).status())

    down = act.add_parser("down", parents=[common], help="stop it")
    down.set_defaults(func=lambda a: _store(a).down())

    b = act.add_parser("build", help="build fhir-store/ with Maven (done by `up` when needed)")
    b.add_argument("--force", action="store_true", help="build even when the jar is current")
    b.set_defaults(func=_build)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _store(args: argparse.Namespace, **kw):
    from omi_dsf.fhirstore.store import FhirStore
    return FhirStore(args.dir, **kw)


def _up(args: argparse.Namespace) -> int:
    _store(args, port=args.port, heap=args.heap, db_url=args.db_url, db_user=args.db_user,
           db_password_file=args.db_password_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
           tls_ca=args.tls_ca, tls_key_password_file=args.tls_key_password_file, validate=args.validate,
           unknown_profiles=args.unknown_profiles).up(timeout=args.timeout)
    return 0


def _build(args: argparse.Namespace) -> int:
    from omi_dsf.fhirstore.store import build
    print(f"built {build(force=args.force)}")
    return 0
