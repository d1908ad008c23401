"""A multi-site DSF test bed on 127.0.0.1: PostgreSQL + per site a FHIR and a BPE server.

Layout of the test bed folder (default `.testbed/`):

    state.json                what runs (pids, ports, URLs), written by `up`
    pki/                      test CA, server and client certificates (generated once)
    allow-list.xml            the generated allow list (copied to every FHIR server)
    postgres/                 the PostgreSQL cluster (data/, postgres.log, unix socket)
    <site>/fhir/              working directory of the site's FHIR server
        conf/{config,jetty}.properties, conf/bundle.xml, conf/log4j2.xml (1.x)
        log/fhir.log, console.log
    <site>/bpe/               working directory of the site's BPE
        conf/..., process/*.jar (the plugin), log/bpe.log, console.log
    <site>/fhir-store/        a requester DIC's own FHIR store (HAPI FHIR JPA, omi_dsf.fhirstore):
                              consent is read from it, results are written into it

The DSF servers are taken from a DSF 1.9 or 2.x distribution (`DSF_HOME`, default /opt/dsf-1.9.0;
see distribution.py), by default the same for every site; one site may run another version
(`site_dsf_homes`), so a 1.9 DIC and a 2.1 provider form one federation. They run with the HTTPS
main classes, which terminate mTLS themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml
from lxml import etree

from omi_dsf.errors import UserError
from omi_dsf.peer import http_client
from omi_dsf.processes import pid_alive, port_free, tail  # noqa: F401 (used by tests and demo too)
from omi_dsf.spec.model import load_spec
from omi_dsf.testbed import allowlist
from omi_dsf.testbed.certs import KEY_PASSWORD, TestCA, thumbprint
from omi_dsf.testbed.distribution import Distribution
from omi_dsf.testbed.postgres import LIQUIBASE_PASSWORD, Cluster

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll is noise

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = Path(".testbed")
DEFAULT_BASE_PORT = 8200
DB_PASSWORD = "db-password"  # test bed only
STORE_PORT = 5               # a requester site's FHIR store listens on base + 20i + 5

FHIR_MAIN = "dev.dsf.fhir.FhirJettyServerHttps"
BPE_MAIN = "dev.dsf.bpe.BpeJettyServerHttps"


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class SiteSpec:
    key: str  # short name, used in folder, db and server names: dic, ai, dic2
    identifier: str  # DSF organization identifier
    name: str
    role: str  # "requester" | "provider" (mapped to an organization-role code by the spec)


SITES = [
    SiteSpec("dic", "dic.omi.test", "Test_DIC", "requester"),
    SiteSpec("ai", "ai.omi.test", "Test_AI_Provider", "provider"),
    SiteSpec("dic2", "dic2.omi.test", "Test_DIC_2", "requester"),
]


def plugin_roles() -> tuple[str, dict[str, str]]:
    """Parent organization and role codes, read from the plugin spec (fallbacks if absent)."""
    parent, roles = "medizininformatik-initiative.de", {"requester": "DIC", "provider": "DMS"}
    spec = REPO / "omi_dsf" / "spec" / "omi.yaml"
    try:
        plugin = (yaml.safe_load(spec.read_text()) or {}).get("plugin", {})
        parent = plugin.get("parent_organization", parent)
        roles.update(plugin.get("roles", {}) or {})
    except (OSError, yaml.YAMLError):
        pass
    return parent, roles


@dataclass
class Server:
    name: str  # dic-fhir, dic-bpe, ...
    site: str
    kind: str  # fhir | bpe
    port: int
    status_port: int
    workdir: str
    url: str
    pid: int | None = None
    dsf_home: str = ""
    dsf_version: str = ""

    @property
    def distribution(self) -> Distribution:
        return Distribution(Path(self.dsf_home), self.dsf_version)

    @property
    def log_file(self) -> Path:
        return Path(self.workdir) / "log" / f"{self.kind}.log"

    @property
    def console_file(self) -> Path:
        return Path(self.workdir) / "console.log"

    @property
    def main_class(self) -> str:
        return FHIR_MAIN if self.kind == "fhir" else BPE_MAIN

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}/{self.kind}/status"


@dataclass
class SiteInfo:
    key: str
    identifier: str
    name: str
    role: str
    role_code: str
    fhir_url: str
    bpe_url: str
    client_cert: str
    client_key: str
    key_password: str = KEY_PASSWORD
    dsf_version: str = ""
    fhir_store_url: str = ""     # the DIC's own FHIR store (HAPI), requester sites only
    fhir_store_dir: str = ""


@dataclass
class State:
    dir: str
    dsf_home: str
    ca_cert: str
    postgres_port: int
    postgres_pid: int | None
    sites: list[SiteInfo]
    servers: list[Server]
    unlisted_client_cert: str
    unlisted_client_key: str
    parent_organization: str
    plugins: list[str] = field(default_factory=list)
    up_seconds: float | None = None

    def save(self) -> None:
        path = Path(self.dir) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, folder: Path) -> "State | None":
        path = folder / "state.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["sites"] = [SiteInfo(**s) for s in raw["sites"]]
        raw["servers"] = [Server(**s) for s in raw["servers"]]
        return cls(**raw)

    def site(self, key_or_identifier: str) -> SiteInfo:
        for s in self.sites:
            if key_or_identifier in (s.key, s.identifier):
                return s
        raise KeyError(key_or_identifier)


# --------------------------------------------------------------------------------------------
# DSF distribution and Java


# --------------------------------------------------------------------------------------------
# processes


def ports_for(base: int, sites: int) -> list[int]:
    """Every port a test bed with this base port and number of sites listens on."""
    ports = [base + 99]
    for i in range(sites):
        b = base + 20 * i
        ports += [b + 1, b + 2, b + 11, b + 12, b + STORE_PORT]
    return ports


def free_base_port(sites: int = 2, start: int = 8300, stop: int = 9800, step: int = 100) -> int:
    """The first base port (4-digit, DSF 1.9 needs that) whose ports are all free right now."""
    for base in range(start, stop, step):
        if all(port_free(p) for p in ports_for(base, sites)):
            return base
    raise UserError(f"no free base port between {start} and {stop}")


def ssl_context(ca: str, cert: str | None = None, key: str | None = None,
                password: str | None = KEY_PASSWORD) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key, password)
    return ctx


def client(state: State, site: str | SiteInfo, *, unlisted: bool = False,
           timeout: float = 30) -> httpx.Client:
    """An httpx client for the site's FHIR server with the site's (or the unlisted) client cert."""
    s = site if isinstance(site, SiteInfo) else state.site(site)
    if unlisted:
        ctx = ssl_context(state.ca_cert, state.unlisted_client_cert, state.unlisted_client_key)
    else:
        ctx = ssl_context(state.ca_cert, s.client_cert, s.client_key, s.key_password)
    return http_client(s.fhir_url, ctx, timeout, headers={"Accept": "application/fhir+json"})


# --------------------------------------------------------------------------------------------
# the test bed


def _props(d: dict[str, object]) -> str:
    lines = ["# generated by python -m omi_dsf testbed up"]
    for k, v in d.items():
        lines.append(f"{k}={str(v).replace(chr(92), '/')}")
    return "\n".join(lines) + "\n"


def activity_definition_urls() -> list[str]:
    """ActivityDefinition urls declared by the plugin's generated FHIR resources."""
    urls = []
    for f in sorted((REPO / "fhir_profiles" / "ActivityDefinition").glob("*.xml")):
        try:
            root = etree.parse(str(f)).getroot()
        except etree.XMLSyntaxError:
            continue
        url = root.find("{http://hl7.org/fhir}url")
        if url is not None and url.get("value"):
            urls.append(url.get("value"))
    return urls


