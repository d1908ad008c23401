"""A DSF server distribution on disk (`DSF_HOME`): which version it is, which Java runs it, and
the settings that differ between DSF 1.x and 2.x.

A distribution has the layout of the DSF docker build contexts after `mvn install`:

    fhir/dsf_fhir.jar  fhir/lib/*.jar (incl. dsf-fhir-server-<version>.jar)
    bpe/dsf_bpe.jar    bpe/lib/*.jar  (incl. dsf-bpe-server-<version>.jar)  bpe/lib_external/
    2.x only:          bpe/api/v1/*.jar  bpe/api/v2/*.jar   (the plugin API class loaders)
    1.x only:          fhir/conf/log4j2.xml  bpe/conf/log4j2.xml

The version comes from the name of the server jar, the Java release it needs from the class file
version of that jar's classes (DSF 1.x: 17, DSF 2.x: 25).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from omi_dsf.errors import UserError

DEFAULT_HOME = Path("/opt/dsf-1.9.0")
KNOWN_HOMES = (Path("/opt/dsf-1.9.0"), Path("/opt/dsf-2.1.0"))

NO_DSF_HINT = (
    "the Maven registry reachable here does not serve the DSF server artifacts (dsf-fhir-server-jetty, "
    "dsf-bpe-server-jetty and their dsf-common-* dependencies), so a DSF distribution must be "
    "provided: set DSF_HOME or --dsf-home (see docs/testbed.md)"
)

# class file major version -> Java release (JVMS 4.1: release = major - 44)
_JAVA_OF_CLASS_MAJOR = 44


@dataclass(frozen=True)
class Distribution:
    home: Path
    version: str  # "1.9.0", "2.1.0", ...

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def label(self) -> str:
        """Short name for output and test ids: "1.9", "2.1"."""
        return ".".join(self.version.split(".")[:2])

    # ------------------------------------------------------------------ finding
    @classmethod
    def find(cls, explicit: str | os.PathLike | None = None) -> "Distribution":
        """The distribution at `explicit`, $DSF_HOME or /opt/dsf-1.9.0, or a UserError naming
        what is missing."""
        home = Path(explicit or os.environ.get("DSF_HOME") or DEFAULT_HOME)
        missing = [rel for rel in ("fhir/dsf_fhir.jar", "fhir/lib", "bpe/dsf_bpe.jar", "bpe/lib")
                   if not (home / rel).exists()]
        if missing:
            raise UserError(f"no DSF distribution at {home} (missing {', '.join(missing)}); " + NO_DSF_HINT)
        fhir = sorted((home / "fhir" / "lib").glob("dsf-fhir-server-*.jar"))
        if not fhir:
            raise UserError(f"{home}/fhir/lib has no dsf-fhir-server-*.jar; " + NO_DSF_HINT)
        if not list((home / "bpe" / "lib").glob("dsf-bpe-server-*.jar")):
            raise UserError(f"{home}/bpe/lib has no dsf-bpe-server-*.jar; " + NO_DSF_HINT)
        m = re.fullmatch(r"dsf-fhir-server-(\d+\.\d+\.\d+(?:-[\w.]+)?)\.jar", fhir[0].name)
        if not m:
            raise UserError(f"cannot tell the DSF version from {fhir[0]}")
        dist = cls(home.resolve(), m.group(1))
        if dist.major >= 2:
            missing = [rel for rel in ("bpe/api/v1", "bpe/api/v2") if not (home / rel).is_dir()]
            if missing:
                raise UserError(f"DSF {dist.version} at {home} lacks {', '.join(missing)} (the plugin API "
                                "jars of DSF 2.x); " + NO_DSF_HINT)
        return dist

    @classmethod
    def present(cls) -> list["Distribution"]:
        """Every distribution found at $DSF_HOME and the usual places, one per version."""
        found: dict[str, Distribution] = {}
        for home in (os.environ.get("DSF_HOME"), *KNOWN_HOMES):
            if not home:
                continue
            try:
                d = cls.find(home)
            except UserError:
                continue
            found.setdefault(d.version, d)
        return sorted(found.values(), key=lambda d: [int(x) for x in re.findall(r"\d+", d.version)])

    # ------------------------------------------------------------------ running
    @property
    def java_release(self) -> int:
        return _java_release_of(self.home / "fhir" / "lib" / f"dsf-fhir-server-{self.version}.jar")

    def java(self) -> str:
        """A java binary that runs this distribution ($OMI_DSF_JAVA, JAVA_HOME, /usr/lib/jvm/*,
        PATH), or a UserError."""
        need = self.java_release
        cands = [os.environ.get("OMI_DSF_JAVA"),
                 os.environ.get("JAVA_HOME") and str(Path(os.environ["JAVA_HOME"]) / "bin" / "java")]
        cands += [str(p / "bin" / "java") for p in sorted(Path("/usr/lib/jvm").glob("*"))]
        cands.append(shutil.which("java"))
        seen = set()
        for cand in cands:
            if not cand or cand in seen or not Path(cand).exists():
                continue
            seen.add(cand)
            if _java_version(cand) >= need:
                return cand
        raise UserError(f"DSF {self.version} needs Java {need} or newer and none was found "
                        "(set OMI_DSF_JAVA to its java binary)")

    def default_heap(self, kind: str) -> str:
        """-Xmx for a server: FHIR servers ran out of 512m of heap within minutes of a restart under
        the worker tests (DSF 2.x with HAPI 8 first; DSF 1.9 too, answering the workers' and the
        restarted BPE's searches on a loaded machine); 1g held. BPEs: 512m."""
        return "1g" if kind == "fhir" else "512m"

    def classpath(self, kind: str) -> list[str]:
        home = self.home / kind
        cp = [str(home / "lib" / "*")]
        if kind == "bpe":
            cp.append(str(home / "lib_external" / "*"))
        cp.append(str(home / f"dsf_{kind}.jar"))
        return cp

    def log_config(self, kind: str) -> Path | None:
        """The log4j2.xml a server of this kind needs in its conf/ (DSF 1.x ships one; 2.x none)."""
        return self.home / kind / "conf" / "log4j2.xml" if self.major < 2 else None

    def settings(self, kind: str, ca_cert: str) -> dict[str, object]:
        """The settings whose names or presence differ between DSF 1.x and 2.x (the rest is the same)."""
        if self.major < 2:
            return {"dev.dsf.log4j.config": "conf/log4j2.xml"}
        props: dict[str, object] = {
            # the *Https main classes read the chain next to the server certificate (required in 2.x)
            "dev.dsf.server.certificate.chain": ca_cert,
            # no log4j2.xml shipped: DSF 2.x configures logging itself (log/<kind>.log, DEBUG)
            "dev.dsf.log.console.out.style": "TEXT",
        }
        if kind == "bpe":
            props.update({
                "dev.dsf.bpe.fhir.client.connections.config.default.trust.server.certificate.cas": ca_cert,
                "dev.dsf.bpe.process.api.directory": str(self.home / "bpe" / "api"),
            })
        return props

    def bpe_engine_user_key(self) -> str:
        """The prefix of the BPE's process engine database user: Camunda in 1.x, Operaton in 2.x."""
        return "dev.dsf.bpe.db.user.camunda" if self.major < 2 else "dev.dsf.bpe.db.user.engine"

    @property
    def unlisted_client_status(self) -> int:
        """What a FHIR server answers a trusted client certificate that is on no allow list."""
        return 401 if self.major < 2 else 403


@lru_cache(maxsize=None)
def _java_release_of(jar: Path) -> int:
    try:
        with zipfile.ZipFile(jar) as zf:
            name = next(n for n in zf.namelist() if n.endswith(".class") and not n.startswith("META-INF"))
            head = zf.read(name)[:8]
    except (OSError, zipfile.BadZipFile, StopIteration) as exc:
        raise UserError(f"cannot read the class files of {jar}: {exc}") from None
    return int.from_bytes(head[6:8], "big") - _JAVA_OF_CLASS_MAJOR


@lru_cache(maxsize=None)
def _java_version(java: str) -> int:
    try:
        out = subprocess.run([java, "-XshowSettings:properties", "-version"], capture_output=True,
                             text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return 0
    m = re.search(r"java\.specification\.version = (\d+)(?:\.(\d+))?", out)
    if not m:
        return 0
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major
