"""Command line of the inference part: `ai-service`."""

from __future__ import annotations

import argparse
from pathlib import Path

from omi_dsf.inference.servers import SERVERS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ai-service", help="run the reference lung model behind Open Inference Protocol v2 "
                                                 "(the project's service, KServe or MLServer)")
    p.add_argument("--server", choices=SERVERS, default="reference",
                   help="the model server: reference (the project's, TLS and authentication from --config), "
                        "kserve or mlserver (their own environments made by tools/setup.sh; plain HTTP, "
                        "--anonymous only: docs/inference.md)")
    p.add_argument("--config", help="configuration (YAML: listen, tls, auth, limits, max_slices; docs/inference.md)")
    p.add_argument("--anonymous", action="store_true",
                   help="without --config: serve plain HTTP with no authentication (tests, the demo)")
    p.add_argument("--host", help="listen address (default 127.0.0.1, or listen.host)")
    p.add_argument("--port", type=int, help="port (default 8500, or listen.port)")
    p.add_argument("--max-slices", type=int, default=None, help="model limit announced in metadata")
    p.add_argument("--grpc-port", type=int, help="kserve, mlserver: their OIP v2 gRPC port (kserve: off without it; "
                                                 "mlserver: default a free one); the infer step sends tensors "
                                                 "there as raw bytes")
    p.set_defaults(func=_ai_service)


def _ai_service(args: argparse.Namespace) -> int:
    from omi_dsf.errors import UserError
    from omi_dsf.inference.config import ServiceConfig
    from omi_dsf.inference.service import serve
    from omi_dsf import config

    if args.server != "reference":
        return _other_server(args)
    if args.grpc_port is not None:
        raise UserError("--grpc-port is for --server kserve or mlserver")
    if args.config and args.anonymous:
        raise UserError("--anonymous is for running without --config; set auth.anonymous in the file instead")
    if args.config:
        cfg = config.load(ServiceConfig, args.config)
    elif args.anonymous:
        cfg = config.parse(ServiceConfig, {"auth": {"anonymous": True}}, Path("."), "ai-service")
    else:   # anonymous is a choice, never a default
        raise UserError("ai-service: no way in: give --config FILE (auth.jwt or tls.require_client_cert; see "
                        "docs/inference.md), or --anonymous for plain HTTP without authentication")
    data = cfg.model_dump()
    for key, value in (("host", args.host), ("port", args.port)):
        if value is not None:
            data["listen"][key] = value
    if args.max_slices is not None:
        data["max_slices"] = args.max_slices
    cfg = config.parse(ServiceConfig, data, Path("."), args.config or "ai-service")
    serve(cfg, log_level="debug" if getattr(args, "verbose", False) else "warning")
    return 0


def _other_server(args: argparse.Namespace) -> int:
    from omi_dsf.errors import UserError
    from omi_dsf.inference import lungseg, servers

    if args.config or not args.anonymous:
        raise UserError(f"ai-service --server {args.server}: the project's TLS and authentication settings are the "
                        f"reference service's; {args.server} serves plain HTTP here: give --anonymous (in production "
                        f"TLS and authentication come from the platform in front of it; docs/inference.md)")
    if args.server == "kserve" and args.host not in (None, "0.0.0.0"):   # noqa: S104
        raise UserError("ai-service --server kserve: KServe's model server listens on all interfaces; "
                        "--host cannot choose one (leave it out)")
    max_slices = args.max_slices if args.max_slices is not None else lungseg.DEFAULT_MAX_SLICES
    if max_slices < 3:
        raise UserError(f"--max-slices {max_slices}: the model needs at least 3")
    return servers.run(args.server, args.host or "127.0.0.1", args.port or 8500, max_slices, args.grpc_port)
