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
    p.add_argument("--metrics-port", type=int, help="mlserver: its Prometheus metrics port (default a free one; "
                                                    "kserve serves /metrics on --port)")
    p.set_defaults(func=_ai_service)


def _ai_service(args: argparse.Namespace) -> int:
    from omi_dsf.errors import UserError
    from omi_dsf.inference.config import ServiceConfig
    from omi_dsf.inference.service import serve
    from omi_dsf import malloc
    from omi_dsf import config

    if args.server != "reference":
        return _other_server(args)
    if args.grpc_port is not None:
        raise UserError("--grpc-port is for --server kserve or mlserver")
    if args.metrics_port is not None:
        raise UserError("--metrics-port is for --server mlserver")
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
    malloc.keep_freed_memory()   # volumes in, masks out: no page faults on every copy
    serve(cfg, log_level="debug" if getattr(args, "verbose", False) else "warning")
    return 0


def _other_server(args: argparse.Namespace) -> int:
    from omi_dsf.errors import UserError
    from omi_dsf.inference import lungseg, servers

    tls, file_slices, file_port = None, lungseg.DEFAULT_MAX_SLICES, 8500
    if args.config and args.anonymous:
        raise UserError("--anonymous is for running without --config; set auth.anonymous in the file instead")
    if args.config and args.server == "kserve":
        tls, file_slices, file_port = _kserve_config(args)
    elif args.config or not args.anonymous:
        raise UserError(f"ai-service --server {args.server}: {args.server} serves plain HTTP here, without "
                        f"authentication: give --anonymous (in production TLS and authentication come from the "
                        f"ingress in front of it; docs/inference.md)"
                        + (" or --config with tls (KServe serves TLS on its HTTP port)" if args.server == "kserve"
                           else ""))
    if args.server == "kserve" and args.host not in (None, "0.0.0.0"):   # noqa: S104
        raise UserError("ai-service --server kserve: KServe's model server listens on all interfaces; "
                        "--host cannot choose one (leave it out)")
    if args.server == "kserve" and args.metrics_port is not None:
        raise UserError("--metrics-port is for --server mlserver (kserve serves /metrics on --port)")
    max_slices = args.max_slices if args.max_slices is not None else file_slices
    if max_slices < 3:
        raise UserError(f"--max-slices {max_slices}: the model needs at least 3")
    port = args.port or file_port
    if tls and port == servers.KSERVE_DEFAULT_HTTP_PORT:
        raise UserError(f"ai-service --server kserve: KServe moves a TLS server from port {port} to 8443; choose "
                        f"another port")
    return servers.run(args.server, args.host or "127.0.0.1", port, max_slices, args.grpc_port,
                       metrics_port=args.metrics_port, tls=tls)


def _kserve_config(args: argparse.Namespace) -> tuple[tuple[str, str] | None, int, int]:
    """KServe's model server from the reference service's configuration file: what KServe can do of it
    (listen.port, tls.certfile and tls.keyfile: TLS without client certificates, max_slices); anything
    else is refused naming the key. Answers (certfile, keyfile) or None, max_slices and the port."""
    from omi_dsf import config
    from omi_dsf.errors import UserError
    from omi_dsf.inference.config import ServiceConfig

    cfg = config.load(ServiceConfig, args.config)
    where = f"ai-service --server kserve: {args.config}"
    if cfg.auth.jwt:
        raise UserError(f"{where}: auth.jwt: KServe's model server checks no tokens (authentication comes from the "
                        f"ingress in front of it); set auth.anonymous: true")
    if cfg.tls and (cfg.tls.client_ca or cfg.tls.require_client_cert):
        raise UserError(f"{where}: tls.client_ca: KServe's model server checks no client certificates (mutual TLS "
                        f"comes from the ingress in front of it)")
    if cfg.tls and cfg.tls.keyfile_password_file:
        raise UserError(f"{where}: tls.keyfile_password_file: KServe's model server takes no key password; give "
                        f"an unencrypted keyfile readable only by the server")
    if "limits" in cfg.model_fields_set:
        raise UserError(f"{where}: limits: the reference service's; KServe's model server has its own")
    if "host" in cfg.listen.model_fields_set and cfg.listen.host != "0.0.0.0":   # noqa: S104
        raise UserError(f"{where}: listen.host: KServe's model server listens on all interfaces; leave it out")
    if cfg.tls and args.grpc_port is not None:
        raise UserError(f"{where}: tls with --grpc-port: KServe's gRPC port serves no TLS (TLS for it comes from "
                        f"the ingress); leave --grpc-port out, tensors then go binary over HTTPS")
    tls = (str(cfg.tls.certfile.resolve()), str(cfg.tls.keyfile.resolve())) if cfg.tls else None
    return tls, cfg.max_slices, cfg.listen.port
