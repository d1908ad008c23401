"""Errors that become HTTP answers: each carries its status code and a message safe to show."""

from __future__ import annotations


class DicomwebError(Exception):
    status = 500

    def __init__(self, message: str, **extra):
        super().__init__(message)
        self.message = message
        self.extra = extra   # more members of the JSON answer (STOW-RS: what was stored)


class BadRequest(DicomwebError):
    status = 400


class Unauthorized(DicomwebError):
    status = 401


class Forbidden(DicomwebError):
    status = 403


class NotFound(DicomwebError):
    status = 404


class NotAcceptable(DicomwebError):
    status = 406


class RequestTimeout(DicomwebError):
    status = 408


class Conflict(DicomwebError):
    status = 409


class PayloadTooLarge(DicomwebError):
    status = 413


class UnsupportedMediaType(DicomwebError):
    status = 415


class Busy(DicomwebError):
    """A limit of the gateway itself (a query's time limit): try again later or narrow it."""
    status = 503


class PacsUnavailable(DicomwebError):
    """The PACS refused or dropped the association, or answered with a failure."""
    status = 502


class PacsTimeout(DicomwebError):
    """The PACS did not answer in time."""
    status = 504
