"""A provider's gateway for the send step's tests: the project's DICOMweb gateway (store backend)
over TLS with a test CA made here, and the `steps.providers` entry that reaches it. And the manifest
a study put straight into a provider's gateway needs for the infer step to take it as complete."""

from __future__ import annotations

import io
import ipaddress
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pydicom
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from helpers_pki import issue, make_ca, write_ca, write_pem

from conftest import free_port
from omi_dsf.dicomweb.config import parse_config
from omi_dsf.dicomweb.server import BackgroundServer
from omi_dsf.transfer import manifest

PROVIDER = "ai.omi.test"
MANIFEST_KEY, MANIFEST_DOMAIN = b"omi-test-manifest-key-0123456789", "omi-test"


def manifest_of(instances) -> bytes:
    """The Part 10 bytes of the manifest of one study's instances (files or Part 10 bytes), as the send
    step stores it last."""
    datasets = [pydicom.dcmread(io.BytesIO(i) if isinstance(i, (bytes, bytearray)) else i, stop_before_pixels=True)
                for i in instances]
    return manifest.study_manifest(datasets, MANIFEST_KEY, MANIFEST_DOMAIN)[1]


@contextmanager
def provider_gateway(folder: Path) -> Iterator[dict]:
    """{"providers": the steps.providers block, "store": the gateway's store folder}."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca = make_ca("OMI send test CA")
    server = write_pem(folder, "gateway", *issue(ca_key, ca, "gateway.ai.omi.test", ExtendedKeyUsageOID.SERVER_AUTH,
                                                 [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    ca_file = write_ca(folder / "ca.pem", ca)
    store = folder / "store"
    cfg = parse_config({"listen": {"port": free_port()}, "auth": {"anonymous": True}, "default": "INBOX",
                        "tls": {"certfile": server[0], "keyfile": server[1]},
                        "backends": {"INBOX": {"type": "store", "path": str(store)}}})
    with BackgroundServer(cfg) as gw:
        yield {"providers": {PROVIDER: {"gateway_url": gw.url, "ca_file": ca_file}}, "store": store, "url": gw.url}


def study_at(store: Path, study_uid: str) -> list[Path]:
    """The files of one study in the provider gateway's store (what was sent), the manifest among them."""
    if not (store / "index.sqlite").exists():
        return []
    with sqlite3.connect(store / "index.sqlite") as db:
        rows = db.execute("SELECT sop_uid FROM instances WHERE study_uid = ?", (study_uid,)).fetchall()
    folder = store / "files" / study_uid
    files = sorted(folder.rglob("*.dcm")) if folder.exists() else []
    assert len(files) == len(rows)
    return files


def manifest_at(store: Path, study_uid: str) -> list[Path]:
    """The study's manifest(s) in the provider gateway's store."""
    return [f for f in study_at(store, study_uid) if _is_manifest(f)]


def instances_at(store: Path, study_uid: str) -> list[Path]:
    """The study's instances in the provider gateway's store, its manifest apart (manifest_at)."""
    return [f for f in study_at(store, study_uid) if not _is_manifest(f)]


def _is_manifest(path: Path) -> bool:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SeriesDescription", "Modality"])
    return manifest.is_manifest(ds.get("Modality"), ds.get("SeriesDescription"))
