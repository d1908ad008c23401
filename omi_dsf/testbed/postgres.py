"""One PostgreSQL cluster inside the test bed folder (Debian's PostgreSQL binaries).

PostgreSQL refuses to run as root; when we are root, the cluster belongs to the `postgres` system
user and every PostgreSQL program runs as that user. It listens on 127.0.0.1:<port> (the DSF
servers connect over JDBC/TCP) and keeps its unix socket in the cluster folder.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from omi_dsf.errors import UserError

LIQUIBASE_USER = "liquibase_user"
LIQUIBASE_PASSWORD = "liquibase-password"  # test bed only


def find_bin_dir() -> Path:
    env = os.environ.get("OMI_PG_BIN")
    candidates = [env] if env else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    raise UserError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin; "
        "install Debian's postgresql package or set OMI_PG_BIN"
    )


class Cluster:
    def __init__(self, folder: Path, port: int):
        self.folder = folder  # <testbed>/postgres
        self.data = folder / "data"
        self.log = folder / "postgres.log"
        self.port = port
        # unix socket paths are limited to ~107 bytes; fall back to a short folder under /tmp
        self.socket_dir = folder
        if len(str(folder / f".s.PGSQL.{port}")) > 100:
            digest = hashlib.sha1(str(folder).encode()).hexdigest()[:12]
            self.socket_dir = Path("/tmp") / f"omi-testbed-pg-{digest}"
        self.bin = find_bin_dir()
        self._user = self._run_as_user()

    # -- running PostgreSQL programs as a non-root user -----------------------------------
    @staticmethod
    def _run_as_user() -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise UserError(
                "running as root, but there is no 'postgres' system user to own the test bed's "
                "PostgreSQL cluster (create it with: useradd --system postgres)"
            ) from None

    def _chown(self, path: Path) -> None:
        if self._user:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _pg(self, prog: str, *args: str, check: bool = True, timeout: float = 120,
            stdin: str | None = None) -> subprocess.CompletedProcess:
        kwargs = {}
        if self._user:
            kwargs = dict(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
               "HOME": str(self.folder)}
        proc = subprocess.run(
            [str(self.bin / prog), *args], capture_output=True, text=True, env=env,
            cwd=self.folder, timeout=timeout, input=stdin, **kwargs,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{prog} {' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    # -- lifecycle -------------------------------------------------------------------------
    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._chown(self.folder)
        if self._user:  # the postgres user must be able to reach its folder
            p = self.folder
            while p != p.parent:
                p = p.parent
                st = p.stat()
                if not st.st_mode & 0o001:
                    raise UserError(f"{p} is not searchable by the 'postgres' user "
                                    f"(chmod o+x {p}), needed for the test bed's PostgreSQL")
        if self.socket_dir != self.folder:
            self.socket_dir.mkdir(mode=0o755, exist_ok=True)
            self._chown(self.socket_dir)
        if self.initialised():
            return
        pwfile = self.folder / "superuser.pw"
        pwfile.write_text("postgres\n")
        self._chown(pwfile)
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=scram-sha-256",
                 "--auth-local=trust", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8")
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                "\n# OMI DSF test bed\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "max_connections = 200\n"
                "shared_buffers = 64MB\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )

    def pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def start(self) -> int:
        if self.pid() is None:
            self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", f"-p {self.port}",
                     "-w", "-t", "60", "start")
        pid = self.pid()
        if pid is None:
            raise RuntimeError(f"PostgreSQL did not start, see {self.log}")
        return pid

    def stop(self) -> None:
        if self.initialised() and self.pid() is not None:
            self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop",
                     check=False)

    def psql(self, sql: str, db: str = "postgres") -> str:
        proc = self._pg("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
                        "-p", str(self.port), "-U", "postgres", "-d", db, "-At", stdin=sql)
        return proc.stdout

    def ensure_databases(self, names: list[str]) -> None:
        exists = self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{LIQUIBASE_USER}';").strip()
        if not exists:
            self.psql(f"CREATE ROLE {LIQUIBASE_USER} LOGIN PASSWORD '{LIQUIBASE_PASSWORD}' "
                      "NOSUPERUSER INHERIT CREATEDB CREATEROLE;")
        have = set(self.psql("SELECT datname FROM pg_database;").split())
        for name in names:
            if name not in have:
                self.psql(f"CREATE DATABASE {name} OWNER {LIQUIBASE_USER};")
                self.psql(f"GRANT ALL PRIVILEGES ON DATABASE {name} TO {LIQUIBASE_USER};")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.socket_dir != self.folder:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
