"""Start a real legacy PACS on 127.0.0.1 for tests, benchmarks and the demo.

Two different PACS, both from Debian packages:

* :class:`Dcmqrscp` -- dcmtk ``dcmqrscp``, strictly hierarchical Study Root, C-FIND/C-GET/C-MOVE/C-STORE;
* :class:`Orthanc` -- Orthanc with its DICOMweb plugin (a DIMSE SCP *and* a reference DICOMweb server).

Each runs in a folder of its own on a free port, with ``TCP_NODELAY=1`` (dcmtk reads it; without it
every DIMSE exchange waits for delayed ACKs) and, when a C compiler is present, a tiny LD_PRELOAD
library that turns a wildcard ``bind()`` into a loopback bind (neither program has a bind option).
Use as a context manager; :meth:`stop` kills the process group it started, also after a failure::

    with Dcmqrscp(tmp_path / "pacs", move_destinations={"OMIGW": ("127.0.0.1", 11114)}) as pacs:
        pacs.load(files)
        ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable

import httpx

from omi_dsf.peer import http_client
from omi_dsf.testkit.procs import free_port

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Our own loopback-bind shim: a wildcard IPv4/IPv6 bind() becomes a loopback bind.
_SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind = 0;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in v4;
        memcpy(&v4, addr, sizeof v4);
        if (v4.sin_addr.s_addr == htonl(INADDR_ANY)) {
            v4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&v4, sizeof v4);
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 v6;
        memcpy(&v6, addr, sizeof v6);
        if (memcmp(&v6.sin6_addr, &in6addr_any, sizeof v6.sin6_addr) == 0) {
            v6.sin6_addr = in6addr_loopback;
            return real_bind(fd, (const struct sockaddr *)&v6, sizeof v6);
        }
    }
    return real_bind(fd, addr, len);
}
"""


class PacsError(RuntimeError):
    """The PACS could not be started, loaded or reached."""


def dcmtk_tool(name: str) -> str:
    """Path of a dcmtk command-line tool (Debian's, not a same-named Python script on PATH)."""
    for d in ("/usr/bin", "/bin", "/usr/local/bin"):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    found = shutil.which(name)
    if not found:
        raise PacsError(f"{name} not found: install the Debian package 'dcmtk' (tools/apt-packages.txt)")
    return found


