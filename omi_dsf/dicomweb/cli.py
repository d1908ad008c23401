"""`python -m omi_dsf gateway --config FILE`: run the DICOMweb gateway."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("gateway", help="DICOMweb gateway (QIDO/WADO/STOW) over DIMSE PACS or a store",
                              description=__doc__)
    p.add_argument("--config", required=True, help="YAML configuration (see docs/gateway.md)")
    p.add_argument("--check", action="store_true", help="only check the configuration")
    p.add_argument("--endpoints", action="store_true",
                   help="print the FHIR Endpoint resources (a JSON list) and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config)   # a ConfigError is one line naming the file and the key
    if args.endpoints:
        from .endpoint import endpoint_resources
        print(json.dumps(endpoint_resources(cfg), indent=2))
        return 0
    if args.check:
        print(f"ok: {len(cfg.backends)} backend(s), default {cfg.default_backend}, "
              f"listening on {cfg.host}:{cfg.port}{' (TLS)' if cfg.tls else ''}")
        return 0
    from .server import serve
    serve(cfg, log_level="debug" if getattr(args, "verbose", False) else "info")
    return 0