def jar_activity_definition_urls(jars: list[str]) -> list[str]:
    """ActivityDefinition urls inside plugin jars (what the BPEs will publish)."""
    urls: list[str] = []
    for jar in jars:
        try:
            zf = zipfile.ZipFile(jar)
        except (OSError, zipfile.BadZipFile):
            continue
        with zf:
            for name in zf.namelist():
                if not name.endswith(".xml") or "ActivityDefinition" not in name:
                    continue
                try:
                    root = etree.fromstring(zf.read(name))
                except etree.XMLSyntaxError:
                    continue
                url = root.find("{http://hl7.org/fhir}url")
                if root.tag == "{http://hl7.org/fhir}ActivityDefinition" and url is not None:
                    urls.append(url.get("value"))
    return sorted(set(u for u in urls if u))


def _same_jars(wanted: list[Path], process_dir: Path) -> bool:
    """Whether `process_dir` holds exactly the wanted jars, byte for byte."""
    have = {p.name: p for p in process_dir.glob("*.jar")}
    if set(have) != {p.name for p in wanted}:
        return False
    return all(p.exists() and p.read_bytes() == have[p.name].read_bytes() for p in wanted)


def default_plugins() -> list[Path]:
    """The plugin jars in dist/; UserError when the OMI plugin there is not the version the spec
    names (a jar built before the spec changed: its BPE would refuse today's Tasks with 403)."""
    jars = sorted((REPO / "dist").glob("*.jar"))
    spec = load_spec().plugin
    mine = [p for p in jars if p.name.startswith(f"{spec.name}-")]
    if mine and not any(p.name == f"{spec.name}-{spec.version}.jar" for p in mine):
        raise UserError(f"dist/ holds {', '.join(p.name for p in mine)}, not {spec.name}-{spec.version}.jar "
                        f"of omi_dsf/spec/omi.yaml: build the plugin first (python -m omi_dsf build)")
    return jars


