"""DSF FHIR client (mTLS, REST, websocket) and the DSF external work item."""
