"""`python -m omi_dsf registry --config FILE`: run the service registry."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("registry", help="run the OMI service registry (FHIR R4 REST, health checks, status page)")
    p.add_argument("--config", required=True, help="registry configuration (YAML, see docs/registry.md)")
    p.add_argument("--port", type=int, help="override the configured port")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from omi_dsf.errors import UserError
    from omi_dsf.registry.config import load_config
    from omi_dsf.registry.server import serve
    from omi_dsf.registry.store import Store

    cfg = load_config(args.config)
    if args.port:
        cfg.port = args.port
    from omi_dsf.peer import PeerConfigError
    from omi_dsf.registry.errors import FhirError

    try:
        peer = cfg.store_peer(str(args.config))
        store = Store(peer)
        store.install_search_parameters()   # fail here, in one line, if the FHIR store is unusable
    except PeerConfigError as exc:
        raise UserError(str(exc)) from None
    except FhirError as exc:
        raise UserError(f"{args.config}: fhir_store {peer.url}: {exc.message}") from None
    serve(cfg, store)
    return 0
