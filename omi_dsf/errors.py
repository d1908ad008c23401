"""Errors that more than one part raises or catches."""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


class RetryableError(Exception):
    """A failure worth retrying (a peer down, a timeout) whose message is fit for the requester's
    Task: after the last attempt the worker runtime reports it instead of just the exception's type."""
