"""Health of registered services: active checks of each service's Open Inference Protocol endpoint
(server ready, model ready) plus the provider's heartbeats.

  up        server and model ready, answered within the latency limit, heartbeat (if any) recent
  degraded  reachable but the model is not ready, or slow, or the provider's heartbeats stopped
  down      not reachable, TLS or HTTP error, or the server says it is not ready
  unknown   not checked yet

A failing service is marked, never deleted: its entry stays searchable with its status.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from pydantic import Field, model_validator

from omi_dsf.inference.client import OipClient, OipError
from omi_dsf.peer import http_client
from omi_dsf.registry import validation as v
from omi_dsf.registry.errors import FhirError
from omi_dsf.registry.store import ServiceState, Store
from omi_dsf.config import ExistingFile, Section
from omi_dsf.tls import client_context

log = logging.getLogger(__name__)


class HealthSettings(Section):
    interval: float = Field(30.0, ge=0, description="seconds between check rounds (0: no checks)")
    timeout: float = Field(5.0, gt=0, description="seconds per HTTP request")
    degraded_latency_ms: float = Field(1000.0, gt=0, description="slower answers mark a service degraded")
    heartbeat_timeout: float = Field(300.0, gt=0, description="a provider that sends heartbeats must send one "
                                                              "this often (seconds)")
    ca_file: ExistingFile | None = Field(None, description="CA for https service endpoints (default: the system CAs)")
    client_cert: ExistingFile | None = Field(None, description="for services that require mutual TLS (with "
                                                               "client_key)")
    client_key: ExistingFile | None = Field(None, description="its key")
    client_key_password_file: ExistingFile | None = Field(None, description="file holding client_key's password")
    parallel: int = Field(8, ge=1, le=64, description="checks at a time")

    @model_validator(mode="after")
    def _key_for_cert(self) -> "HealthSettings":
        if self.client_cert and not self.client_key:
            raise ValueError("client_cert needs client_key")
        return self

    def tls_context(self) -> ssl.SSLContext:
        password = self.client_key_password_file.read_text().strip() if self.client_key_password_file else None
        return client_context(str(self.ca_file) if self.ca_file else None,
                           str(self.client_cert) if self.client_cert else None,
                           str(self.client_key) if self.client_key else None, password)


def assess(server_ready: bool, model_ready: bool, latency_ms: float, limit_ms: float) -> tuple[str, str]:
    if not server_ready:
        return "down", "server not ready (v2/health/ready)"
    if not model_ready:
        return "degraded", "model not ready (v2/models/<model>/ready)"
    if latency_ms > limit_ms:
        return "degraded", f"slow: {latency_ms:.0f} ms > {limit_ms:.0f} ms"
    return "up", "server and model ready"


def _age_seconds(stamp: str, now: dt.datetime) -> float:
    t = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (now - t).total_seconds()


def effective(state: ServiceState, settings: HealthSettings, now: dt.datetime | None = None) -> ServiceState:
    """The state as shown: an 'up' service whose heartbeats stopped is degraded."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if state.status == "up" and state.heartbeat_at and _age_seconds(state.heartbeat_at, now) > settings.heartbeat_timeout:
        return ServiceState(**{**state.__dict__, "status": "degraded",
                               "detail": f"no heartbeat for more than {settings.heartbeat_timeout:.0f} s"})
    return state


class HealthChecker:
    def __init__(self, store: Store, settings: HealthSettings):
        self.store, self.settings = store, settings
        # one context for all checks: building one per client costs more than a check on a LAN
        self._verify = settings.tls_context()
        self._pool: ThreadPoolExecutor | None = None

    @staticmethod
    def _targets(service: dict, linked: dict[str, dict]) -> tuple[str | None, str | None]:
        """(OIP base URL, model name) of a HealthcareService; `linked`: its Devices and Endpoints by reference."""
        url = model = None
        for ref in service.get("endpoint", []):
            got = linked.get(ref.get("reference") or "")
            if got and got.get("resourceType") == "Endpoint" and v.endpoint_kind(got) == "oip" \
                    and got.get("status") == "active":
                url = got["address"]
                break
        alg = v.algorithm_ref(service)
        if alg and linked.get(alg):
            model = v.model_name(linked[alg])
        return url, model

    def check_service(self, service: dict, linked: dict[str, dict]) -> ServiceState:
        url, model = self._targets(service, linked)
        if not url or not model:
            return self.store.record_check(service["id"], "down", None, "no active OIP endpoint or model name")
        http = http_client(url.rstrip("/"), self._verify, self.settings.timeout)
        t0 = time.monotonic()   # latency: the two ready calls, not the client's setup
        try:
            with OipClient(url, timeout=self.settings.timeout, http=http) as oip:
                server_ready = oip.server_ready()
                model_ready = server_ready and oip.model_ready(model)
        except (OipError, httpx.HTTPError, ssl.SSLError, OSError) as exc:
            latency = (time.monotonic() - t0) * 1000
            detail = f"unreachable: {type(exc).__name__}: {str(exc)[:200]}"
            return self.store.record_check(service["id"], "down", round(latency, 1), detail)
        latency = (time.monotonic() - t0) * 1000
        status, detail = assess(server_ready, model_ready, latency, self.settings.degraded_latency_ms)
        return self.store.record_check(service["id"], status, round(latency, 1), detail)

    def check_all(self) -> dict[str, ServiceState]:
        services, linked = self.store.services()   # one search, with their Devices and Endpoints
        services = [s for s in services if s.get("active", True) is not False]

        def one(service: dict) -> tuple[str, ServiceState | None]:
            try:
                return service["id"], self.check_service(service, linked)
            except Exception:  # one broken entry must not stop the checks of the others
                log.exception("health check of HealthcareService/%s failed", service["id"])
                return service["id"], None

        # the checks wait on the network, not the CPU: a few at a time keep a round short
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.settings.parallel, thread_name_prefix="health")
        return {sid: st for sid, st in self._pool.map(one, services) if st is not None}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._rounds(stop)
        finally:
            self.close()

    async def _rounds(self, stop: asyncio.Event) -> None:
        seen: dict[str, str] = {}
        while not stop.is_set():
            try:
                states = await asyncio.to_thread(self.check_all)
            except FhirError as exc:   # the FHIR store is away: the services keep their last state
                log.warning("health round skipped: %s", exc.message)
                states = {}
            for sid, st in sorted(states.items()):   # log changes only: a round every 30 s is not news
                if seen.get(sid) != st.status:
                    log.info("HealthcareService/%s: %s (%s)", sid, st.status, st.detail)
            seen.update({sid: st.status for sid, st in states.items()})
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.settings.interval)
            except asyncio.TimeoutError:
                pass
