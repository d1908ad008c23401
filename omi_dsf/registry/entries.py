"""Build a provider's registration: the transaction Bundle for one AI service."""

from __future__ import annotations

from omi_dsf.registry import definitions as d


def _org(identifier: str) -> dict:
    return {"identifier": {"system": d.ORG_SID, "value": identifier}}


def service_bundle(organization: str, service_id: str, *, name: str, model: str, model_version: str,
                   oip_url: str, modality: list[str], body_site: list[tuple[str, str]],
                   service_type: str = "segmentation", dicomweb_endpoints: list[dict] | None = None,
                   identifier_system: str = f"{d.BASE}/sid/omi-ai-service", min_slices: int | None = None,
                   max_slices: int | None = None, labels: dict[str, str] | None = None) -> dict:
    """HealthcareService `service_id` + Device `<id>-algorithm` + Endpoint `<id>-oip` (+ given DICOMweb
    Endpoints, e.g. from omi_dsf.dicomweb.endpoint), all PUT so that registering again updates them.
    `body_site` is (system, code) pairs, e.g. ("http://snomed.info/sct", "39607008") for lung.
    `min_slices`, `max_slices` and `labels` ({"1": "right lung"}) tell the infer step what a server whose
    model metadata has no parameters cannot (registry/device.py)."""
    device_id, oip_id = f"{service_id}-algorithm", f"{service_id}-oip"
    device = {
        "resourceType": "Device", "id": device_id,
        "identifier": [{"system": identifier_system, "value": f"{service_id}/algorithm"}],
        "status": "active", "owner": _org(organization),
        "deviceName": [{"name": model, "type": d.DEVICE_NAME_MODEL}],
        "version": [{"value": model_version}],
        "property": [
            {"type": {"coding": [{"system": d.CS_DEVICE_PROPERTY, "code": "modality"}]},
             "valueCode": [{"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": m}]}
                           for m in modality]},
            {"type": {"coding": [{"system": d.CS_DEVICE_PROPERTY, "code": "body-site"}]},
             "valueCode": [{"coding": [{"system": s, "code": c}]} for s, c in body_site]},
        ],
    }
    for code, value in (("min-slices", min_slices), ("max-slices", max_slices)):
        if value is not None:
            device["property"].append({"type": {"coding": [{"system": d.CS_DEVICE_PROPERTY, "code": code}]},
                                       "valueQuantity": [{"value": value}]})
    if labels:
        device["property"].append({"type": {"coding": [{"system": d.CS_DEVICE_PROPERTY, "code": "label"}]},
                                   "valueCode": [{"coding": [{"code": k, "display": t}]} for k, t in labels.items()]})
    oip = {
        "resourceType": "Endpoint", "id": oip_id,
        "identifier": [{"system": identifier_system, "value": f"{service_id}/oip"}],
        "status": "active", "managingOrganization": _org(organization),
        "connectionType": {"system": d.CS_ENDPOINT_TYPE, "code": d.OIP_V2},
        "name": f"{name}: Open Inference Protocol v2",
        "payloadType": [{"text": "Open Inference Protocol v2 tensors"}],
        "payloadMimeType": ["application/json", "application/octet-stream"],
        "address": oip_url,
    }
    dicomweb = []
    for ep in dicomweb_endpoints or []:
        ep = {**ep, "managingOrganization": _org(organization)}
        dicomweb.append(ep)
    service = {
        "resourceType": "HealthcareService", "id": service_id,
        "extension": [{"url": d.EXT_ALGORITHM, "valueReference": {"reference": f"Device/{device_id}"}}],
        "identifier": [{"system": identifier_system, "value": service_id}],
        "active": True, "providedBy": _org(organization), "name": name,
        "type": [{"coding": [{"system": d.CS_OMI_SERVICE_TYPE, "code": service_type}]}],
        "endpoint": [{"reference": f"Endpoint/{oip_id}"}] + [{"reference": f"Endpoint/{e['id']}"} for e in dicomweb],
    }
    entries = [device, oip, *dicomweb, service]
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                      for r in entries]}
