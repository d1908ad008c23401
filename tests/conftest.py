"""Shared test helpers. Parts keep their own fixtures in their own test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from omi_dsf.testkit.procs import free_port  # noqa: F401  (the one free-port helper; tests import it from here)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


# -- local servers shared by the modules that only read from them ------------------------------------
# A test that changes what a server holds in a way others could see (stops it, stores into it and
# counts, configures it) starts its own.

@pytest.fixture(scope="session")
def dcmqrscp(tmp_path_factory):
    """One dcmtk dcmqrscp (AE title LEGACYPACS) for the session, empty at first: each module loads
    its own study and asks only for that."""
    from omi_dsf.testkit.legacy_pacs import Dcmqrscp

    with Dcmqrscp(tmp_path_factory.mktemp("dcmqrscp")) as pacs:
        yield pacs


@pytest.fixture(scope="session")
def ai_service(tmp_path_factory):
    """The reference AI service as `ai-service --anonymous` (default limits) for the session."""
    from omi_dsf.testkit.ai_service import AiServiceProcess

    with AiServiceProcess(log=tmp_path_factory.mktemp("ai-service") / "ai-service.log", timeout=60) as service:
        yield service


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL cluster (Debian's binaries) on 127.0.0.1 for the session, with a login role
    `omi`; `postgres.new_database()` gives each test its own empty database as a URL."""
    import itertools
    import os
    import shutil
    import tempfile

    from omi_dsf.errors import UserError
    from omi_dsf.testbed.postgres import Cluster

    # not under pytest's own temporary folder: that one is private to us, and the cluster runs as
    # the postgres user when we are root
    folder = Path(tempfile.mkdtemp(prefix="omi-test-pg-"))
    os.chmod(folder, 0o755)
    try:
        cluster = Cluster(folder / "pg", free_port())
    except UserError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(str(exc))
    cluster.init()
    cluster.start()
    cluster.psql("CREATE ROLE omi LOGIN PASSWORD 'omi-test-pw';")
    counter = itertools.count(1)

    def new_database() -> str:
        name = f"t{next(counter)}"
        cluster.psql(f"CREATE DATABASE {name} OWNER omi;")
        return f"postgresql://omi:omi-test-pw@127.0.0.1:{cluster.port}/{name}"

    cluster.new_database = new_database
    try:
        yield cluster
    finally:
        cluster.stop()
        cluster.remove()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def site_db(request, tmp_path) -> str:
    """A fresh, empty site database as a URL: a SQLite file, and (integration) a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'site.db'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture(scope="session")
def fhir_store(tmp_path_factory):
    """One HAPI FHIR JPA server (fhir-store/, H2) for the session: it takes about a minute to start.
    Tests give their resources identifiers of their own and search only for those. It validates
    every resource sent (R4 base specification, refused on error); the MII profiles the resources
    claim are not loaded (their packages are on no registry this machine reaches), so only those
    claims are warnings."""
    from omi_dsf.fhirstore import FhirStore

    store = FhirStore(tmp_path_factory.mktemp("fhir-store"), port=free_port(), validate=True,
                       unknown_profiles="warning", out=lambda *_: None)
    store.up(timeout=600)
    try:
        yield store
    finally:
        store.down()


@pytest.fixture(scope="session")
def kserve_service(tmp_path_factory):
    """The lung model on KServe's model server (`ai-service --server kserve`, its own venv) for the session."""
    from omi_dsf.testkit.ai_service import AiServiceProcess

    with AiServiceProcess(log=tmp_path_factory.mktemp("kserve") / "kserve.log", timeout=120,
                          server="kserve") as service:
        yield service


@pytest.fixture(scope="session")
def mlserver_service(tmp_path_factory):
    """The lung model on MLServer (`ai-service --server mlserver`, its own venv) for the session."""
    from omi_dsf.testkit.ai_service import AiServiceProcess

    with AiServiceProcess(log=tmp_path_factory.mktemp("mlserver") / "mlserver.log", timeout=120,
                          server="mlserver") as service:
        yield service


@pytest.fixture
def seg_without_derivation(monkeypatch):
    """omi_dsf.inference.results makes SEGs whose frames name no source image (no
    DerivationImageSequence), so that their frames cannot be told from the header; gives the real
    SEG maker."""
    from omi_dsf.inference import results
    real = results._segmentation

    def without_derivation(*args):
        seg = real(*args)
        for frame in seg.PerFrameFunctionalGroupsSequence:
            del frame.DerivationImageSequence
        return seg

    monkeypatch.setattr(results, "_segmentation", without_derivation)
    return real


