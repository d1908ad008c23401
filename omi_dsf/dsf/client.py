"""A client for a DSF FHIR server: mTLS with the site's certificate, REST with version checks,
search with paging, and the DSF websocket subscription protocol (`bind <id>` → `bound <id>`).

The certificate is the site's organization certificate (its SHA-512 thumbprint is on the allow
list); only that identity may update Tasks and QuestionnaireResponses at its own site.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from email.utils import parsedate_to_datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator
from urllib.parse import urlsplit

import httpx

from omi_dsf.dsf.errors import (DsfAuthError, DsfBadAnswer, DsfConflict, DsfConnectionError, DsfError, DsfNotFound, DsfTlsError,
                                DsfValidationError, operation_outcome_text)
from omi_dsf.peer import http_client, json_answer

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True)
class Identity:
    """Where a site's DSF FHIR server is and how to prove who we are."""
    fhir_url: str
    ca_file: str                      # CA(s) that issued the server certificate
    cert_file: str                    # the organization's client certificate (PEM)
    key_file: str
    key_password: str | None = None   # read from a file or env by the caller, never from code

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file, self.key_password)
        except (ssl.SSLError, OSError) as exc:
            raise DsfTlsError(f"cannot load client certificate {self.cert_file}: {exc}") from exc
        return ctx


