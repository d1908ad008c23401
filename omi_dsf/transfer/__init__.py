"""Moving studies and results between the sites, for the requester's send and return steps.

  outgoing  what may leave the site: the pseudonymized study, leak-checked whole
  provider  the provider's DICOMweb gateway: URL, TLS trust, client certificate, token
  stow      STOW-RS of a checked study, idempotent across retries
  results   the AI results (SEG, SR) by WADO-RS, checked and re-identified
  archive   the re-identified results into the legacy PACS, by STOW-RS to the site's gateway
  fhir      the FHIR result into a folder or onto a FHIR server

A failure the requester must fix raises `errors.TransferError`; a peer that does not answer
raises an `omi_dsf.errors.RetryableError` (retried). The steps are omi_dsf/steps/send.py and
omi_dsf/steps/return_.py.
"""
