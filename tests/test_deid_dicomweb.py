"""The send step over DICOMweb: QIDO-RS and WADO-RS from a real DICOMweb server (the site's PACS),
STOW-RS to the provider's gateway.

Orthanc (Debian package with its DICOMweb plugin) plays the gateway; it is a real server.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from omi_dsf.steps.api import StepContext, StepError
from omi_dsf.steps.send import send
from helpers_provider import PROVIDER, instances_at, provider_gateway
from omi_dsf.testkit.phantom import write_ct_study

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("Orthanc") and not Path("/usr/sbin/Orthanc").exists(),
                       reason="Orthanc not installed (tools/apt-packages.txt: orthanc, orthanc-dicomweb)"),
]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    from omi_dsf.testkit.legacy_pacs import Orthanc

    root = tmp_path_factory.mktemp("deid-dicomweb")
    paths = write_ct_study(root / "study", slices=5, rows=32, cols=32, seed=21)
    with Orthanc(root / "orthanc") as orthanc:
        orthanc.load(paths)
        yield orthanc, pydicom.dcmread(paths[0]), root


def test_wado_in_stow_out(pacs):
    orthanc, first, root = pacs
    key = root / "key"
    key.write_text("dicomweb-step-key-0123456789")
    with provider_gateway(root / "provider") as provider:
        site = {"gateway_url": orthanc.dicomweb_url, "providers": provider["providers"], "pseudonymization": {
            "domain": "omi-web", "key_file": str(key), "store": str(root / "site.sqlite"),
            "source": {"kind": "dicomweb"}}}                      # the site's gateway_url
        out = send({"study-instance-uid": first.StudyInstanceUID, "patient-identifier": first.PatientID,
                    "provider-organization": PROVIDER}, StepContext(topic="send", business_key="bk-web", site=site))
        stored = [pydicom.dcmread(p) for p in instances_at(provider["store"], out["pseudonymized-study-instance-uid"])]
    assert out["instance-count"] == 5
    web = DICOMwebClient(orthanc.dicomweb_url)
    assert len(stored) == 5
    for ds in stored:
        assert ds.PatientID == out["pseudonym"] and ds.PatientIdentityRemoved == "YES"
        assert ds.PatientName != first.PatientName and not ds.get("AccessionNumber")
    # the original study is still there, untouched
    assert len(web.search_for_instances(first.StudyInstanceUID)) == 5


def test_unknown_study_over_wado_is_a_step_error(pacs):
    orthanc, first, root = pacs
    key = root / "key2"
    key.write_text("dicomweb-step-key-0123456789")
    with provider_gateway(root / "provider2") as provider:
        site = {"pseudonymization": {
            "domain": "omi-web", "key_file": str(key), "store": str(root / "site2.sqlite"),
            "source": {"kind": "dicomweb", "url": orthanc.dicomweb_url}}, "providers": provider["providers"]}
        with pytest.raises(StepError, match="the study was not found in the configured source"):
            send({"study-instance-uid": "1.2.3.999", "provider-organization": PROVIDER},
                 StepContext(topic="send", business_key="bk-404", site=site))
