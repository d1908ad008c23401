"""Canonical URLs and codes of the registry's FHIR model (see docs/registry.md).

An AI service is three kinds of resources, all owned by the provider organization:
  HealthcareService  the service (type, provider, endpoints, the algorithm via an extension)
  Device             the algorithm: OIP model name (deviceName type model-name), version,
                     properties modality (DICOM DCM codes) and body-site (SNOMED CT or DICOM body part);
                     for the infer step also min-slices, max-slices, label (registry/device.py)
  Endpoint           the Open Inference Protocol v2 URL (connectionType open-inference-protocol-v2);
                     optionally the provider's DICOMweb gateway (dicom-wado-rs / -qido-rs / -stow-rs)

R4 HealthcareService has no element for the algorithm, so the registry uses an extension for it,
as the OMI protocol IG links its Device (algorithm) and HealthcareService (service) profiles.
"""

from __future__ import annotations

BASE = "http://medizininformatik-initiative.de/fhir"
ORG_SID = "http://dsf.dev/sid/organization-identifier"

EXT_ALGORITHM = f"{BASE}/StructureDefinition/omi-registry-algorithm"          # valueReference(Device)
EXT_HEALTH = f"{BASE}/StructureDefinition/omi-registry-service-health"       # added on read, never stored
CS_DEVICE_PROPERTY = f"{BASE}/CodeSystem/omi-registry-device-property"       # modality | body-site | min-slices
#                                                       | max-slices | label (registry/device.py)
CS_ENDPOINT_TYPE = f"{BASE}/CodeSystem/omi-registry-endpoint-type"           # open-inference-protocol-v2
OIP_V2 = "open-inference-protocol-v2"
CS_HL7_CONNECTION = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
DICOMWEB_TYPES = ("dicom-wado-rs", "dicom-qido-rs", "dicom-stow-rs")
# OMI protocol IG service types (segmentation | diagnostics); any other coding is accepted too
CS_OMI_SERVICE_TYPE = "http://omi.de/fhir/registry/CodeSystem/ai-service-type-codesystem"
DEVICE_NAME_MODEL = "model-name"

RESOURCE_TYPES = ("HealthcareService", "Device", "Endpoint")
HEALTH_STATES = ("up", "degraded", "down", "unknown")
