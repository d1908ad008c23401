"""Pseudonym providers: embedded (keyed, SQLite), gPAS over SOAP (zeep), TTP-FHIR gateway (httpx).

gPAS and the TTP-FHIR gateway cannot run here. The SOAP and HTTP servers below are STAND-INS
written for these tests: they serve gPAS's documented WSDL names (service PSNManagerBeanService,
namespace http://psn.ttp.ganimed.icmvc.emau.org/, operations getOrCreatePseudonymFor and
getValueFor with value/psn/domainName) and the gateway's documented operations
($pseudonymizeAllowCreate, $dePseudonymize with FHIR Parameters). They exercise our clients'
wire format and error handling, not gPAS itself.
"""

from __future__ import annotations

import json

import pytest
from helpers_http import StandIn, serve
from lxml import etree

from omi_dsf.deid.keys import KeyError_, load_key
from omi_dsf.deid.pseudonyms import PseudonymError, UnknownPseudonymError, make_provider
from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider
from omi_dsf.config import ConfigError, parse
from omi_dsf.deid.config import PseudonymProviderSettings
from omi_dsf.deid.store import SiteStore

KEY = b"provider-test-key-0123456789"
GPAS_NS = "http://psn.ttp.ganimed.icmvc.emau.org/"
SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"


# -- embedded -----------------------------------------------------------------------------------
def test_embedded_is_stable_per_domain_and_reversible(tmp_path):
    store = SiteStore(tmp_path / "s.sqlite")
    p = EmbeddedProvider(KEY, store)
    a = p.pseudonymize("omi", "PAT-1")
    assert a == p.pseudonymize("omi", "PAT-1")
    assert a != p.pseudonymize("omi", "PAT-2")
    assert a != p.pseudonymize("other", "PAT-1")
    assert a.startswith("PSN-") and "PAT" not in a
    assert p.depseudonymize("omi", a) == "PAT-1"
    with pytest.raises(UnknownPseudonymError):
        p.depseudonymize("other", a)
    store.close()
    again = EmbeddedProvider(KEY, SiteStore(tmp_path / "s.sqlite"))
    assert again.depseudonymize("omi", a) == "PAT-1"  # the mapping is kept at the site
    assert EmbeddedProvider(b"another-key-0123456789", SiteStore()).pseudonymize("omi", "PAT-1") != a


def test_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("OMI_DEID_KEY", raising=False)
    monkeypatch.delenv("OMI_DEID_KEY_FILE", raising=False)
    f = tmp_path / "k"
    f.write_text("file-key-0123456789abc\n")
    assert load_key(f) == b"file-key-0123456789abc"
    monkeypatch.setenv("OMI_DEID_KEY_FILE", str(f))
    assert load_key() == b"file-key-0123456789abc"
    monkeypatch.delenv("OMI_DEID_KEY_FILE")
    monkeypatch.setenv("OMI_DEID_KEY", "env-key-0123456789abcdef")
    assert load_key() == b"env-key-0123456789abcdef"
    with pytest.raises(KeyError_, match="cannot read key file"):
        load_key(tmp_path / "missing")


def provider(cfg: dict):
    """The provider settings as the site file's steps.pseudonymization.provider gives them."""
    return parse(PseudonymProviderSettings, cfg, where="provider")


def test_factory_rejects_bad_config():
    with pytest.raises(ConfigError, match="provider: kind: must be one of embedded, gpas, ttp-fhir, got 'magic'"):
        make_provider(provider({"kind": "magic"}), KEY, SiteStore())
    with pytest.raises(ConfigError, match="wsdl"):
        make_provider(provider({"kind": "gpas"}), KEY, SiteStore())
    with pytest.raises(ConfigError, match="url"):
        make_provider(provider({"kind": "ttp-fhir"}), KEY, SiteStore())


