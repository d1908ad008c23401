"""The OMI service registry: AI services as FHIR HealthcareService + Device + Endpoint, searched by
modality, body site, service type and provider; owner-only writes (mTLS or JWT); health from Open
Inference Protocol checks and heartbeats; a status page; and the FHIR↔DICOM link (ImagingStudy with
the gateway's Endpoint, `imaging.py`). Run it with `python -m omi_dsf registry`. See docs/registry.md.
"""