def _reason(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        body = None
    text = operation_outcome_text(body)
    if not text:
        text = (resp.text or "").strip().replace("\n", " ")[:300]
    return f"{resp.status_code} {resp.reason_phrase}" + (f": {text}" if text else "")


def _body(resp: httpx.Response, what: str) -> dict:
    """The answer's JSON object; one cut off or not JSON (a server going away mid-answer) is a
    DsfBadAnswer, retried like a connection error."""
    return json_answer(resp, what, DsfBadAnswer)


def raise_for_status(resp: httpx.Response, what: str) -> None:
    if resp.is_success:
        return
    msg = f"{what}: {_reason(resp)}"
    if resp.status_code in (401, 403):
        raise DsfAuthError(msg, resp.status_code)
    if resp.status_code in (400, 422):
        raise DsfValidationError(msg, resp.status_code)
    if resp.status_code in (404, 410):
        raise DsfNotFound(msg, resp.status_code)
    if resp.status_code in (409, 412):
        raise DsfConflict(msg, resp.status_code)
    raise DsfError(msg, resp.status_code)


class DsfClient:
    def __init__(self, identity: Identity, timeout: float = 30.0):
        self.identity = identity
        self.base = identity.fhir_url.rstrip("/")
        self._ssl = identity.ssl_context()
        self._http = http_client(self.base, self._ssl, timeout, headers={"Accept": FHIR_JSON})
        self.clock_offset = 0.0

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "DsfClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------

    def _request(self, method: str, url: str, what: str, **kw) -> httpx.Response:
        try:
            resp = self._http.request(method, url, **kw)
        except httpx.ConnectError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, ssl.SSLError) or "SSL" in str(exc) or "certificate" in str(exc).lower():
                raise DsfTlsError(f"{what}: TLS with {self.base} failed: {exc}") from exc
            raise DsfConnectionError(f"{what}: cannot connect to {self.base}: {exc}") from exc
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            if "SSL" in str(exc) or "alert" in str(exc).lower():
                raise DsfTlsError(f"{what}: TLS with {self.base} failed: {exc}") from exc
            raise DsfConnectionError(f"{what}: {self.base}: {type(exc).__name__}: {exc}") from exc
        raise_for_status(resp, what)
        date = resp.headers.get("Date")
        if date:
            try:
                self.clock_offset = parsedate_to_datetime(date).timestamp() - time.time()
            except (TypeError, ValueError):
                pass
        return resp

    def server_now(self) -> float:
        """The server's clock (epoch seconds), from the Date header of its last answer."""
        return time.time() + self.clock_offset

    # -- REST -----------------------------------------------------------------------------

    def metadata(self) -> dict:
        return _body(self._request("GET", "/metadata", "GET metadata"), "GET metadata")

    def read(self, rtype: str, rid: str) -> dict:
        return _body(self._request("GET", f"/{rtype}/{rid}", f"GET {rtype}/{rid}"), f"GET {rtype}/{rid}")

    def history(self, rtype: str, rid: str) -> list[dict]:
        """Every stored version of one resource, oldest first."""
        bundle = _body(self._request("GET", f"/{rtype}/{rid}/_history", f"GET {rtype}/{rid}/_history",
                                     params={"_count": 1000}), f"GET {rtype}/{rid}/_history")
        return sorted((e["resource"] for e in bundle.get("entry", []) if "resource" in e),
                      key=lambda r: int(r["meta"]["versionId"]))

    def create(self, resource: dict) -> dict:
        rtype = resource["resourceType"]
        resp = self._request("POST", f"/{rtype}", f"POST {rtype}", content=json.dumps(resource),
                             headers={"Content-Type": FHIR_JSON, "Prefer": "return=representation"})
        return _body(resp, f"POST {rtype}") if resp.content else {}

    def update(self, resource: dict, check_version: bool = True) -> dict:
        """PUT; with check_version, only if nobody changed it since we read it (If-Match)."""
        rtype, rid = resource["resourceType"], resource["id"]
        headers = {"Content-Type": FHIR_JSON, "Prefer": "return=representation"}
        version = (resource.get("meta") or {}).get("versionId")
        if check_version and version:
            headers["If-Match"] = f'W/"{version}"'
        resp = self._request("PUT", f"/{rtype}/{rid}", f"PUT {rtype}/{rid}", content=json.dumps(resource), headers=headers)
        return _body(resp, f"PUT {rtype}/{rid}") if resp.content else {}

    def search(self, rtype: str, params: dict[str, Any] | None = None, page_size: int = 50) -> Iterator[dict]:
        """All matching resources (search-mode match), following the Bundle's next links."""
        params = {"_count": page_size, **(params or {})}
        resp = self._request("GET", f"/{rtype}", f"GET {rtype}?", params=params)
        while True:
            bundle = _body(resp, f"GET {rtype}?")
            for entry in bundle.get("entry", []):
                if (entry.get("search") or {}).get("mode", "match") == "match" and "resource" in entry:
                    yield entry["resource"]
            nxt = next((l["url"] for l in bundle.get("link", []) if l.get("relation") == "next"), None)
            if not nxt or not bundle.get("entry"):
                return
            resp = self._request("GET", self._same_server(nxt), f"GET {rtype}? (next page)")

    def _same_server(self, url: str) -> str:
        # follow paging links only to our own server, whatever host name it put in them
        parts = urlsplit(url)
        path = parts.path
        base_path = urlsplit(self.base).path
        if path.startswith(base_path):
            path = path[len(base_path):]
        return path + (f"?{parts.query}" if parts.query else "")

    # -- websocket ------------------------------------------------------------------------

    def find_or_create_subscription(self, criteria: str) -> str:
        """The id of an active websocket Subscription with exactly these criteria (created if none)."""
        found = list(self.search("Subscription", {"criteria:exact": criteria, "status": "active",
                                                  "type": "websocket", "payload": FHIR_JSON}))
        if found:
            return found[0]["id"]
        sub = {
            "resourceType": "Subscription",
            "meta": {"tag": [{"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "LOCAL"}]},
            "status": "active",
            "reason": "OMI workers: external work items",
            "criteria": criteria,
            "channel": {"type": "websocket", "payload": FHIR_JSON},
        }
        created = self.create(sub)
        log.info("created Subscription/%s for %s", created.get("id"), criteria)
        return created["id"]

    @property
    def websocket_url(self) -> str:
        return self.base.replace("https://", "wss://", 1) + "/ws"

    async def notifications(self, subscription_id: str, open_timeout: float = 10) -> AsyncIterator[dict | None]:
        """Resources pushed for a Subscription; yields None for pings. Ends when the socket closes."""
        import websockets

        try:
            async with websockets.connect(self.websocket_url, ssl=self._ssl, open_timeout=open_timeout,
                                          ping_interval=20, max_size=16 * 2**20) as ws:
                await ws.send(f"bind {subscription_id}")
                answer = await ws.recv()
                if answer != f"bound {subscription_id}":
                    raise DsfError(f"websocket bind {subscription_id}: server answered {str(answer)[:200]!r}")
                async for message in ws:
                    if isinstance(message, bytes):
                        message = message.decode()
                    if message.startswith("ping "):
                        yield None
                    else:
                        yield json.loads(message)
        except (OSError, ssl.SSLError) as exc:
            raise DsfConnectionError(f"websocket {self.websocket_url}: {exc}") from exc


def identity_from_files(fhir_url: str, ca_file: str | Path, cert_file: str | Path, key_file: str | Path,
                        key_password_file: str | Path | None = None, key_password_env: str | None = None) -> Identity:
    import os

    password = None
    if key_password_file:
        password = Path(key_password_file).read_text().strip()
    elif key_password_env:
        password = os.environ.get(key_password_env)
    return Identity(fhir_url, str(ca_file), str(cert_file), str(key_file), password)