# -- stand-in servers (helpers_http.serve) ---------------------------------------------------
WSDL = """<?xml version="1.0" encoding="UTF-8"?>
<definitions xmlns="http://schemas.xmlsoap.org/wsdl/" xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/"
  xmlns:xs="http://www.w3.org/2001/XMLSchema" xmlns:tns="{ns}" targetNamespace="{ns}" name="PSNManagerBeanService">
  <types><xs:schema targetNamespace="{ns}" elementFormDefault="unqualified">
    <xs:element name="getOrCreatePseudonymFor"><xs:complexType><xs:sequence>
      <xs:element name="value" type="xs:string"/><xs:element name="domainName" type="xs:string"/>
    </xs:sequence></xs:complexType></xs:element>
    <xs:element name="getOrCreatePseudonymForResponse"><xs:complexType><xs:sequence>
      <xs:element name="psn" type="xs:string"/></xs:sequence></xs:complexType></xs:element>
    <xs:element name="getValueFor"><xs:complexType><xs:sequence>
      <xs:element name="psn" type="xs:string"/><xs:element name="domainName" type="xs:string"/>
    </xs:sequence></xs:complexType></xs:element>
    <xs:element name="getValueForResponse"><xs:complexType><xs:sequence>
      <xs:element name="value" type="xs:string"/></xs:sequence></xs:complexType></xs:element>
  </xs:schema></types>
  <message name="getOrCreatePseudonymFor"><part name="parameters" element="tns:getOrCreatePseudonymFor"/></message>
  <message name="getOrCreatePseudonymForResponse"><part name="parameters" element="tns:getOrCreatePseudonymForResponse"/></message>
  <message name="getValueFor"><part name="parameters" element="tns:getValueFor"/></message>
  <message name="getValueForResponse"><part name="parameters" element="tns:getValueForResponse"/></message>
  <portType name="PSNManager">
    <operation name="getOrCreatePseudonymFor"><input message="tns:getOrCreatePseudonymFor"/><output message="tns:getOrCreatePseudonymForResponse"/></operation>
    <operation name="getValueFor"><input message="tns:getValueFor"/><output message="tns:getValueForResponse"/></operation>
  </portType>
  <binding name="PSNManagerBeanPortBinding" type="tns:PSNManager">
    <soap:binding transport="http://schemas.xmlsoap.org/soap/http" style="document"/>
    <operation name="getOrCreatePseudonymFor"><soap:operation soapAction=""/><input><soap:body use="literal"/></input><output><soap:body use="literal"/></output></operation>
    <operation name="getValueFor"><soap:operation soapAction=""/><input><soap:body use="literal"/></input><output><soap:body use="literal"/></output></operation>
  </binding>
  <service name="PSNManagerBeanService"><port name="PSNManagerBeanPort" binding="tns:PSNManagerBeanPortBinding">
    <soap:address location="{address}"/></port></service>
</definitions>"""

# parse requests without entity expansion or network access
SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


