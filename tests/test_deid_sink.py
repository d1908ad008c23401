"""The folder sink writes in the background: close waits for every file, a write error reaches
the caller, abort removes what was written."""

from __future__ import annotations

import shutil

import pytest

from omi_dsf.deid.instance_io import FolderSink
from omi_dsf.testkit import synthetic


def _instances(n):
    return [synthetic.ct_instance(i) for i in range(n)]


def test_close_returns_when_every_file_is_complete(tmp_path):
    sink = FolderSink(tmp_path / "out")
    sizes = [sink.write(ds, b"x" * (1000 + i)) for i, ds in enumerate(_instances(20))]
    assert sink.close() == str(tmp_path / "out")
    files = sorted((tmp_path / "out").iterdir())
    assert len(files) == 20 and sorted(f.stat().st_size for f in files) == sorted(sizes)
    assert not [f for f in files if f.name.startswith(".part-")]


def test_a_write_error_reaches_the_caller_and_abort_cleans_up(tmp_path):
    sink = FolderSink(tmp_path / "out")
    first, *rest = _instances(4)
    sink.write(first, b"first")
    sink.close()                                  # the first file is written
    shutil.rmtree(tmp_path / "out")               # then the folder disappears
    with pytest.raises(FileNotFoundError):
        for ds in rest:
            sink.write(ds, b"later")
        sink.close()
    sink.abort()
    assert sink.written == []


def test_abort_removes_files_written_in_the_background(tmp_path):
    sink = FolderSink(tmp_path / "out")
    for ds in _instances(10):
        sink.write(ds, b"y" * 4096)
    sink.abort()
    assert list((tmp_path / "out").iterdir()) == []
