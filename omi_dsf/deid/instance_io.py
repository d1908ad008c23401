"""Where the send step reads the study's original instances from: a folder, or DICOMweb
(dicomweb_io: WADO-RS), or a kind another part registers; and the folder sink of the `deid` command.

A source yields (name, instance) pairs one at a time (an instance is a pydicom Dataset, the
bytes of a Part 10 file, or a path), and lists the study's original UIDs up front (`uids()`:
StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID of every instance at least), so that the
leak check of the first instance already knows the UIDs of the last.
A source is chosen by "kind" from the site configuration (`InstanceIoSettings`, omi_dsf.deid.config);
other parts register more kinds. A factory gets the settings and the step's parameters.
"""

from __future__ import annotations

import io
import os
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import pydicom
from pydicom.dataset import Dataset


class SourceError(Exception):
    """The source cannot deliver the study (not found, refused); retrying will not help."""


class InstanceSource(Protocol):
    """The send step calls `uids()` before it reads the first instance."""
    def __iter__(self) -> Iterator[tuple[str, Any]]: ...
    def uids(self) -> set[str]: ...   # the study's original UIDs


SourceFactory = Callable[[Any, Mapping[str, Any]], InstanceSource]   # (InstanceIoSettings, params)
SOURCES: dict[str, SourceFactory] = {}


def register_source(kind: str, factory: SourceFactory) -> None:
    SOURCES[kind] = factory


def _load_kinds(kind: str) -> None:
    if kind == "dicomweb" and kind not in SOURCES:
        from . import dicomweb_io  # noqa: F401  (registers itself; imported only when used)


def known_kinds() -> set[str]:
    """The kinds a source may have (dicomweb registers itself when first used)."""
    return set(SOURCES) | {"dicomweb"}


def open_source(config, params: Mapping[str, Any]) -> InstanceSource:
    """The source `config` (InstanceIoSettings) describes."""
    kind = config.kind
    _load_kinds(kind)
    if kind not in SOURCES:
        raise ValueError(f"unknown instance source kind {kind!r} (known: {', '.join(sorted(SOURCES))})")
    return SOURCES[kind](config, params)


class FolderSource:
    """Every regular file under a folder, in name order (DICOMDIR skipped), as paths."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"input folder {self.path} does not exist")

    def __iter__(self) -> Iterator[tuple[str, Path]]:
        for p in sorted(self.path.rglob("*")):
            if p.is_file() and p.name.upper() != "DICOMDIR" and not p.name.startswith("."):
                yield str(p.relative_to(self.path)), p

    def uids(self) -> set[str]:
        """The study, series and SOP instance UIDs in the headers of the folder's files (a file
        that does not read is left to the de-identification, which refuses it)."""
        found: set[str] = set()
        for _, path in self:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                     specific_tags=[0x0020000D, 0x0020000E, 0x00080018])
                for tag in (0x0020000D, 0x0020000E, 0x00080018):
                    value = ds.get_item(tag).value if tag in ds else None
                    value = value.decode("ascii", "replace") if isinstance(value, bytes) else value
                    if value and str(value).strip("\x00 "):
                        found.add(str(value).strip("\x00 "))
            except Exception:  # pydicom raises many kinds on damaged files
                continue
        return found


class FolderSink:
    """The `deid` command's output: <folder>/<SOPInstanceUID>.dcm, each written to a temporary name
    and renamed when complete.

    Files are written by one background thread while the caller prepares the next instance (the
    disk and the CPU work at once; a bounded queue keeps at most a few instances in memory). A
    write error is raised by the next `write` or by `close`; `close` returns once every file is
    complete, `abort` waits for the thread and deletes what it wrote."""

    QUEUE = 8

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, ds: Dataset, data: bytes | None = None) -> int:
        """Write `data` (the bytes the leak check saw) or, without it, `ds` encoded here."""
        if data is None:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
        uid = ds.get_item(0x00080018).value
        uid = uid.decode("ascii").strip("\x00 ") if isinstance(uid, bytes) else str(uid)
        self._raise_error()
        if self._thread is None:
            self._queue = queue.Queue(self.QUEUE)
            self._thread = threading.Thread(target=self._writer, name="omi-folder-sink", daemon=True)
            self._thread.start()
        self._queue.put((self.path / f"{uid}.dcm", data))
        return len(data)

    def _writer(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None:
                continue            # drain after a failure; the caller is told once
            target, data = job
            tmp = None
            try:
                fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".part-")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, target)
                self.written.append(target)
            except BaseException as exc:  # kept for the caller; the thread goes on draining
                if tmp is not None:
                    Path(tmp).unlink(missing_ok=True)
                self._error = exc

    def _finish(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = self._queue = None

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._finish()
            raise error

    def close(self) -> str:
        self._finish()
        self._raise_error()
        return str(self.path)

    def abort(self) -> None:
        self._finish()
        self._error = None
        for p in self.written:
            p.unlink(missing_ok=True)
        self.written.clear()


def _folder_source(config, params: Mapping[str, Any]) -> FolderSource:
    # "path" may name the study folder by {study_uid} or {business_key}
    return FolderSource(str(config.path).format(**params))


register_source("folder", _folder_source)
