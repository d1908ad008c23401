"""Start, inspect and stop the DIC's FHIR store: the HAPI FHIR JPA server (R4) of fhir-store/.

Layout of the store folder (`--dir`):

    fhir-store.properties   the settings the Java side reads (no secrets, only file names)
    state.json              what runs: pid, port, FHIR base URL, database, started/ready times
    fhir-store.log          the server's log;  console.log  its stdout/stderr (start-up errors)
    db/                     the H2 database (default; PostgreSQL with --db-url)
    tls/                    keystore.p12 and its password file (with --tls-cert/--tls-key)

The server listens on 127.0.0.1 only; its FHIR base is http(s)://127.0.0.1:PORT/fhir.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from omi_dsf.errors import UserError
from omi_dsf.peer import Peer
from omi_dsf.processes import pid_alive, port_free, tail

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "fhir-store"
JAR = MODULE / "target" / "fhir-store.jar"
LIB = MODULE / "target" / "lib"
MAIN = "org.omi.fhirstore.FhirStoreMain"
DEFAULT_PORT = 8090
DEFAULT_HEAP = "768m"


class BuildFailed(UserError):
    pass


def _sources_newer_than_jar() -> bool:
    if not JAR.is_file() or not LIB.is_dir():
        return True
    built = JAR.stat().st_mtime
    return any(p.stat().st_mtime > built for p in [MODULE / "pom.xml", *(MODULE / "src").rglob("*")] if p.is_file())


def build(force: bool = False) -> Path:
    """`mvn package` of fhir-store/ when the jar is missing or older than its sources."""
    if not force and not _sources_newer_than_jar():
        return JAR
    if shutil.which("mvn") is None:
        raise BuildFailed("Maven (mvn) is not installed; run tools/setup.sh")
    log.info("building the FHIR store (mvn package in %s)", MODULE)
    proc = subprocess.run(["mvn", "-B", "-q", "-f", str(MODULE / "pom.xml"), "package"],
                          capture_output=True, text=True,
                          env={**os.environ, "MAVEN_OPTS": os.environ.get("MAVEN_OPTS", "-Xmx1g")})
    if proc.returncode != 0 or not JAR.is_file():
        errors = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line]
        raise BuildFailed("building fhir-store/ failed: " + (errors[0] if errors else f"mvn exit {proc.returncode}"))
    return JAR


@dataclass
class State:
    pid: int | None = None
    port: int = DEFAULT_PORT
    base_url: str = ""
    database: str = ""
    tls: bool = False
    ca_file: str | None = None
    started: str = ""
    ready_seconds: float | None = None

    @classmethod
    def load(cls, folder: Path) -> "State | None":
        try:
            data = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, folder: Path) -> None:
        tmp = folder / "state.json.part"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(folder / "state.json")


def _h2_url(folder: Path) -> str:
    # AUTO_SERVER off: one process owns the file; the lock says so to a second one.
    return f"jdbc:h2:file:{(folder / 'db' / 'fhir').resolve()};DB_CLOSE_ON_EXIT=FALSE"


def _keystore(folder: Path, cert_file: str, key_file: str, key_password_file: str | None = None) -> tuple[Path, Path]:
    """A PKCS#12 keystore for Jetty from a PEM certificate (chain) and key, with a random password."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import (BestAvailableEncryption, load_pem_private_key,
                                                              pkcs12)
    try:
        certs = x509.load_pem_x509_certificates(Path(cert_file).read_bytes())
        key_pw = Path(key_password_file).read_text().splitlines()[0].encode() if key_password_file else None
        key = load_pem_private_key(Path(key_file).read_bytes(), password=key_pw)
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise UserError(f"--tls-cert/--tls-key: cannot read the PEM certificate and key "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'empty file'})") from None
    tls = folder / "tls"
    tls.mkdir(mode=0o700, exist_ok=True)
    password = secrets.token_urlsafe(24)
    pw_file = tls / "keystore.password"
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o600)
    store = tls / "keystore.p12"
    store.write_bytes(pkcs12.serialize_key_and_certificates(b"fhir-store", key, certs[0], certs[1:] or None,
                                                            BestAvailableEncryption(password.encode())))
    store.chmod(0o600)
    return store, pw_file


