"""Validation of DSF process plugins: BPMN 2.0 XSD, DSF load rules, FHIR structure, cross references."""
