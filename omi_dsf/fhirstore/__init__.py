"""The DIC's FHIR store: a HAPI FHIR JPA server (R4) that holds consent and receives results.

    from omi_dsf.fhirstore import FhirStore
    store = FhirStore(Path("store"), port=8090)
    st = store.up()                 # builds fhir-store/ if needed, waits for GET /fhir/metadata
    st.base_url                     # http://127.0.0.1:8090/fhir
    store.down()

The Java side is the Maven module fhir-store/ (see docs/fhir-store.md).
"""

from omi_dsf.fhirstore.store import FhirStore, State, build

__all__ = ["FhirStore", "State", "build"]
