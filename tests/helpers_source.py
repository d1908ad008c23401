"""The source of omi_dsf parsed once per test run: the layering and peer rules (test_layers.py,
test_peer.py) each read every module."""

from __future__ import annotations

import ast
import functools
from pathlib import Path


@functools.cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))
