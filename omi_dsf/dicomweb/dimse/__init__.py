"""The DIMSE side of the gateway: application entity and associations, then one module per service
(C-FIND, C-GET/C-MOVE, C-STORE)."""

from pynetdicom import _config

# Identifiers carry patient names and IDs: never log them.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
