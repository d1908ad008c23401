"""Consent checks: MII Broad Consent resources (`mii.py`), gICS via the TTP-FHIR gateway
(`gics.py`), and the check a site's settings choose (`check.py`). The `consent` step is
omi_dsf/steps/consent.py. See docs/pseudonymization.md."""
