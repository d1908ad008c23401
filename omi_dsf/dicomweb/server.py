"""Serve the gateway with uvicorn (TLS, optional client-certificate verification)."""

from __future__ import annotations

import ssl
import threading
import time

import uvicorn

from .app import create_app
from .config import GatewayConfig
from omi_dsf.serving.limits import default_protocol, with_header_limits


def uvicorn_config(cfg: GatewayConfig, log_level: str = "info") -> uvicorn.Config:
    kwargs = {}
    if cfg.tls:
        kwargs.update(ssl_certfile=str(cfg.tls.certfile), ssl_keyfile=str(cfg.tls.keyfile),
                      ssl_keyfile_password=cfg.tls.keyfile_password)
        if cfg.tls.client_ca:
            kwargs["ssl_ca_certs"] = str(cfg.tls.client_ca)
            kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED if cfg.tls.require_client_cert else ssl.CERT_OPTIONAL
    # httptools with the header timeout and size limits the project's servers share
    return uvicorn.Config(create_app(cfg), host=cfg.host, port=cfg.port, log_level=log_level,
                          access_log=False, proxy_headers=False, server_header=False,
                          http=with_header_limits(default_protocol(), cfg.limits),
                          timeout_graceful_shutdown=5, lifespan="on", **kwargs)


def _more_file_descriptors() -> None:
    """Raise the soft open-files limit to the hard one: each connection, half-sent or not, is a
    descriptor until limits.header_timeout ends it (a soft limit of 1024 would refuse new clients first)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):
        pass


def serve(cfg: GatewayConfig, log_level: str = "info") -> None:
    """Run until interrupted (Ctrl-C / SIGTERM)."""
    _more_file_descriptors()
    uvicorn.Server(uvicorn_config(cfg, log_level)).run()


class BackgroundServer:
    """The gateway in a thread of this process (tests, benchmarks, the demo)."""

    def __init__(self, cfg: GatewayConfig, log_level: str = "warning"):
        self.cfg = cfg
        self.server = uvicorn.Server(uvicorn_config(cfg, log_level))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, name="dicomweb-gateway", daemon=True)

    @property
    def url(self) -> str:
        return self.cfg.public_base()

    def start(self, timeout: float = 20) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start on {self.cfg.host}:{self.cfg.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
