"""What a caller must know about a model beyond Open Inference Protocol v2, from its Device entry.

A server whose model metadata carries no "parameters" (KServe's model server) cannot say which
modality a model takes, how many slices, or what its labels mean; the provider states it in the
service's Device in the registry instead (`entries.service_bundle` writes these properties):

  modality     valueCode, DICOM DCM codes (CT, MR ...)
  min-slices   valueQuantity, the fewest slices the model accepts
  max-slices   valueQuantity, the most
  label        valueCode per label value: code the value in the output ("1"), display its meaning

`model_parameters` turns a Device into the same keys the reference service's metadata parameters
have (modality, min_slices, max_slices, labels, algorithm_name, algorithm_version), so that the
infer step reads one shape whichever source it came from. `fetch` reads a Device by its URL.
"""

from __future__ import annotations

from typing import Any

import httpx

from omi_dsf.errors import RetryableError
from omi_dsf.peer import Peer, json_answer
from omi_dsf.registry import definitions as d
from omi_dsf.registry import validation as v


class DeviceError(ValueError):
    """The Device cannot be read or does not say what the model needs."""


class DeviceUnavailable(DeviceError, RetryableError):
    """The registry cannot be reached or answers with a server error."""


def _properties(device: dict, code: str) -> list[dict]:
    return [p for p in device.get("property", [])
            if any(c.get("system") == d.CS_DEVICE_PROPERTY and c.get("code") == code
                   for c in (p.get("type") or {}).get("coding", []))]


def _quantity(device: dict, code: str) -> int | None:
    for prop in _properties(device, code):
        for q in prop.get("valueQuantity", []):
            value = q.get("value")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value) and value >= 0:
                return int(value)
            raise DeviceError(f"Device/{device.get('id')}: property {code} must be a whole number, got {value!r}")
    return None


def model_parameters(device: dict) -> dict[str, Any]:
    """The model's parameters as the reference service's metadata states them, from its Device."""
    if device.get("resourceType") != "Device":
        raise DeviceError(f"expected a Device, got {str(device.get('resourceType'))[:40]!r}")
    modalities = [c for _, c in v.device_property(device, "modality")]
    if not modalities:
        raise DeviceError(f"Device/{device.get('id')} has no modality property ({d.CS_DEVICE_PROPERTY}#modality)")
    params: dict[str, Any] = {"modality": modalities[0]}
    for key, code in (("min_slices", "min-slices"), ("max_slices", "max-slices")):
        value = _quantity(device, code)
        if value is not None:
            params[key] = value
    labels = {}
    for prop in _properties(device, "label"):
        for vc in prop.get("valueCode", []):
            for c in vc.get("coding", []):
                if c.get("code"):
                    labels[str(c["code"])] = str(c.get("display") or vc.get("text") or "")
    if labels:
        params["labels"] = labels
    name = v.model_name(device)
    if name:
        params["algorithm_name"] = name
    versions = [x.get("value") for x in device.get("version", []) if x.get("value")]
    if versions:
        params["algorithm_version"] = str(versions[0])
    return params


def fetch(peer: Peer) -> dict:
    """The Device at `peer.url` (a registry's .../fhir/Device/<id>), read with the peer's TLS settings."""
    try:
        with peer.client(base_url=False) as http:
            response = http.get(peer.url, headers={"Accept": "application/fhir+json"})
    except httpx.HTTPError as exc:
        raise DeviceUnavailable(f"Device {peer.url}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if response.status_code >= 500:
        raise DeviceUnavailable(f"Device {peer.url}: HTTP {response.status_code}")
    if response.status_code != 200:
        raise DeviceError(f"Device {peer.url}: HTTP {response.status_code}")
    return json_answer(response, f"Device {peer.url}", DeviceError, "Device")
