"""Serve the registry with uvicorn: TLS (client certificates asked for, verified when given), the
limits and header read timeout of omi_dsf/serving, and the protocol that notes peer certificates."""

from __future__ import annotations

import uvicorn

from omi_dsf.registry.app import create_app
from omi_dsf.registry.auth import PeerCertH11Protocol
from omi_dsf.registry.config import RegistryConfig
from omi_dsf.serving.limits import uvicorn_config


def serve(cfg: RegistryConfig, store=None) -> None:
    uvicorn.Server(uvicorn_config(create_app(cfg, store), host=cfg.host, port=cfg.port, tls=cfg.tls, limits=cfg.limits,
                                  protocol=PeerCertH11Protocol)).run()
