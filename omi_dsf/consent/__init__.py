"""Consent checks: MII Broad Consent resources (`mii.py`), gICS via the TTP-FHIR gateway
(`gics.py`), and the `consent` step (`step.py`). See docs/pseudonymization.md."""
