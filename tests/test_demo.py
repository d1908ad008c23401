"""The demo harness (omi_dsf/demo.py) outside the DSF: what it leaves behind when it cannot start."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from omi_dsf import demo as demo_module
from omi_dsf.demo import Demo
from omi_dsf.testbed.certs import TestCA

pytestmark = pytest.mark.integration   # starts a real dcmqrscp and a gateway process


def test_a_start_that_fails_half_way_stops_what_it_started(tmp_path, monkeypatch):
    real = demo_module.GatewayProcess
    started = []

    class SecondGatewayFails(real):
        def start(self):
            if started:
                raise RuntimeError("the provider's gateway cannot start")
            started.append(super().start())
            return started[-1]

    monkeypatch.setattr(demo_module, "GatewayProcess", SecondGatewayFails)
    bed_ca = TestCA(tmp_path / "bed-pki")        # the test bed's CA is all the start reads of the bed
    bed_ca.ensure()
    d = Demo(state=SimpleNamespace(ca_cert=str(bed_ca.cert_path)), folder=tmp_path / "demo")
    with pytest.raises(RuntimeError, match="provider's gateway"):
        d.start()
    assert started, "the requester's gateway was started first"
    # nothing the failed start began runs on: the PACS and the first gateway are stopped
    assert d.servers == [] and d.pacs.proc is None and started[0].proc.poll() is not None