class GpasStandIn(StandIn):
    """Stand-in for gPAS's PSNManagerBeanService (not gPAS): one domain "omi", counter pseudonyms."""

    domains = {"omi": {}}
    requests_seen: list[bytes] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        if self.path.endswith("?wsdl"):
            base = f"http://127.0.0.1:{self.server.server_address[1]}/gpas/gpasService"
            self._send(200, WSDL.format(ns=GPAS_NS, address=base).encode(), "text/xml")
        else:
            self._send(404, b"", "text/plain")

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.requests_seen.append(body)
        try:
            env = etree.fromstring(body, SAFE_PARSER)
        except etree.XMLSyntaxError:
            return self._fault("Client", "malformed request")
        op = env.find(f"{{{SOAP_NS}}}Body")[0]
        name = etree.QName(op).localname
        args = {etree.QName(c).localname: c.text for c in op}
        domain = self.domains.get(args.get("domainName"))
        if domain is None:
            return self._fault("Server", f"domain {args.get('domainName')} not found", "UnknownDomainException")
        if name == "getOrCreatePseudonymFor":
            psn = domain.setdefault(args["value"], f"omi_{len(domain) + 1:06d}")
            return self._reply(name, "psn", psn)
        if name == "getValueFor":
            for value, psn in domain.items():
                if psn == args["psn"]:
                    return self._reply(name, "value", value)
            return self._fault("Server", f"value for psn {args['psn']} not found", "UnknownValueException")
        return self._fault("Client", "no such operation")

    def _reply(self, op, field, text):
        xml = (f'<S:Envelope xmlns:S="{SOAP_NS}"><S:Body><ns2:{op}Response xmlns:ns2="{GPAS_NS}">'
               f"<{field}>{text}</{field}></ns2:{op}Response></S:Body></S:Envelope>")
        self._send(200, xml.encode(), "text/xml; charset=utf-8")

    def _fault(self, code, text, detail=None):
        det = f'<detail><ns2:{detail} xmlns:ns2="{GPAS_NS}"><message>{text}</message></ns2:{detail}></detail>' if detail else ""
        xml = (f'<S:Envelope xmlns:S="{SOAP_NS}"><S:Body><S:Fault><faultcode>S:{code}</faultcode>'
               f"<faultstring>{text}</faultstring>{det}</S:Fault></S:Body></S:Envelope>")
        self._send(500, xml.encode(), "text/xml; charset=utf-8")


def test_gpas_client_against_soap_stand_in():
    GpasStandIn.domains = {"omi": {}}
    GpasStandIn.requests_seen = []
    with serve(GpasStandIn) as base:
        p = make_provider(provider({"kind": "gpas", "wsdl": f"{base}/gpas/gpasService?wsdl"}), KEY, SiteStore())
        psn = p.pseudonymize("omi", "PAT-77")
        assert psn == "omi_000001" == p.pseudonymize("omi", "PAT-77")
        assert p.pseudonymize("omi", "PAT-78") == "omi_000002"
        assert p.depseudonymize("omi", psn) == "PAT-77"
        # the wire format is gPAS's: wrapped element in the gPAS namespace, unqualified children
        req = etree.fromstring(GpasStandIn.requests_seen[0], SAFE_PARSER)
        op = req.find(f"{{{SOAP_NS}}}Body")[0]
        assert op.tag == f"{{{GPAS_NS}}}getOrCreatePseudonymFor"
        assert [c.tag for c in op] == ["value", "domainName"]
        with pytest.raises(UnknownPseudonymError, match="UnknownDomainException") as err:
            p.pseudonymize("nodomain", "PAT-77")
        assert "PAT-77" not in str(err.value)  # the fault text echoes the value; we do not
        with pytest.raises(UnknownPseudonymError, match="UnknownValueException") as err:
            p.depseudonymize("omi", "omi_999999")
        assert "omi_999999" not in str(err.value)


def test_gpas_unreachable_is_a_pseudonym_error():
    with serve(GpasStandIn) as base:
        p = make_provider(provider({"kind": "gpas", "wsdl": f"{base}/gpas/gpasService?wsdl", "timeout": 2}), KEY, SiteStore())
    # the server is gone now
    with pytest.raises(PseudonymError, match="getOrCreatePseudonymFor failed"):
        p.pseudonymize("omi", "PAT-1")
    with pytest.raises(PseudonymError, match="WSDL not loadable"):
        make_provider(provider({"kind": "gpas", "wsdl": f"{base}/gpas/gpasService?wsdl", "timeout": 2}), KEY, SiteStore())


