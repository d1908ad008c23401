"""A site's configuration file (YAML), typed (omi_dsf.config) and validated whole when read: where
its DSF FHIR server is, its certificate, the lease store, the audit trail, the worker's timing,
which handler serves which topic, the settings the steps read (`steps:`, handed to them as
ctx.site), and the keys of the `omi` client. Relative paths are relative to the file's folder,
under `steps:` too. The option tables in docs/operators.md are generated from these models."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PrivateAttr

from omi_dsf.config import ConfigError, Database, ExistingFile, HttpUrl, Name, Section, load
from omi_dsf.dsf.client import Identity, identity_from_files
from omi_dsf.errors import UserError
from omi_dsf.steps import DEMO_HANDLER, HANDLERS, load_handler
from omi_dsf.steps.api import Handler
from omi_dsf.steps.settings import StepSettings


class WorkerOptions(Section):
    lease_ttl: float = Field(60.0, gt=0, description="seconds a claimed item stays leased without renewal")
    max_attempts: int = Field(3, ge=1, description="attempts per item before it fails")
    backoff: float = Field(2.0, ge=0, description="seconds before the first retry, then doubling")
    poll_interval: float = Field(10.0, gt=0, description="seconds between polls (besides the websocket)")
    concurrency: int = Field(8, ge=1, description="items one worker process handles at once")
    websocket: bool = Field(True, description="wake up on the DSF's websocket notifications")
    owner: Name | None = Field(None, description="the lease owner's name (default: host name and a random suffix)")


class SiteConfig(Section):
    site: Name | None = Field(None, description="the site's DSF organization identifier (needed by the `omi` client)")
    fhir_url: HttpUrl | None = Field(None, description="the site's own DSF FHIR server, e.g. "
                                                       "https://dsf.dic.example.org/fhir (required)")
    ca_file: ExistingFile | None = Field(None, description="PEM CA bundle that signs the DSF FHIR server's "
                                                           "certificate (required)")
    client_cert: ExistingFile | None = Field(None, description="the site's DSF client certificate, on the DSF "
                                                               "allow list (required)")
    client_key: ExistingFile | None = Field(None, description="its key (required)")
    client_key_password_file: ExistingFile | None = Field(None, description="file holding the key's password")
    client_key_password_env: Name | None = Field(None, description="environment variable holding the key's "
                                                                   "password (never the password in the YAML)")
    lease_store: Database = Field("leases.db", validate_default=True,
                                  description="which worker holds which work item: a database (Site state, below)")
    audit: Database = Field("audit.sqlite", validate_default=True,
                            description="the site's audit trail, a database (Site state, below): per business key "
                                        "what was sent or received, when, by whom, in which pseudonym domain; "
                                        "never patient data")
    worker: WorkerOptions = Field(default_factory=WorkerOptions, description="the worker's timing")
    handlers: dict[Name, Name] = Field(default_factory=dict, description="`{topic: module:function}` to replace a "
                                                                         "step handler")
    steps: StepSettings = Field(default_factory=StepSettings, description="the settings the step handlers read "
                                                                          "(below), as ctx.site")
    # the `omi` client's own keys (docs/operators.md, The omi client)
    registry_url: HttpUrl | None = Field(None, description="omi client: the service registry")
    registry_ca_file: ExistingFile | None = Field(None, description="omi client: the CA of the registry's certificate")
    gateway_url: HttpUrl | None = Field(None, description="omi client: the site's DICOMweb gateway, for the stored "
                                                          "results in `omi results` and the studies of "
                                                          "`omi submit --query`")
    gateway_ca_file: ExistingFile | None = Field(None, description="omi client: the CA of that gateway's certificate")
    insecure: bool = Field(False, description="omi client: allow plain http:// for fhir_url and gateway_url (test "
                                              "set-ups only: patient identifiers would travel in clear text)")
    in_flight_per_provider: int | None = Field(None, ge=1, description="omi client: at most this many of the site's "
                                               "requests in flight to one provider; cohorts (`omi submit --cohort`) "
                                               "wait for room (default: no limit besides --parallel)")
    _path: Path = PrivateAttr(Path("site.yaml"))

    @property
    def path(self) -> Path:
        return self._path

    @property
    def identity(self) -> Identity:
        for key in ("fhir_url", "ca_file", "client_cert", "client_key"):
            if not getattr(self, key):
                raise UserError(f"{self.path}: '{key}' is missing")
        return identity_from_files(self.fhir_url, self.ca_file, self.client_cert, self.client_key,
                                   key_password_file=self.client_key_password_file,
                                   key_password_env=self.client_key_password_env)

    def handler(self, topic: str, demo: bool = False) -> Handler:
        ref = DEMO_HANDLER if demo else self.handlers.get(topic, HANDLERS.get(topic))
        if not ref:
            raise UserError(f"{self.path}: no handler for topic '{topic}' (set handlers.{topic}: module:function)")
        return load_handler(ref)

    def check_steps(self, topics: list[str]) -> None:
        """Refuse to start when a step of `topics` (served by its shipped handler) lacks its settings."""
        missing = self.steps.missing_for([t for t in topics if t not in self.handlers])
        if missing:
            raise ConfigError(f"{self.path}: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def load_site_config(path: str | Path) -> SiteConfig:
    """The site file, validated whole (the `steps:` block included), or a one-line ConfigError."""
    try:
        cfg = load(SiteConfig, path)
    except ConfigError as exc:
        raise ConfigError(f"site config {exc}") from None
    cfg._path = Path(path).resolve()
    return cfg
