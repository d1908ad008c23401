"""Worker site configurations for the sites of a running test bed (used by tests, demo, bench)."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_testbed_site_configs(state, folder: Path, steps: dict[str, dict] | None = None,
                               worker: dict | None = None, top: dict[str, dict] | None = None) -> dict[str, Path]:
    """One YAML per test bed site (key → path); the key password goes into a file beside it.
    `top`: more top-level keys per site (the omi client's gateway_url, gateway_ca_file, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for site in state.sites:
        pw = folder / f"{site.key}.key-password"
        pw.write_text(site.key_password)
        pw.chmod(0o600)
        cfg = {
            "site": site.identifier,
            "fhir_url": site.fhir_url,
            "ca_file": state.ca_cert,
            "client_cert": site.client_cert,
            "client_key": site.client_key,
            "client_key_password_file": str(pw),
            "lease_store": f"sqlite:///{folder / (site.key + '-leases.db')}",
            "audit": f"{site.key}-audit.sqlite",
            "worker": dict(worker or {}),
            "steps": dict((steps or {}).get(site.key, {})),
            **(top or {}).get(site.key, {}),
        }
        path = folder / f"{site.key}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out[site.key] = path
    return out
