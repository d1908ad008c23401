"""What one bad instance does to its study is the site's choice: refuse the study (default) or send
the rest and report every refused instance (step outputs, audit trail, log, CLI); never silently."""

from __future__ import annotations

import json
import logging
import re

import pydicom
import pytest

from omi_dsf.audit import AuditTrail
from omi_dsf.cli import main
from omi_dsf.steps.send import REFUSED_LINES_MAX, refused_text
from omi_dsf.config import ConfigError
from omi_dsf.steps.api import StepContext, StepError
from helpers_provider import manifest_at
from omi_dsf.transfer import manifest
from test_deid_step import at_provider, burned_in, provider, pseudonymize, site  # noqa: F401  (the step tests' fixtures)

LINE = re.compile(r"^instance (\d+) \(SOPInstanceUID 2\.25\.\d+\): BurnedInAnnotation \(0028,0301\) is YES;"
                  r" no pixel recipe covers .* \(rule: burned-in text")


@pytest.fixture
def policy_site(site):
    """The step tests' site (4 instances, folder source, a provider) with an audit trail; instance 3
    says it shows text, and no pixel recipe covers it."""
    tmp, cfg, first = site
    burned_in(site, 2)
    cfg["audit"] = str(tmp / "audit.sqlite")
    return tmp, cfg, first


def ctx(cfg, key):
    return StepContext(topic="send", business_key=key, site=cfg, item_id="qr-1")


def test_default_policy_refuses_the_study(policy_site, provider):
    tmp, cfg, first = policy_site
    with pytest.raises(StepError, match=r"instance 3 \(SOPInstanceUID 2\.25\.\d+\): BurnedInAnnotation"):
        pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx(cfg, "bk-default"))
    assert at_provider(provider, cfg, first.StudyInstanceUID) == []


def test_send_rest_sends_the_others_and_reports_the_refused_one(policy_site, provider, caplog):
    tmp, cfg, first = policy_site
    cfg["pseudonymization"]["on_refused_instance"] = "send-rest"
    with caplog.at_level(logging.WARNING, logger="omi_dsf.step"):
        out = pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx(cfg, "bk-rest"))
    assert out["instance-count"] == 3 and out["refused-instance-count"] == 1
    assert LINE.match(out["refused-instances"]).group(1) == "3"
    sent = at_provider(provider, cfg, first.StudyInstanceUID)
    assert len(sent) == 3
    # the manifest lists the three sent, not the refused one (the provider waits for no instance that never comes)
    (kos,) = manifest_at(provider["store"], out["pseudonymized-study-instance-uid"])
    assert {sop for sops in manifest.listed(kos.read_bytes()).values() for sop in sops} == \
        {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in sent}
    events = [e for e in AuditTrail(cfg["audit"]).events("bk-rest") if e.action == "instance-refused"]
    assert [e.details["error"] for e in events] == [out["refused-instances"]]
    assert events[0].details["pseudonymized_study_uid"] == out["pseudonymized-study-instance-uid"]
    assert any(out["refused-instances"] in r.getMessage() for r in caplog.records)
    for text in [out["refused-instances"]] + [r.getMessage() for r in caplog.records]:
        assert str(first.PatientName) not in text and first.PatientID not in text
        assert first.StudyInstanceUID not in text


def test_send_rest_with_nothing_left_is_an_error(policy_site):
    tmp, cfg, first = policy_site
    cfg["pseudonymization"]["on_refused_instance"] = "send-rest"
    for p in (tmp / "pacs" / first.StudyInstanceUID).iterdir():
        ds = pydicom.dcmread(p)
        ds.BurnedInAnnotation = "YES"
        ds.save_as(p)
    with pytest.raises(StepError, match=r"no instance of the study could be sent: 4 refused; the first: instance 1 "):
        pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx(cfg, "bk-none"))


def test_unknown_policy_is_a_config_error(policy_site):
    tmp, cfg, first = policy_site
    cfg["pseudonymization"]["on_refused_instance"] = "shrug"
    with pytest.raises(ConfigError, match="pseudonymization.on_refused_instance: must be 'refuse-study' or "
                                          "'send-rest', got 'shrug'"):
        ctx(cfg, "bk-x")


def test_long_reports_are_cut_with_a_count():
    text = refused_text([f"instance {n}: x" for n in range(REFUSED_LINES_MAX + 7)])
    assert text.count("\n") == REFUSED_LINES_MAX
    assert text.endswith("... and 7 more (see the site's audit trail)")


def test_cli_send_rest_names_each_refused_file(policy_site, capsys):
    tmp, cfg, first = policy_site
    src = tmp / "pacs" / first.StudyInstanceUID
    bad_name = sorted(p.name for p in src.iterdir())[2]
    base = ["deid", str(src), str(tmp / "cli-out"), "--domain", "omi", "--key-file",
            cfg["pseudonymization"]["key_file"], "--store", str(tmp / "cli.sqlite")]
    assert main(base) == 2                                        # default: the study stops
    assert bad_name in capsys.readouterr().err
    assert main(base + ["--on-refused-instance", "send-rest"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["instances"] == 3 and summary["refused"] == 1
    assert summary["refused_instances"][0].startswith(f"{bad_name} (SOPInstanceUID 2.25.")
    assert f"refused {bad_name} (SOPInstanceUID" in captured.err
