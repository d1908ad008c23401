"""The transfer's own failure, for the steps to report."""

from __future__ import annotations


class TransferError(Exception):
    """The transfer cannot succeed with these inputs or settings; retrying will not help. The
    message is fit for the requester's Task: counts, AE titles, URLs and setting names, never
    patient data."""