class TestBed:
    __test__ = False

    def __init__(self, folder: Path = DEFAULT_DIR, *, sites: int = 2,
                 dsf_home: str | None = None, base_port: int = DEFAULT_BASE_PORT,
                 heap: str | None = None, plugins: list[Path] | None = None,
                 site_dsf_homes: dict[str, str] | None = None, fhir_store: bool = True, out=print):
        self.dir = folder.resolve()
        self.n_sites = sites
        self.dsf_home_arg = dsf_home
        self.site_dsf_homes = dict(site_dsf_homes or {})
        self.base_port = base_port
        self.heap = heap
        self.plugins = plugins
        self.with_fhir_store = fhir_store
        self.out = out

    @contextlib.contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.out(f"another testbed command is working on {self.dir}; waiting for it")
                fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    # ---------------------------------------------------------------- planning
    def distributions(self) -> dict[str, Distribution]:
        """The distribution of every site (its own, else the default), or a UserError."""
        keys = [spec.key for spec in SITES[: self.n_sites]]
        unknown = sorted(set(self.site_dsf_homes) - set(keys))
        if unknown:
            raise UserError(f"--site-dsf-home names no site of this test bed: {', '.join(unknown)} "
                            f"(sites: {', '.join(keys)})")
        default = Distribution.find(self.dsf_home_arg)
        return {k: Distribution.find(self.site_dsf_homes[k]) if k in self.site_dsf_homes else default
                for k in keys}

    def _plan(self, dsf_home: Path) -> State:
        if not 2 <= self.n_sites <= len(SITES):
            raise UserError(f"--sites must be 2 or 3, not {self.n_sites}")
        dists = self.distributions()
        pki = self.dir / "pki"
        ca = TestCA(pki)
        ca.ensure()
        parent, roles = plugin_roles()
        sites, servers = [], []
        for i, spec in enumerate(SITES[: self.n_sites]):
            base = self.base_port + 20 * i
            fhir_port, bpe_port = base + 1, base + 2
            if fhir_port > 9999 - 20:
                raise UserError("DSF 1.9 accepts Endpoint addresses with at most 4-digit ports; "
                                "choose --base-port below 9900")
            cl = ca.issue(f"{spec.key}-client", f"{spec.identifier} client", server=False, client=True)
            fhir_url = f"https://localhost:{fhir_port}/fhir"
            bpe_url = f"https://localhost:{bpe_port}/bpe"
            dist = dists[spec.key]
            store = self.with_fhir_store and spec.role == "requester"
            sites.append(SiteInfo(spec.key, spec.identifier, spec.name, spec.role,
                                  roles.get(spec.role, "DIC"), fhir_url, bpe_url,
                                  str(cl.cert), str(cl.key), dsf_version=dist.version,
                                  fhir_store_url=f"http://127.0.0.1:{base + STORE_PORT}/fhir" if store else "",
                                  fhir_store_dir=str(self.dir / spec.key / "fhir-store") if store else ""))
            for kind, port, url in (("fhir", fhir_port, fhir_url), ("bpe", bpe_port, bpe_url)):
                servers.append(Server(f"{spec.key}-{kind}", spec.key, kind, port, port + 10,
                                      str(self.dir / spec.key / kind), url,
                                      dsf_home=str(dist.home), dsf_version=dist.version))
        unlisted = ca.issue("unlisted-client", "not on the allow list", server=False, client=True)
        plugins = self.plugins if self.plugins is not None else default_plugins()
        return State(str(self.dir), str(dsf_home), str(ca.cert_path), self.base_port + 99, None,
                     sites, servers, str(unlisted.cert), str(unlisted.key), parent,
                     [str(p) for p in plugins])

    def _write_configs(self, st: State) -> None:
        ca = TestCA(self.dir / "pki")
        entries = [
            allowlist.AllowListEntry(s.identifier, s.name, thumbprint(Path(s.client_cert)),
                                     f"{s.key}-fhir.{s.identifier}", s.fhir_url, [s.role_code])
            for s in st.sites
        ]
        bundle = allowlist.build_bundle(entries, st.parent_organization)
        (self.dir / "allow-list.xml").write_bytes(bundle)
        for srv in st.servers:
            site = st.site(srv.site)
            dist = srv.distribution
            wd = Path(srv.workdir)
            for sub in ("conf", "log", "ui") + (("process",) if srv.kind == "bpe" else ()):
                (wd / sub).mkdir(parents=True, exist_ok=True)
            log_config = dist.log_config(srv.kind)
            if log_config is not None:
                shutil.copyfile(log_config, wd / "conf" / "log4j2.xml")
            else:   # a 1.x config left in the folder must not steer a 2.x server
                (wd / "conf" / "log4j2.xml").unlink(missing_ok=True)
            scert = ca.issue(f"{srv.name}-server", "localhost", server=True, client=False)
            props: dict[str, object] = {
                "dev.dsf.server.api.host": "127.0.0.1",
                "dev.dsf.server.api.port": srv.port,
                "dev.dsf.server.status.host": "127.0.0.1",
                "dev.dsf.server.status.port": srv.status_port,
                "dev.dsf.server.context.path": f"/{srv.kind}",
                "dev.dsf.server.certificate": scert.cert,
                "dev.dsf.server.certificate.key": scert.key,
                "dev.dsf.server.certificate.key.password": scert.password,
                "dev.dsf.server.auth.trust.client.certificate.cas": st.ca_cert,
                **dist.settings(srv.kind, st.ca_cert),
            }
            db = f"{site.key}_{srv.kind}"
            if srv.kind == "fhir":
                shutil.copyfile(self.dir / "allow-list.xml", wd / "conf" / "bundle.xml")
                props.update({
                    "dev.dsf.fhir.db.url": f"jdbc:postgresql://127.0.0.1:{st.postgres_port}/{db}",
                    "dev.dsf.fhir.db.liquibase.password": LIQUIBASE_PASSWORD,
                    "dev.dsf.fhir.db.user.group": f"{db}_users",
                    "dev.dsf.fhir.db.user.username": f"{db}_server_user",
                    "dev.dsf.fhir.db.user.password": DB_PASSWORD,
                    "dev.dsf.fhir.db.user.permanent.delete.group": f"{db}_permanent_delete_users",
                    "dev.dsf.fhir.db.user.permanent.delete.username": f"{db}_permanent_delete_user",
                    "dev.dsf.fhir.db.user.permanent.delete.password": DB_PASSWORD,
                    "dev.dsf.fhir.server.base.url": site.fhir_url,
                    "dev.dsf.fhir.server.organization.identifier.value": site.identifier,
                    "dev.dsf.fhir.server.init.bundle": "conf/bundle.xml",
                    "dev.dsf.fhir.client.trust.server.certificate.cas": st.ca_cert,
                    "dev.dsf.fhir.client.certificate": site.client_cert,
                    "dev.dsf.fhir.client.certificate.private.key": site.client_key,
                    "dev.dsf.fhir.client.certificate.private.key.password": site.key_password,
                })
            else:
                props.update({
                    "dev.dsf.bpe.db.url": f"jdbc:postgresql://127.0.0.1:{st.postgres_port}/{db}",
                    "dev.dsf.bpe.db.liquibase.password": LIQUIBASE_PASSWORD,
                    "dev.dsf.bpe.db.user.group": f"{db}_users",
                    "dev.dsf.bpe.db.user.username": f"{db}_server_user",
                    "dev.dsf.bpe.db.user.password": DB_PASSWORD,
                    f"{dist.bpe_engine_user_key()}.group": f"{db}_engine_users",
                    f"{dist.bpe_engine_user_key()}.username": f"{db}_engine_user",
                    f"{dist.bpe_engine_user_key()}.password": DB_PASSWORD,
                    "dev.dsf.bpe.server.base.url": site.bpe_url,
                    "dev.dsf.bpe.fhir.server.base.url": site.fhir_url,
                    "dev.dsf.bpe.fhir.client.trust.server.certificate.cas": st.ca_cert,
                    "dev.dsf.bpe.fhir.client.certificate": site.client_cert,
                    "dev.dsf.bpe.fhir.client.certificate.private.key": site.client_key,
                    "dev.dsf.bpe.fhir.client.certificate.private.key.password": site.key_password,
                    "dev.dsf.bpe.process.plugin.directory": "process",
                    "dev.dsf.bpe.mail.mailOnErrorLogEventDebugLogLocation": "log/bpe.log",
                })
                self._install_plugins(st, wd / "process")
            text = _props(props)
            # both files: the Jetty part reads jetty.properties, the web application config.properties
            (wd / "conf" / "jetty.properties").write_text(text)
            (wd / "conf" / "config.properties").write_text(text)

    def _install_plugins(self, st: State, process_dir: Path) -> None:
        wanted = {Path(p).name: Path(p) for p in st.plugins}
        for old in process_dir.glob("*.jar"):
            if old.name not in wanted:
                old.unlink()
        for name, src in wanted.items():
            if not src.exists():
                raise UserError(f"plugin jar {src} not found")
            shutil.copyfile(src, process_dir / name)

    # ---------------------------------------------------------------- starting
    def _start_server(self, st: State, srv: Server) -> None:
        for port in (srv.port, srv.status_port):
            if not port_free(port):
                raise UserError(f"port {port} on 127.0.0.1 ({srv.name}) is in use; stop whatever "
                                "uses it or pick other ports with --base-port")
        cp = srv.distribution.classpath(srv.kind)
        heap = self.heap or srv.distribution.default_heap(srv.kind)
        cmd = [srv.distribution.java(), f"-Xmx{heap}", "-Xss512k", "-XX:+UseSerialGC",
               "-XX:TieredStopAtLevel=1", "-Djdk.tls.acknowledgeCloseNotify=true",
               f"-Domi.testbed.server={srv.name}", "-cp", ":".join(cp), srv.main_class]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEV_DSF_")}
        console = open(srv.console_file, "ab")
        proc = subprocess.Popen(cmd, cwd=srv.workdir, stdout=console, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        console.close()
        srv.pid = proc.pid
        st.save()

    def _server_alive(self, srv: Server) -> bool:
        return pid_alive(srv.pid, f"-Domi.testbed.server={srv.name} ")

    def _wait_fhir(self, st: State, srv: Server, deadline: float) -> None:
        site = st.site(srv.site)
        last = ""
        while time.monotonic() < deadline:
            if not self._server_alive(srv):
                raise UserError(f"{srv.name} exited during start-up; see {srv.console_file} "
                                f"and {srv.log_file}: {tail(srv.console_file, 3)}")
            try:
                with client(st, site, timeout=10) as c:
                    r = c.get("/metadata")
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
                last = str(exc)
            time.sleep(1)
        raise UserError(f"{srv.name} did not answer GET {site.fhir_url}/metadata over mTLS in "
                        f"time (last: {last}); see {srv.log_file}")

    def _wait_bpe(self, st: State, srv: Server, deadline: float, ad_urls: list[str]) -> None:
        site = st.site(srv.site)
        status_ok = False
        while time.monotonic() < deadline:
            if not self._server_alive(srv):
                raise UserError(f"{srv.name} exited during start-up; see {srv.console_file} "
                                f"and {srv.log_file}: {tail(srv.console_file, 3)}")
            if not status_ok:
                try:
                    with http_client(timeout=5) as c:
                        status_ok = c.get(srv.status_url).status_code == 200
                except httpx.HTTPError:
                    pass
            if status_ok:
                problems = plugin_problems(srv.log_file)
                if problems:
                    raise UserError(f"{srv.name} did not deploy the plugin: {problems[0]} "
                                    f"(all lines: grep -n 'Ignoring process plugin\\|Error' "
                                    f"{srv.log_file})")
                if not st.plugins or not ad_urls:
                    return
                if all(ad_active(st, site, u) for u in ad_urls):
                    return
            time.sleep(1)
        raise UserError(f"{srv.name} did not become ready (status endpoint and active "
                        f"ActivityDefinitions {ad_urls}) in time; see {srv.log_file}")

    def up(self, timeout: float = 600) -> int:
        for dist in set(self.distributions().values()):  # fail before creating anything
            dist.java()
        with self._locked():
            return self._up(timeout)

    def _up(self, timeout: float) -> int:
        t0 = time.monotonic()
        dsf_home = Distribution.find(self.dsf_home_arg).home
        self.dir.mkdir(parents=True, exist_ok=True)
        old = State.load(self.dir)
        if old is not None:
            running = [s for s in old.servers if self._server_alive(s)]
            wanted_versions = {k: d.version for k, d in self.distributions().items()}
            have_versions = {s.key: s.dsf_version for s in old.sites}
            if running and have_versions != wanted_versions:
                raise UserError(f"the test bed in {self.dir} runs DSF {_versions(have_versions)}, not "
                                f"{_versions(wanted_versions)}; stop it first (testbed down --dir {self.dir})")
            stores_up = all(fhir_store(s).running() for s in old.sites if s.fhir_store_dir) and \
                all(bool(s.fhir_store_dir) == (self.with_fhir_store and s.role == "requester") for s in old.sites)
            if len(running) == len(old.servers) and stores_up and Cluster(self.dir / "postgres",
                                                                          old.postgres_port).pid():
                wanted = self.plugins if self.plugins is not None else default_plugins()
                bpes = [s for s in old.servers if s.kind == "bpe"]
                if all(_same_jars(wanted, Path(b.workdir) / "process") for b in bpes):
                    self.out(f"test bed in {self.dir} is already running ({len(old.sites)} "
                             "sites); `testbed status` shows it")
                    return 0
                self.out("plugin jars changed: restarting the BPEs with "
                         + (", ".join(p.name for p in wanted) or "no plugin"))
                self._stop(bpes)
        st = self._plan(dsf_home)
        if old is not None:  # keep pids of servers still running from an interrupted `up`
            pids = {s.name: s.pid for s in old.servers}
            for s in st.servers:
                s.pid = pids.get(s.name)
        cluster = Cluster(self.dir / "postgres", st.postgres_port)
        if cluster.pid() is None and not port_free(st.postgres_port):
            raise UserError(f"port {st.postgres_port} on 127.0.0.1 (PostgreSQL) is in use; "
                            "pick other ports with --base-port")
        self._write_configs(st)
        st.save()
        cluster.init()
        st.postgres_pid = cluster.start()
        st.save()
        cluster.ensure_databases([f"{s.key}_{k}" for s in st.sites for k in ("fhir", "bpe")])
        self.out(f"PostgreSQL  127.0.0.1:{st.postgres_port}  pid {st.postgres_pid}  "
                 f"log {cluster.log}")

        deadline = t0 + timeout
        # the DICs' own FHIR stores start beside the DSF servers (about a minute each)
        with_store = [site for site in st.sites if site.fhir_store_dir]
        store_pool = ThreadPoolExecutor(max(1, len(with_store)))
        stores = [(site, store_pool.submit(fhir_store(site).up, timeout)) for site in with_store]
        try:
            ad_urls = self._start_dsf_servers(st, deadline)
        finally:
            store_pool.shutdown(wait=False)   # on an error `down` stops the stores once they answer
        for site, fut in stores:
            store_state = fut.result()
            self.out(f"{site.key + '-store':<9} {site.fhir_store_url:<34} pid {store_state.pid:<7} "
                     f"log {Path(site.fhir_store_dir) / 'fhir-store.log'}")
        st.up_seconds = round(time.monotonic() - t0, 1)
        st.save()
        if st.plugins:
            self.out(f"plugins: {', '.join(Path(p).name for p in st.plugins)}; active "
                     f"ActivityDefinitions on every FHIR server: {', '.join(ad_urls) or '-'}")
        else:
            self.out("no plugin jar found in dist/ (run `python -m omi_dsf build`); BPEs run "
                     "with an empty process folder")
        self.out(f"test bed up in {st.up_seconds:.0f} s ({len(st.sites)} sites, state "
                 f"{self.dir / 'state.json'})")
        return 0

    def _start_dsf_servers(self, st: State, deadline: float) -> list[str]:
        """Start the FHIR servers, wait for them, then the BPEs until the plugin's
        ActivityDefinitions are active; the ActivityDefinition URLs waited for."""
        fhir = [s for s in st.servers if s.kind == "fhir"]
        bpe = [s for s in st.servers if s.kind == "bpe"]
        ad_urls = (jar_activity_definition_urls(st.plugins) or activity_definition_urls()) if st.plugins else []
        for group, wait in ((fhir, self._wait_fhir), (bpe, None)):
            for srv in group:
                if not self._server_alive(srv):
                    self._start_server(st, srv)
            with ThreadPoolExecutor(len(group)) as pool:
                if wait is not None:
                    futs = [pool.submit(wait, st, s, deadline) for s in group]
                else:
                    futs = [pool.submit(self._wait_bpe, st, s, deadline, ad_urls) for s in group]
                for f in futs:
                    f.result()
            for srv in group:
                self.out(f"{srv.name:<9} {srv.url:<34} pid {srv.pid:<7} log {srv.log_file}")
        return ad_urls

    # ---------------------------------------------------------------- stopping, status
    def down(self, purge: bool = False, grace: float = 30) -> int:
        if not self.dir.exists():
            self.out(f"no test bed in {self.dir}; nothing to stop")
            return 0
        with self._locked():
            return self._down(purge, grace)

    def _down(self, purge: bool, grace: float) -> int:
        st = State.load(self.dir)
        if st is None:
            self.out(f"no test bed state in {self.dir}; nothing to stop")
            if purge and self.dir.exists():
                shutil.rmtree(self.dir)
            return 0
        # BPEs first (they hold websockets to their FHIR server), then the FHIR servers
        self._stop([s for s in st.servers if s.kind == "bpe"], grace)
        self._stop([s for s in st.servers if s.kind == "fhir"], grace)
        for site in st.sites:
            if site.fhir_store_dir and Path(site.fhir_store_dir).exists():
                fhir_store(site, self.out).down(grace)
        cluster = Cluster(self.dir / "postgres", st.postgres_port)
        if cluster.pid() is not None:
            cluster.stop()
            self.out(f"stopped PostgreSQL (pid {st.postgres_pid})")
        for s in st.servers:
            s.pid = None
        st.postgres_pid = None
        st.save()
        if purge:
            cluster.remove()
            shutil.rmtree(self.dir)
            self.out(f"removed {self.dir}")
        return 0

    def _stop(self, servers: list[Server], grace: float = 30) -> None:
        """SIGTERM the given servers (by pid), SIGKILL what is still alive after `grace` s."""
        stopping = [s for s in servers if self._server_alive(s)]
        for s in stopping:
            try:
                os.kill(s.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace
        while time.monotonic() < end and any(self._server_alive(s) for s in stopping):
            time.sleep(0.3)
        for s in stopping:
            if self._server_alive(s):
                log.warning("%s (pid %s) ignored SIGTERM, killing it", s.name, s.pid)
                try:
                    os.kill(s.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for s in stopping:
            for _ in range(50):
                if not pid_alive(s.pid):
                    break
                time.sleep(0.1)
            self.out(f"stopped {s.name} (pid {s.pid})")

    def _server(self, name: str) -> tuple[State, Server]:
        st = State.load(self.dir)
        if st is None:
            raise UserError(f"no test bed in {self.dir}")
        srv = next((s for s in st.servers if s.name == name), None)
        if srv is None:
            raise UserError(f"no server {name}; known: {', '.join(s.name for s in st.servers)}")
        return st, srv

    def stop_server(self, name: str) -> None:
        """Stop one server (e.g. ai-fhir), as if its site went away."""
        self._stop([self._server(name)[1]])

    def start_server(self, name: str, timeout: float = 300) -> None:
        """Start one stopped server again; returns when it answers."""
        st, srv = self._server(name)
        self._start_server(st, srv)
        deadline = time.monotonic() + timeout
        if srv.kind == "fhir":
            self._wait_fhir(st, srv, deadline)
        else:
            self._wait_bpe(st, srv, deadline, [])

    def restart(self, name: str, timeout: float = 300) -> None:
        """Stop one server and start it again; returns when it answers."""
        self.stop_server(name)
        self.start_server(name, timeout)

    def status(self) -> int:
        st = State.load(self.dir)
        if st is None:
            self.out(f"no test bed in {self.dir} (run `python -m omi_dsf testbed up`)")
            return 1
        pg = Cluster(self.dir / "postgres", st.postgres_port).pid()
        versions = {s.key: s.dsf_version for s in st.sites}
        self.out(f"test bed {self.dir}  DSF {_versions(versions)}  (last up took {st.up_seconds} s)")
        self.out(f"  {'postgres':<9} {'running' if pg else 'stopped':<8} "
                 f"127.0.0.1:{st.postgres_port:<26} pid {pg or '-':<7} "
                 f"log {self.dir / 'postgres' / 'postgres.log'}")
        all_up = bool(pg)
        for s in st.servers:
            alive = self._server_alive(s)
            all_up &= alive
            self.out(f"  {s.name:<9} {'running' if alive else 'stopped':<8} {s.url:<36} "
                     f"DSF {s.dsf_version or '?':<6} pid {(s.pid if alive else '-'):<7} log {s.log_file}")
        for site in st.sites:
            if site.fhir_store_dir:
                alive = fhir_store(site).running()
                all_up &= alive
                self.out(f"  {site.key + '-store':<9} {'running' if alive else 'stopped':<8} {site.fhir_store_url:<36} "
                         f"HAPI FHIR  log {Path(site.fhir_store_dir) / 'fhir-store.log'}")
        for site in st.sites:
            self.out(f"  site {site.key}: {site.identifier} ({site.name}, role {site.role_code}) "
                     f"client cert {site.client_cert}")
        self.out(f"  plugins: {', '.join(Path(p).name for p in st.plugins) or 'none'}")
        return 0 if all_up else 3

    def log_path(self, server: str | None) -> list[Path]:
        st = State.load(self.dir)
        if st is None:
            raise UserError(f"no test bed in {self.dir}")
        stores = {f"{s.key}-store": Path(s.fhir_store_dir) / "fhir-store.log" for s in st.sites if s.fhir_store_dir}
        if server in (None, "all"):
            return [self.dir / "postgres" / "postgres.log"] + [s.log_file for s in st.servers] + list(stores.values())
        if server in stores:
            return [stores[server]]
        if server == "postgres":
            return [self.dir / "postgres" / "postgres.log"]
        for s in st.servers:
            if s.name == server:
                return [s.log_file]
            if server == f"{s.name}-console":
                return [s.console_file]
        names = ["postgres"] + [s.name for s in st.servers] + list(stores)
        raise UserError(f"unknown server {server!r}; one of {', '.join(names)} "
                        "(or <server>-console)")


def fhir_store(site: SiteInfo, out=lambda *_: None):
    """The requester site's own FHIR store (started by `up`): it validates what it is sent (R4;
    the MII profiles are not loaded in a test bed, so claiming one is a warning)."""
    from omi_dsf.fhirstore import FhirStore

    port = int(site.fhir_store_url.rsplit(":", 1)[1].split("/")[0])
    return FhirStore(Path(site.fhir_store_dir), port=port, validate=True, unknown_profiles="warning", out=out)


@contextlib.contextmanager
def running_testbed(folder: Path, *, dsf_home: str | None = None, site_dsf_homes: dict[str, str] | None = None,
                    timeout: float = 900, out=print):
    """The test bed running in `folder` (used as it is), else one brought up there on the first free
    base port from 8400 with the given distribution(s) and brought down again afterwards."""
    st = State.load(folder)
    bed = None
    if not (st and all(pid_alive(s.pid) for s in st.servers)):
        bed = TestBed(folder, base_port=free_base_port(2, start=8400), dsf_home=dsf_home,
                      site_dsf_homes=site_dsf_homes, out=out)
        bed.up(timeout=timeout)
        st = State.load(folder)
    try:
        yield st
    finally:
        if bed is not None:
            bed.down()


# --------------------------------------------------------------------------------------------
# helpers shared with the tests


def _versions(by_site: dict[str, str]) -> str:
    """"2.1.0" when every site runs it, else "1.9.0 (dic), 2.1.0 (ai)"."""
    if len(set(by_site.values())) == 1:
        return next(iter(by_site.values())) or "?"
    return ", ".join(f"{v or '?'} ({k})" for k, v in by_site.items())


# BPE log lines that say a plugin, one of its parts, or one of its classes at run time was not
# usable: at start (jar, plugin, BPMN model, FHIR resource ignored; Spring context) and later
# (a listener or delegate the BPE could not create, e.g. a class the DSF 2.x loader rewrote badly).
PLUGIN_PROBLEM = re.compile(
    r"Ignoring (process plugin|BPMN model|FHIR resource|\S+\.jar: )"
    r"|Unable to create spring application context|Error loading process plugins"
    r"|Error while executing process plugins resource bundle"
    r"|Unable to create \S+ for |NoClassDefFoundError"
    # a user task the plugin's glue could not complete, as the BPE reports it (WARN, with the cause; DSF
    # 1.9 also logs a bare DEBUG line before the stack trace); not the answer to a work item whose process
    # instance is gone (the BPE finds no task with that id: docs/testbed.md)
    r"|(?:WARN|ERROR)\s+\S+ - Unable to complete UserTask(?!: \S*NullValueException - Cannot find task)")


def plugin_problems(bpe_log: Path, since: int = 0) -> list[str]:
    """BPE log lines saying that a plugin (or one of its parts) was not deployed or not usable;
    only those after byte offset `since` (a log size taken earlier)."""
    try:
        with open(bpe_log, "rb") as fh:
            fh.seek(since)
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if PLUGIN_PROBLEM.search(ln)]


def ad_active(st: State, site: SiteInfo, url: str) -> bool:
    try:
        with client(st, site, timeout=10) as c:
            r = c.get("/ActivityDefinition", params={"url": url, "status": "active"})
        return r.status_code == 200 and (r.json().get("total") or 0) > 0
    except (httpx.HTTPError, ssl.SSLError, OSError, ValueError):
        return False