@pytest.fixture
def artifacts_dir() -> Path:
    """Where tests keep things worth looking at after the run (screenshots, reports)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# -- the real DSF test bed, shared by every test module that needs it -------------------------
#
# Every test that uses `dsf_testbed` runs once per DSF version found on this machine (/opt/dsf-1.9.0,
# /opt/dsf-2.1.0, $DSF_HOME): a federation of two sites on that version. A test marked
# `dsf_mixed` also runs on the mixed federations (a 1.9 DIC with a 2.1 provider and the reverse).
# Without any distribution the DSF tests skip, and the summary at the end says so.

import os  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402


@dataclass(frozen=True)
class Federation:
    dic: object    # omi_dsf.testbed.distribution.Distribution
    ai: object

    @property
    def id(self) -> str:
        return f"dsf{self.dic.label}" if self.dic == self.ai else f"dsf{self.dic.label}+{self.ai.label}"


def pytest_configure(config):
    config.addinivalue_line("markers", "dsf_mixed: also run on mixed 1.x/2.x DSF federations")
    config._dsf_runs = {}      # federation id -> {outcome: count}
    config._dsf_skip = None


def pytest_generate_tests(metafunc):
    if "dsf_testbed" not in metafunc.fixturenames:
        return
    from omi_dsf.testbed.distribution import Distribution

    dists = Distribution.present()
    feds = [Federation(d, d) for d in dists]
    if metafunc.definition.get_closest_marker("dsf_mixed"):
        feds += [Federation(a, b) for a in dists for b in dists if a != b]
    if feds:
        metafunc.parametrize("dsf_testbed", feds, ids=[f.id for f in feds], indirect=True, scope="session")
    else:
        metafunc.parametrize("dsf_testbed", [None], ids=["no-dsf"], indirect=True, scope="session")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Count each DSF test's outcome per federation (its call, or its setup when that failed or skipped)."""
    outcome = yield
    report = outcome.get_result()
    callspec = getattr(item, "callspec", None)
    if callspec is None or "dsf_testbed" not in callspec.params:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        fed = callspec.params["dsf_testbed"]
        counts = item.config._dsf_runs.setdefault(fed.id if fed is not None else "no-dsf", {})
        counts[report.outcome] = counts.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line: on which DSF versions the DSF tests ran and how many, or that they did not run."""
    line = dsf_summary(config._dsf_runs, config._dsf_skip)
    if line:
        terminalreporter.write_line(line)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "dsf-summary.txt").write_text(line + "\n")


def dsf_summary(runs: dict, skip_reason: str | None) -> str | None:
    if not runs:
        return None
    ran = {fid: c for fid, c in runs.items() if fid != "no-dsf" and (c.get("passed") or c.get("failed"))}
    if not ran:
        why = skip_reason or "no DSF distribution found"
        return f"DSF tests did NOT run: {why}"
    parts = []
    for fid, c in sorted(ran.items()):
        label = fid.removeprefix("dsf").replace("+", " DIC + ") + (" AI" if "+" in fid else "")
        bad = c.get("failed", 0)
        parts.append(f"DSF {label}: {c.get('passed', 0)} passed" + (f", {bad} FAILED" if bad else "")
                     + (f", {c['skipped']} skipped" if c.get("skipped") else ""))
    return "DSF tests ran on " + "; ".join(parts)


@pytest.fixture(scope="session")
def dsf_testbed(request):
    """A two-site DSF test bed (requester DIC + AI provider) with the OMI plugin deployed, on the
    DSF version(s) of this test's federation (see pytest_generate_tests above).

    Started once per federation in test-artifacts/testbed/<id>/ (OMI_TESTBED_TEST_DIR to change the
    parent folder) on the first free base port from 8400, and stopped when the tests of the next
    federation begin or the session ends; if one is already running there it is used and left
    running. Skips when no DSF distribution is found: the DSF server artifacts are not served by
    the Maven registry reachable here (see docs/testbed.md).
    """
    from omi_dsf.testbed.bed import State, TestBed, free_base_port, pid_alive

    fed = getattr(request, "param", None)
    if fed is None:
        from omi_dsf.testbed.distribution import KNOWN_HOMES, NO_DSF_HINT

        where = ", ".join(str(h) for h in KNOWN_HOMES) + (f", {os.environ['DSF_HOME']}" if os.environ.get("DSF_HOME") else "")
        request.config._dsf_skip = f"no DSF distribution at {where}; {NO_DSF_HINT}"
        pytest.skip(request.config._dsf_skip)
    folder = Path(os.environ.get("OMI_TESTBED_TEST_DIR", ARTIFACTS / "testbed")) / fed.id
    old = State.load(folder)
    was_running = old is not None and all(pid_alive(s.pid) for s in old.servers)
    base = int(old.servers[0].port) - 1 if was_running else free_base_port(2, start=8400)
    bed = TestBed(folder, base_port=base, dsf_home=str(fed.dic.home), site_dsf_homes={"ai": str(fed.ai.home)},
                  out=print)
    if not was_running and folder.exists():
        bed.down(purge=True)   # fresh per run; the folder with the logs stays afterwards
    t0 = time.monotonic()
    try:
        bed.up(timeout=900)
    except BaseException:
        bed.down()   # leave no PostgreSQL or JVM behind when the test bed does not come up
        raise
    print(f"test bed {fed.id} ready after {time.monotonic() - t0:.0f} s")
    state = State.load(folder)
    state.bed = bed
    yield state
    if not was_running:
        bed.down()
