"""FHIR R4 Endpoint resources for the gateway, generated from its configuration.

One Endpoint per backend and DICOMweb service (QIDO-RS, WADO-RS, STOW-RS); ``address`` is the
service root a client appends ``/studies`` to. The default backend is served at the root too.
"""

from __future__ import annotations

import re

from .config import GatewayConfig, StoreBackendConfig

CONNECTION_TYPES = ("dicom-wado-rs", "dicom-qido-rs", "dicom-stow-rs")
CONNECTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
PAYLOAD_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
_LABEL = {"dicom-wado-rs": "WADO-RS", "dicom-qido-rs": "QIDO-RS", "dicom-stow-rs": "STOW-RS"}
_MIME = {"dicom-wado-rs": ["application/dicom", "application/dicom+json", "application/octet-stream"],
         "dicom-qido-rs": ["application/dicom+json"],
         "dicom-stow-rs": ["application/dicom"]}


def service_root(cfg: GatewayConfig, backend: str | None = None) -> str:
    base = cfg.public_base()
    if backend is None or backend == cfg.default_backend:
        return base
    return f"{base}/aets/{backend}"


def endpoint_resource(cfg: GatewayConfig, backend: str | None = None,
                      connection_type: str = "dicom-wado-rs", identifier_system: str | None = None) -> dict:
    """One FHIR Endpoint (a dict) for ``backend`` (default: the default backend)."""
    if connection_type not in CONNECTION_TYPES:
        raise ValueError(f"connection_type must be one of {', '.join(CONNECTION_TYPES)}")
    name = backend or cfg.default_backend
    if name not in cfg.backends:
        raise ValueError(f"no backend named {name!r}")
    kind = "store" if isinstance(cfg.backends[name], StoreBackendConfig) else "PACS"
    slug = re.sub(r"[^A-Za-z0-9.-]", "-", f"omi-gateway-{name}-{connection_type}").lower()[:64]
    resource = {
        "resourceType": "Endpoint",
        "id": slug,
        "status": "active",
        "connectionType": {"system": CONNECTION_SYSTEM, "code": connection_type},
        "name": f"{cfg.name}: {_LABEL[connection_type]} for {kind} {name}",
        "payloadType": [{"coding": [{"system": PAYLOAD_SYSTEM, "code": "any"}], "text": "DICOM"}],
        "payloadMimeType": _MIME[connection_type],
        "address": service_root(cfg, name),
    }
    if identifier_system:
        resource["identifier"] = [{"system": identifier_system, "value": slug}]
    return resource


def endpoint_resources(cfg: GatewayConfig, identifier_system: str | None = None) -> list[dict]:
    """Endpoints for every backend and every DICOMweb service."""
    return [endpoint_resource(cfg, name, ct, identifier_system)
            for name in cfg.backends for ct in CONNECTION_TYPES]
