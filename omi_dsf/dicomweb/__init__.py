"""The OMI DICOMweb gateway: QIDO-RS, WADO-RS and STOW-RS over legacy DIMSE PACS or an embedded
store. See docs/gateway.md.

For other parts: ``load_config(path)`` reads the gateway's YAML, ``endpoint_resource(config)`` /
``endpoint_resources(config)`` give its FHIR Endpoint resources, ``create_app(config)`` the ASGI
application (``omi_dsf.dicomweb.app``). A real PACS on loopback for tests and the demo (dcmqrscp,
Orthanc) is ``omi_dsf.testkit.legacy_pacs``.
"""

from .config import ConfigError, load_config, parse_config
from .endpoint import endpoint_resource, endpoint_resources

__all__ = ["ConfigError", "load_config", "parse_config", "endpoint_resource", "endpoint_resources"]