def loopback_shim() -> Path | None:
    """Build (once) and return the LD_PRELOAD loopback-bind library, or None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log.warning("no C compiler: PACS listeners will bind to all interfaces")
        return None
    digest = hashlib.sha256(_SHIM_SOURCE.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "omi_dsf"
    lib = cache / f"bind_loopback-{digest}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "bind_loopback.c"
        src.write_text(_SHIM_SOURCE)
        out = Path(tmp) / lib.name
        r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            log.warning("could not build the loopback-bind shim: %s", r.stderr.strip()[:500])
            return None
        shutil.move(str(out), lib)
    return lib


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise PacsError(f"process exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise PacsError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


class LegacyPacs:
    """A PACS process we own: started in ``workdir``, stopped by its process group id."""

    aet: str
    host = LOOPBACK
    port: int

    def __init__(self, workdir: str | Path, aet: str):
        self.workdir = Path(workdir).resolve()
        self.aet = aet
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "server.log"

    # -- process ---------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ, TCP_NODELAY="1")
        shim = loopback_shim()
        if shim:
            env["LD_PRELOAD"] = f"{shim} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(shim)
        return env

    def _spawn(self, argv: list[str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(argv, cwd=self.workdir, env=self._env(), stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            logf.close()

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self) -> "LegacyPacs":
        raise NotImplementedError

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # our own session: the server and its children
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        else:
            try:  # children of a dead parent (dcmqrscp forks per association)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- data ------------------------------------------------------------------------------------
    # storescu proposes uncompressed syntaxes unless told to propose the file's compressed one
    _PROPOSE = {"1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
                "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.57": "-xs",
                "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
                "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
                "1.2.840.10008.1.2.5": "-xr"}

    def load(self, files: Iterable[str | Path], calling_aet: str = "OMILOADER", timeout: float = 300) -> int:
        """C-STORE the files with dcmtk ``storescu``; returns how many were stored.

        Files are grouped by transfer syntax (compressed ones are proposed as they are); any file
        the PACS did not take is a :class:`PacsError` naming it.
        """
        from pydicom import dcmread

        groups: dict[str, list[str]] = {}
        for f in files:
            ts = str(dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).file_meta
                     .get("TransferSyntaxUID", ""))
            groups.setdefault(self._PROPOSE.get(ts, ""), []).append(str(f))
        sent = 0
        for option, paths in groups.items():
            for i in range(0, len(paths), 500):  # keep argv short
                chunk = paths[i:i + 500]
                argv = [dcmtk_tool("storescu"), *([option] if option else []), "-aet", calling_aet,
                        "-aec", self.aet, "-nh", self.host, str(self.port), *chunk]
                r = subprocess.run(argv, env=dict(os.environ, TCP_NODELAY="1"), capture_output=True,
                                   text=True, timeout=timeout)
                failed = [line for line in r.stderr.splitlines() if "Store Failed" in line]
                if r.returncode != 0 or failed:
                    raise PacsError(f"storescu to {self.aet} failed ({r.returncode}): "
                                    f"{(chr(10).join(failed) or r.stderr.strip())[-800:]}")
                sent += len(chunk)
        return sent


class Dcmqrscp(LegacyPacs):
    """dcmtk ``dcmqrscp``: the strict, hierarchical legacy PACS."""

    def __init__(self, workdir: str | Path, aet: str = "LEGACYPACS", port: int | None = None,
                 move_destinations: dict[str, tuple[str, int]] | None = None,
                 max_pdu: int = 16384, max_studies: int = 500, options: Iterable[str] = ()):
        super().__init__(workdir, aet)
        self.options = list(options)   # more dcmqrscp options, e.g. +xy: prefer JPEG Baseline when accepting
        self.port = port or free_port()
        self.move_destinations = dict(move_destinations or {})
        self.max_pdu = max_pdu
        self.max_studies = min(max_studies, 500)  # dcmqrscp caps it at 500

    def config_text(self) -> str:
        hosts = "\n".join(f"dest{i} = ({aet}, {host}, {port})"
                          for i, (aet, (host, port)) in enumerate(sorted(self.move_destinations.items())))
        return (
            f"NetworkTCPPort  = {self.port}\nMaxPDUSize      = {self.max_pdu}\nMaxAssociations = 64\n\n"
            f"HostTable BEGIN\n{hosts}\nHostTable END\n\nVendorTable BEGIN\nVendorTable END\n\n"
            f"AETable BEGIN\n{self.aet} db RW ({self.max_studies}, 1024mb) ANY\nAETable END\n"
        )

    def association_processes(self) -> int:
        """How many child processes dcmqrscp runs now (it forks one per open association)."""
        return len(self.association_pids())

    def association_pids(self) -> set[int]:
        """The process IDs of dcmqrscp's children now, one per open association (not yet exited)."""
        if self.proc is None:
            return set()
        pids = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                pids.add(int(stat.parent.name))
        return pids

    def start(self) -> "Dcmqrscp":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "db").mkdir(exist_ok=True)
        cfg = self.workdir / "dcmqrscp.cfg"
        cfg.write_text(self.config_text())
        self._spawn([dcmtk_tool("dcmqrscp"), *self.options, "-c", str(cfg), str(self.port)])
        try:
            wait_for_port(self.host, self.port, 20, self.proc)
        except PacsError as exc:
            raise PacsError(f"dcmqrscp did not start: {exc}\n{self.log_tail()}") from None
        return self


class Orthanc(LegacyPacs):
    """Orthanc (+ DICOMweb plugin): a second, different PACS and a reference DICOMweb server."""

    PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

    def __init__(self, workdir: str | Path, aet: str = "ORTHANC", port: int | None = None,
                 http_port: int | None = None,
                 modalities: dict[str, tuple[str, int]] | None = None):
        super().__init__(workdir, aet)
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.modalities = dict(modalities or {})

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict:
        cfg = {
            "Name": f"OMI-TEST-{self.aet}",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "HttpServerEnabled": True, "HttpPort": self.http_port,
            "DicomServerEnabled": True, "DicomAet": self.aet, "DicomPort": self.port,
            "DicomCheckCalledAet": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "SslEnabled": False, "StableAge": 1, "HttpDescribeErrors": True,
            "DicomModalities": {aet.lower(): [aet, host, port] for aet, (host, port) in self.modalities.items()},
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
            "UnknownSopClassAccepted": True,
        }
        if Path(self.PLUGIN).exists():
            cfg["Plugins"] = [self.PLUGIN]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                               "WadoRoot": "/wado", "Ssl": False,
                               "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
        return cfg

    def start(self) -> "Orthanc":
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(exe).exists():
            raise PacsError("Orthanc not found: install the Debian package 'orthanc' (tools/apt-packages.txt)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        self._spawn([exe, str(cfg)])
        try:
            wait_for_port(self.host, self.http_port, 30, self.proc)
            wait_for_port(self.host, self.port, 30, self.proc)
            deadline = time.monotonic() + 30
            with http_client(timeout=2) as http:
                while True:
                    try:
                        if http.get(f"{self.url}/system").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise PacsError("Orthanc REST /system does not answer")
                    time.sleep(0.1)
        except PacsError as exc:
            raise PacsError(f"Orthanc did not start: {exc}\n{self.log_tail()}") from None
        return self

    def instance_count(self) -> int:
        with http_client(timeout=10) as http:
            answer = http.get(f"{self.url}/statistics")
        answer.raise_for_status()
        return int(answer.json()["CountInstances"])
