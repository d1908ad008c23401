"""The site's secret key: from a file or an environment variable, never from the command line.

One key drives the embedded pseudonyms, the UID remapping and the per-patient date shift; each
use derives its own value with a distinct label, so one output never reveals another.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

KEY_ENV = "OMI_DEID_KEY"            # the key itself (at least 16 characters)
KEY_FILE_ENV = "OMI_DEID_KEY_FILE"  # or a path to a file holding it
MIN_KEY_BYTES = 16


class KeyError_(ValueError):
    """No usable key."""


def load_key(key_file: str | os.PathLike | None = None) -> bytes:
    """The key from `key_file`, else $OMI_DEID_KEY_FILE, else $OMI_DEID_KEY."""
    path = key_file or os.environ.get(KEY_FILE_ENV)
    if path:
        try:
            raw = Path(path).read_bytes().strip()
        except OSError as exc:
            raise KeyError_(f"cannot read key file {path}: {exc.strerror}") from None
        source = f"key file {path}"
    elif os.environ.get(KEY_ENV):
        raw = os.environ[KEY_ENV].encode().strip()
        source = f"${KEY_ENV}"
    else:
        raise KeyError_(f"no key: give --key-file, ${KEY_FILE_ENV} or ${KEY_ENV}")
    if len(raw) < MIN_KEY_BYTES:
        raise KeyError_(f"{source} holds {len(raw)} bytes; at least {MIN_KEY_BYTES} are needed")
    return raw


def derive(key: bytes, label: str, *parts: str) -> bytes:
    """HMAC-SHA256 of the parts under a label; NUL separators keep ("a","bc") apart from ("ab","c")."""
    msg = "\0".join((label, *parts)).encode("utf-8")
    return hmac.new(key, msg, hashlib.sha256).digest()
