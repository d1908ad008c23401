"""Serve the registry with uvicorn (TLS, optionally mutual TLS)."""

from __future__ import annotations

import ssl

import uvicorn

from omi_dsf.registry.app import create_app
from omi_dsf.registry.auth import PeerCertH11Protocol
from omi_dsf.registry.config import RegistryConfig


def serve(cfg: RegistryConfig) -> None:
    kwargs = {}
    if cfg.tls:
        kwargs.update(ssl_certfile=str(cfg.tls.certfile), ssl_keyfile=str(cfg.tls.keyfile))
        if cfg.tls.keyfile_password:
            kwargs["ssl_keyfile_password"] = cfg.tls.keyfile_password
        if cfg.tls.client_ca:
            # optional: searches and the page need no certificate, writes check it in the app
            kwargs.update(ssl_ca_certs=str(cfg.tls.client_ca), ssl_cert_reqs=ssl.CERT_OPTIONAL)
    config = uvicorn.Config(create_app(cfg), host=cfg.host, port=cfg.port, http=PeerCertH11Protocol,
                            log_level="info", access_log=False, lifespan="on", **kwargs)
    uvicorn.Server(config).run()
