"""Serve the gateway with uvicorn (TLS, optional client-certificate verification).

Several workers (``workers``): this process binds the listening socket once and forks that many
worker processes that accept on it, each with its own event loop, association pool and caches;
they share a temporary folder (the PACS association slots, the marks a STOW-RS leaves). This
process only watches them: a worker that dies is started again, SIGTERM or SIGINT stops them all.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import ssl
import tempfile
import threading
import time

from pathlib import Path

import uvicorn

from .app import create_app
from .config import GatewayConfig
from omi_dsf.serving.limits import default_protocol, with_header_limits


def uvicorn_config(cfg: GatewayConfig, log_level: str = "info", app=None) -> uvicorn.Config:
    kwargs = {}
    if cfg.tls:
        kwargs.update(ssl_certfile=str(cfg.tls.certfile), ssl_keyfile=str(cfg.tls.keyfile),
                      ssl_keyfile_password=cfg.tls.keyfile_password)
        if cfg.tls.client_ca:
            kwargs["ssl_ca_certs"] = str(cfg.tls.client_ca)
            kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED if cfg.tls.require_client_cert else ssl.CERT_OPTIONAL
    # httptools with the header timeout and size limits the project's servers share
    return uvicorn.Config(app or create_app(cfg), host=cfg.host, port=cfg.port, log_level=log_level,
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
    if cfg.worker_count == 1:
        uvicorn.Server(uvicorn_config(cfg, log_level)).run()
        return
    shared = Path(tempfile.mkdtemp(prefix="omi-gateway-"))
    try:
        Supervisor(cfg, shared, log_level).run()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


log = logging.getLogger("omi_dsf.dicomweb.server")


def _die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the supervisor dies (killed: no orphan keeps the port)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def _no_app(scope, receive, send) -> None:   # never served: the supervisor only binds
    raise RuntimeError("the supervisor serves nothing")


class Supervisor:
    """Binds the socket, forks ``cfg.worker_count`` uvicorn workers, restarts the ones that die.
    It starts no thread before forking (a fork copies only the calling thread)."""

    RESTARTS = 5   # this many deaths within a few seconds of their start: give up (a broken setup)

    def __init__(self, cfg: GatewayConfig, shared: Path, log_level: str = "info"):
        self.cfg, self.log_level = cfg, log_level
        cfg._shared = shared
        # the app (backends, pools) is built in each worker; here only the socket
        self.sock = uvicorn_config(cfg, log_level, app=_no_app).bind_socket()
        self.workers: dict[int, float] = {}   # pid → when started
        self.stopping = False

    def _start_worker(self) -> None:
        pid = os.fork()
        if pid == 0:   # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _die_with_parent()
                if os.getppid() == 1:
                    os._exit(0)
                uvicorn.Server(uvicorn_config(self.cfg, self.log_level)).run(sockets=[self.sock])
                code = 0
            except BaseException:  # noqa: BLE001 - reported, and the supervisor starts another
                log.exception("gateway worker %d failed", os.getpid())
            finally:
                os._exit(code)
        self.workers[pid] = time.monotonic()

    def _stop(self, *_args) -> None:
        self.stopping = True
        for pid in list(self.workers):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for _ in range(self.cfg.worker_count):
            self._start_worker()
        print(f"gateway: {self.cfg.worker_count} workers on {self.cfg.public_base()}", flush=True)
        quick_deaths = 0
        deadline = None
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                if self.stopping:
                    deadline = deadline or time.monotonic() + 15
                    if time.monotonic() > deadline:   # graceful shutdown took too long
                        for p in list(self.workers):
                            try:
                                os.kill(p, signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                time.sleep(0.1)
                continue
            started = self.workers.pop(pid, None)
            if started is None or self.stopping:
                continue
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < 5 else 0
            log.warning("gateway worker %d ended (status %d); starting another", pid, status)
            if quick_deaths >= self.RESTARTS:
                log.error("gateway workers keep dying at start; stopping")
                self._stop()
                raise SystemExit(1)
            self._start_worker()
        self.sock.close()


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