class TtpStandIn(StandIn):
    """Stand-in for the THS TTP-FHIR gateway's gPAS operations (not the gateway itself)."""

    pairs: dict = {}
    mode = "ok"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        params = {p["name"]: p.get("valueString") for p in body.get("parameter", [])}
        if self.mode == "garbage":
            return self._send(200, {"resourceType": "Bundle"})
        if self.mode == "error":
            return self._send(500, {"resourceType": "OperationOutcome",
                                    "issue": [{"severity": "error", "code": "exception"}]})
        if self.headers.get("Content-Type") != "application/fhir+json":
            return self._send(415, {})
        domain = params.get("target")
        if domain != "omi":
            return self._send(404, {"resourceType": "OperationOutcome",
                                    "issue": [{"severity": "error", "code": "not-found",
                                               "diagnostics": f"domain {domain} unknown"}]})
        if self.path.endswith("/ttp-fhir/fhir/gpas/$pseudonymizeAllowCreate"):
            original = params["original"]
            psn = self.pairs.setdefault(original, f"ttp_{len(self.pairs) + 1:04d}")
            return self._send(200, _answer("pseudonym", domain, original, psn))
        if self.path.endswith("/ttp-fhir/fhir/gpas/$dePseudonymize"):
            for original, psn in self.pairs.items():
                if psn == params["pseudonym"]:
                    return self._send(200, _answer("original", domain, original, psn))
            return self._send(422, {"resourceType": "OperationOutcome",
                                    "issue": [{"severity": "error", "code": "processing"}]})
        return self._send(404, {})


def _answer(name, domain, original, psn):
    ident = lambda v: {"system": "https://ths-greifswald.de/gpas", "value": v}  # noqa: E731
    return {"resourceType": "Parameters", "parameter": [{"name": name, "part": [
        {"name": "target", "valueIdentifier": ident(domain)},
        {"name": "original", "valueIdentifier": ident(original)},
        {"name": "pseudonym", "valueIdentifier": ident(psn)}]}]}


def test_ttp_fhir_client_against_stand_in():
    TtpStandIn.pairs, TtpStandIn.mode = {}, "ok"
    with serve(TtpStandIn) as base:
        p = make_provider(provider({"kind": "ttp-fhir", "url": f"{base}/ttp-fhir/fhir/gpas"}), KEY, SiteStore())
        psn = p.pseudonymize("omi", "PAT-5")
        assert psn == "ttp_0001" == p.pseudonymize("omi", "PAT-5")
        assert p.depseudonymize("omi", psn) == "PAT-5"
        with pytest.raises(UnknownPseudonymError, match="HTTP 404 not-found") as err:
            p.pseudonymize("nodomain", "PAT-5")
        assert "PAT-5" not in str(err.value) and "unknown" not in str(err.value)  # no diagnostics echoed
        with pytest.raises(UnknownPseudonymError, match="HTTP 422"):
            p.depseudonymize("omi", "ttp_9999")
        TtpStandIn.mode = "error"
        with pytest.raises(PseudonymError, match="HTTP 500 exception"):
            p.pseudonymize("omi", "PAT-6")
        TtpStandIn.mode = "garbage"
        with pytest.raises(PseudonymError, match="not a Parameters resource"):
            p.pseudonymize("omi", "PAT-6")
    with pytest.raises(PseudonymError, match="unreachable"):
        p.pseudonymize("omi", "PAT-6")


class EntityWsdlStandIn(GpasStandIn):
    """Serves a WSDL carrying a DTD with an entity: the client must refuse to expand it."""

    def do_GET(self):
        doc = WSDL.format(ns=GPAS_NS, address="http://127.0.0.1:9/x")
        doc = doc.replace('<?xml version="1.0" encoding="UTF-8"?>',
                          '<?xml version="1.0"?><!DOCTYPE definitions [<!ENTITY boom "x">]>')
        self._send(200, doc.encode(), "text/xml")


def test_gpas_client_refuses_dtd_and_entities():
    with serve(EntityWsdlStandIn) as base:
        with pytest.raises(PseudonymError, match="WSDL not loadable.*DTDForbidden"):
            make_provider(provider({"kind": "gpas", "wsdl": f"{base}/gpas/gpasService?wsdl"}), KEY, SiteStore())
