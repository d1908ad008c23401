"""The OMI DICOMweb gateway: QIDO-RS, WADO-RS and STOW-RS over legacy DIMSE PACS or an embedded
store. See docs/gateway.md.

For other parts: ``load_config(path)`` reads the gateway's YAML, ``endpoint_resource(config)`` /
``endpoint_resources(config)`` give its FHIR Endpoint resources, ``create_app(config)`` the ASGI
application (``omi_dsf.dicomweb.app``), and ``omi_dsf.dicomweb.legacy_pacs`` starts a real PACS
(dcmqrscp, Orthanc) on loopback for tests and the demo.
"""

from .config import ConfigError, load_config, parse_config
from .endpoint import endpoint_resource, endpoint_resources

__all__ = ["ConfigError", "load_config", "parse_config", "endpoint_resource", "endpoint_resources"]
