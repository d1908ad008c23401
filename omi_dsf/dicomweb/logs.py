"""Keep patient data out of the gateway's log at its default level.

pydicom reports what it finds odd in a data set with the value itself, as a log record on the
``pydicom`` logger and as a Python warning (``Invalid value for VR DA: '1971-03-14'``); the
gateway handles every such case itself (a refused part, a left-out attribute), so those lines
only leak values. They are dropped unless the gateway's own logger is at DEBUG (``--verbose``).
Error lines of the gateway name the path with its UIDs replaced (:func:`guard.redact`).
"""

from __future__ import annotations

import logging
import traceback
import warnings

GATEWAY_LOGGER = "omi_dsf.dicomweb"


class _PydicomRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return logging.getLogger(GATEWAY_LOGGER).isEnabledFor(logging.DEBUG)


def quiet_pydicom() -> None:
    """Drop pydicom's log records and warnings (idempotent; process-wide, as logging is)."""
    pydicom_log = logging.getLogger("pydicom")
    if not any(isinstance(f, _PydicomRecords) for f in pydicom_log.filters):
        pydicom_log.addFilter(_PydicomRecords())
    if not logging.getLogger(GATEWAY_LOGGER).isEnabledFor(logging.DEBUG):
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def without_message(exc: BaseException, frames: int = 6) -> str:
    """An exception for a log line: its type and where it came from, not its message (pydicom's
    and pynetdicom's messages may quote values)."""
    return f"{type(exc).__name__} (message withheld: it may hold patient data)\n" + \
        "".join(traceback.format_tb(exc.__traceback__)[-frames:])
