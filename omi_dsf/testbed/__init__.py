"""A real multi-site DSF test bed (DSF 1.9 or 2.x) on one machine (see docs/testbed.md).

For other parts and their tests:

    from omi_dsf.testbed import State, client
    state = State.load(Path(".testbed"))          # written by `python -m omi_dsf testbed up`
    with client(state, "dic") as fhir:            # httpx.Client, mTLS with the site's certificate
        fhir.get("/Task", params={"status": "requested"})

`state.site("dic")` has the site's FHIR/BPE URLs, organization identifier, client certificate,
key and key password; `state.ca_cert` is the test CA.
"""

from omi_dsf.testbed.bed import State, TestBed, client, ssl_context

__all__ = ["State", "TestBed", "client", "ssl_context"]
