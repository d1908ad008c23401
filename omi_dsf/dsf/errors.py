"""Errors of the DSF client, each carrying what the server said (reason, OperationOutcome text)."""

from __future__ import annotations


class DsfError(Exception):
    """Any failure talking to a DSF FHIR server."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class DsfTlsError(DsfError):
    """The TLS handshake failed: unknown CA, wrong certificate, certificate not accepted."""


class DsfConnectionError(DsfError):
    """The server could not be reached (refused, timed out, reset)."""


class DsfBadAnswer(DsfConnectionError):
    """The answer is not the JSON object it should be (cut off while the server went away, or not
    FHIR JSON at all): retried like a connection error."""


class DsfAuthError(DsfError):
    """401/403: the certificate is not on the allow list, or the identity may not do this."""


class DsfValidationError(DsfError):
    """400/422: the resource breaks its profile; the message is the OperationOutcome's text."""


class DsfNotFound(DsfError):
    """404/410."""


class DsfConflict(DsfError):
    """409/412: someone else changed the resource (version check failed)."""


def operation_outcome_text(body: object) -> str:
    """The diagnostics of an OperationOutcome, one line; '' if the body is not one."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in body.get("issue", []):
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code", "")
        loc = ",".join(issue.get("location", []) or issue.get("expression", []))
        parts.append(f"{issue.get('severity', '')}: {text}" + (f" at {loc}" if loc else ""))
    return "; ".join(p.strip() for p in parts if p.strip())
