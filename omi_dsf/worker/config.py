"""A site's worker configuration (YAML): where its DSF FHIR server is, its certificate, the lease
store, which handler serves which topic, and the settings the steps read (ctx.site)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from omi_dsf.database import resolve
from omi_dsf.errors import UserError
from omi_dsf.dsf.client import Identity, identity_from_files
from omi_dsf.steps import DEMO_HANDLER, HANDLERS, load_handler
from omi_dsf.steps.api import Handler


@dataclass
class SiteConfig:
    path: Path
    raw: dict[str, Any]

    @property
    def identity(self) -> Identity:
        r, base = self.raw, self.path.parent
        for key in ("fhir_url", "ca_file", "client_cert", "client_key"):
            if not r.get(key):
                raise UserError(f"{self.path}: '{key}' is missing")
        return identity_from_files(r["fhir_url"], base / r["ca_file"], base / r["client_cert"], base / r["client_key"],
                                   key_password_file=(base / r["client_key_password_file"]) if r.get("client_key_password_file") else None,
                                   key_password_env=r.get("client_key_password_env"))

    @property
    def lease_store(self) -> str:
        """Database URL of the leases (omi_dsf/database.py; a SQLite path relative to this file)."""
        return resolve(self.raw.get("lease_store", "leases.db"), self.path.parent)

    @property
    def audit(self) -> str:
        """Database URL of the audit trail (as lease_store)."""
        return resolve(self.raw.get("audit", "audit.sqlite"), self.path.parent)

    @property
    def worker(self) -> dict[str, Any]:
        return dict(self.raw.get("worker") or {})

    def handler(self, topic: str, demo: bool = False) -> Handler:
        ref = DEMO_HANDLER if demo else (self.raw.get("handlers") or {}).get(topic, HANDLERS.get(topic))
        if not ref:
            raise UserError(f"{self.path}: no handler for topic '{topic}' (set handlers.{topic}: module:function)")
        return load_handler(ref)


def load_site_config(path: str | Path) -> SiteConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"site config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"site config {path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise UserError(f"site config {path}: must be a mapping")
    return SiteConfig(path.resolve(), raw)
