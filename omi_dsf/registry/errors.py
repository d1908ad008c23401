"""Errors the registry answers with an OperationOutcome that names the problem."""

from __future__ import annotations


class FhirError(Exception):
    def __init__(self, status: int, code: str, message: str, expression: list[str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.expression = expression or []

    def outcome(self) -> dict:
        return operation_outcome(self.message, self.code, self.expression)


def operation_outcome(message: str, code: str = "processing", expression: list[str] | None = None,
                      severity: str = "error") -> dict:
    issue = {"severity": severity, "code": code, "diagnostics": message}
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def invalid(message: str, *expression: str) -> FhirError:
    return FhirError(400, "invalid", message, list(expression))


def unprocessable(message: str, *expression: str) -> FhirError:
    return FhirError(422, "processing", message, list(expression))


def forbidden(message: str) -> FhirError:
    return FhirError(403, "forbidden", message)


def unauthenticated(message: str) -> FhirError:
    return FhirError(401, "login", message)


def not_found(message: str) -> FhirError:
    return FhirError(404, "not-found", message)


def duplicate(message: str, *expression: str) -> FhirError:
    return FhirError(409, "duplicate", message, list(expression))