class FhirStore:
    """One FHIR store in one folder. `up()` is safe to call when it already runs."""

    def __init__(self, folder: Path, *, port: int | None = None, heap: str | None = None,
                 db_url: str | None = None, db_user: str | None = None, db_password_file: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, tls_ca: str | None = None,
                 tls_key_password_file: str | None = None, validate: bool = False,
                 unknown_profiles: str = "error", out=print):
        self.dir = Path(folder).resolve()
        self.port = port
        self.heap = heap or DEFAULT_HEAP
        self.db_url = db_url
        self.db_user = db_user
        self.db_password_file = db_password_file
        self.tls_cert, self.tls_key, self.tls_ca = tls_cert, tls_key, tls_ca
        self.tls_key_password_file = tls_key_password_file
        self.validate = validate
        if unknown_profiles not in ("error", "warning"):
            raise UserError(f"--unknown-profiles must be error or warning, not {unknown_profiles!r}")
        self.unknown_profiles = unknown_profiles
        self.out = out
        if bool(tls_cert) != bool(tls_key):
            raise UserError("--tls-cert and --tls-key go together")
        if db_url and not db_url.startswith(("jdbc:postgresql:", "jdbc:h2:")):
            raise UserError("--db-url must be jdbc:postgresql://HOST:PORT/DB (or a jdbc:h2: URL)")

    # ------------------------------------------------------------------ helpers
    @property
    def needle(self) -> str:
        return f"-Domi.fhirstore.dir={self.dir} "

    def state(self) -> State | None:
        return State.load(self.dir)

    def running(self, st: State | None = None) -> bool:
        st = st or self.state()
        return bool(st and pid_alive(st.pid, self.needle))

    @contextlib.contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def client(self, timeout: float = 30) -> httpx.Client:
        """An httpx client for the running store's FHIR base."""
        st = self.state()
        if st is None:
            raise UserError(f"no FHIR store in {self.dir} (run: python -m omi_dsf fhir-store up --dir {self.dir})")
        return _client(st, timeout)

    # ------------------------------------------------------------------ up
    def up(self, timeout: float = 300) -> State:
        with self._locked():
            st = self.state()
            if self.running(st):
                self.out(f"FHIR store already runs at {st.base_url} (pid {st.pid})")
                return st
            build()
            port = self.port or (st.port if st else DEFAULT_PORT)
            if not port_free(port):
                raise UserError(f"port {port} on 127.0.0.1 is in use; stop whatever uses it or pick another with --port")
            st = self._start(port)
            self._wait(st, timeout)
            self.out(f"FHIR store at {st.base_url} (pid {st.pid}, ready after {st.ready_seconds:.0f} s, "
                     f"database {st.database})")
            return st

    def _settings(self, port: int) -> tuple[Path, State]:
        tls = bool(self.tls_cert)
        lines = ["host=127.0.0.1", f"port={port}", f"db.url={self.db_url or _h2_url(self.dir)}",
                 f"validation.requests={'true' if self.validate else 'false'}",
                 f"validation.unknown_profiles={self.unknown_profiles}"]
        if self.db_user:
            lines.append(f"db.user={self.db_user}")
        if self.db_password_file:
            lines.append(f"db.password.file={Path(self.db_password_file).resolve()}")
        if tls:
            store, pw = _keystore(self.dir, self.tls_cert, self.tls_key, self.tls_key_password_file)
            lines += [f"tls.keystore={store}", f"tls.keystore.password.file={pw}"]
        path = self.dir / "fhir-store.properties"
        # Properties files treat backslashes specially; paths here have none on Linux.
        path.write_text("# written by omi_dsf.fhirstore; read by org.omi.fhirstore.FhirStoreMain\n"
                        + "\n".join(lines) + "\n")
        scheme = "https" if tls else "http"
        db = "PostgreSQL" if (self.db_url or "").startswith("jdbc:postgresql:") else "H2"
        ca = str(Path(self.tls_ca or self.tls_cert).resolve()) if tls else None
        return path, State(port=port, base_url=f"{scheme}://127.0.0.1:{port}/fhir", database=db, tls=tls, ca_file=ca)

    def _start(self, port: int) -> State:
        java = shutil.which("java")
        if java is None:
            raise UserError("java is not installed (JDK 17 or later); run tools/setup.sh")
        settings, st = self._settings(port)
        cmd = [java, f"-Xmx{self.heap}", "-Xss512k", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
               f"-Domi.fhirstore.dir={self.dir}", f"-Domi.fhirstore.log={self.dir / 'fhir-store.log'}",
               "-cp", f"{JAR}:{LIB}/*", MAIN, str(settings)]
        with open(self.dir / "console.log", "ab") as console:
            proc = subprocess.Popen(cmd, cwd=self.dir, stdout=console, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        st.pid = proc.pid
        st.started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        st.save(self.dir)
        (self.dir / "fhir-store.pid").write_text(f"{proc.pid}\n")
        self._proc = proc
        return st

    def _wait(self, st: State, timeout: float) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout
        last = ""
        while time.monotonic() < deadline:
            proc = getattr(self, "_proc", None)
            # our own child: its exit status decides (a read of /proc/PID/cmdline while the Java
            # launcher execs can come back empty); a store started by another process: its pid
            exited = proc.poll() is not None if proc is not None else not pid_alive(st.pid, self.needle)
            if exited:
                code = proc.poll() if proc is not None else None
                how = ("" if code is None else f"killed by signal {-code}" if code < 0 else f"exit code {code}")
                msg = tail(self.dir / "console.log", 1) or tail(self.dir / "fhir-store.log", 2) or "no output"
                raise UserError(f"the FHIR store exited during start-up ({how or 'pid ' + str(st.pid) + ' gone'}): "
                                f"{msg} (see {self.dir / 'console.log'})")
            try:
                with _client(st, 10) as c:
                    r = c.get("/metadata")
                if r.status_code == 200:
                    st.ready_seconds = round(time.monotonic() - t0, 1)
                    st.save(self.dir)
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(1)
        self._stop(st)
        raise UserError(f"the FHIR store did not answer GET {st.base_url}/metadata within {timeout:.0f} s "
                        f"(last: {last}); see {self.dir / 'fhir-store.log'}")

    # ------------------------------------------------------------------ status, down
    def status(self) -> int:
        st = self.state()
        if st is None:
            self.out(f"no FHIR store in {self.dir}")
            return 1
        if not self.running(st):
            self.out(f"FHIR store in {self.dir} is stopped (last at {st.base_url})")
            return 1
        self.out(f"FHIR store runs at {st.base_url} (pid {st.pid}, database {st.database}, since {st.started})")
        return 0

    def down(self, grace: float = 30) -> int:
        with self._locked():
            st = self.state()
            if st is None or not self.running(st):
                self.out(f"no running FHIR store in {self.dir}; nothing to stop")
                return 0
            pid = st.pid
            self._stop(st, grace)
            self.out(f"stopped the FHIR store (pid {pid})")
            return 0

    def _stop(self, st: State, grace: float = 30) -> None:
        if self.running(st):
            with contextlib.suppress(ProcessLookupError):
                os.kill(st.pid, signal.SIGTERM)
            end = time.monotonic() + grace
            while time.monotonic() < end and self.running(st):
                time.sleep(0.3)
            if self.running(st):
                log.warning("the FHIR store (pid %s) ignored SIGTERM; killing it", st.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(st.pid, signal.SIGKILL)
        proc = getattr(self, "_proc", None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        st.pid = None
        st.save(self.dir)
        (self.dir / "fhir-store.pid").unlink(missing_ok=True)


def _client(st: State, timeout: float) -> httpx.Client:
    peer = Peer(url=st.base_url, ca_file=st.ca_file if st.tls else None, timeout=timeout, where="fhir-store")
    return peer.client(headers={"Accept": "application/fhir+json"})
