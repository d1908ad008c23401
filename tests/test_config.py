"""Typed configuration (omi_dsf.config and the models of each part): whole files validated at start,
errors in one line naming the key path, relative paths from the file's folder at every level, and
the option tables in the docs generated from the models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from omi_dsf.cli import main
from omi_dsf.config import ConfigError
from omi_dsf.config.docs import table, update
from omi_dsf.worker.config import load_site_config

ROOT = Path(__file__).resolve().parent.parent


def _site(folder: Path, steps: dict | None = None, **top) -> Path:
    """A site file whose identity files exist (the worker stops before it uses them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("ca.pem", "client.pem", "client.key"):
        (folder / name).write_text("x")
    raw = {"site": "dic.omi.test", "fhir_url": "https://dsf.dic.test/fhir", "ca_file": "ca.pem",
           "client_cert": "client.pem", "client_key": "client.key", **top}
    if steps is not None:
        raw["steps"] = steps
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("steps, line", [
    ({"providers": {"ai.omi.test": {"gateway_url": "https://gw.ai.test", "ca_file": "gone.pem"}}},
     "steps.providers.ai.omi.test.ca_file: file {folder}/gone.pem does not exist"),
    ({"providers": {"ai.omi.test": {"gateway_url": "http://gw.ai.test", "ca_file": "ca.pem"}}},
     "steps.providers.ai.omi.test.gateway_url: must be an https URL, got 'http://gw.ai.test'"),
    ({"send": {"batch_mb": "big"}}, "steps.send.batch_mb: expected a number, got 'big'"),
    ({"pseudonymization": {"domain": "d", "sinc": {"kind": "folder", "path": "out"}}},
     "steps.pseudonymization.sinc: unknown key"),
    ({"pseudonymization": {"domain": "d", "provider": {"kind": "gpas"}}},
     "steps.pseudonymization.provider.wsdl: required"),
    ({"pseudonymization": {"domain": "d", "provider": {"kind": "magic"}}},
     "steps.pseudonymization.provider.kind: must be one of embedded, gpas, ttp-fhir, got 'magic'"),
    ({"pseudonymization": {"domain": "d", "source": {"kind": "folder"}}},
     "steps.pseudonymization.source.path: required for kind folder"),
    ({"pseudonymization": {"domain": "d", "sink": {"kind": "folder", "path": "out"}}},
     "steps.pseudonymization.sink: unknown key"),
    ({"consent": {"kind": "gics", "url": "https://ttp.test/gics", "identifier_system": "s"}},
     "steps.consent.domain: required for kind gics"),
    ({"return": {"modalities": []}}, "steps.return.modalities: must not be empty"),
    ({"ai_services": {"lung": {"model": "lung-seg"}}}, "steps.ai_services.lung.url: required"),
    ({"send": {"batch_mb": True}}, "steps.send.batch_mb: expected a number, got True"),
    ({"gatway_url": "https://gw.test"}, "steps.gatway_url: unknown key"),
])
def test_a_bad_steps_block_stops_the_worker_at_start_naming_the_key(tmp_path, capsys, steps, line):
    site = _site(tmp_path / "conf", steps)
    assert main(["worker", "--site", str(site), "--topics", "consent"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: site config {site}: {line.format(folder=tmp_path / 'conf')}\n"


def test_top_level_errors_name_the_key_too(tmp_path, capsys):
    site = _site(tmp_path, worker={"lease_ttl": "1m"})
    assert main(["worker", "--site", str(site), "--topics", "consent"]) == 2
    assert capsys.readouterr().err == f"error: site config {site}: worker.lease_ttl: expected a number, got '1m'\n"
    site = _site(tmp_path, fhir_url="dsf.dic.test")
    assert main(["worker", "--site", str(site), "--topics", "consent"]) == 2
    assert "fhir_url: must be an http(s) URL, got 'dsf.dic.test'" in capsys.readouterr().err
    site.write_text("steps: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"site config .*site.yaml: steps: expected a mapping"):
        load_site_config(site)


def test_a_worker_refuses_topics_whose_steps_lack_their_settings(tmp_path, capsys):
    site = _site(tmp_path, {"consent": {"kind": "folder", "path": "consents"}})
    assert main(["worker", "--site", str(site), "--topics", "consent,return"]) == 2
    assert capsys.readouterr().err == (f"error: {site.resolve()}: steps.pseudonymization: required for the return "
                                       "step (and 2 more)\n")
    assert main(["worker", "--site", str(site), "--topics", "infer"]) == 2
    assert "steps.ai_service_url (or steps.ai_services): required for the infer step" in capsys.readouterr().err
    cfg = load_site_config(site)
    assert cfg.steps.missing_for(["consent"]) == []
    assert cfg.steps.missing_for(["send"]) == ["steps.pseudonymization: required for the send step",
                                               "steps.providers: required for the send step"]


def test_paths_resolve_from_the_file_folder_at_every_level(tmp_path, monkeypatch):
    conf = tmp_path / "etc" / "omi"
    site = _site(conf, {"pseudonymization": {"domain": "d", "key_file": "site.key", "store": "state/site.sqlite",
                                             "source": {"kind": "folder", "path": "pacs/{study_uid}"},
                                             },
                        "providers": {"ai": {"gateway_url": "https://gw.test", "ca_file": "ca.pem"}}},
                    audit="state/audit.sqlite", lease_store="sqlite:///state/leases.db")
    (conf / "site.key").write_text("k" * 32)
    monkeypatch.chdir(tmp_path)          # not the file's folder
    cfg = load_site_config(site)
    p = cfg.steps.pseudonymization
    assert (p.key_file, p.store, p.source.path) == (conf / "site.key", str(conf / "state/site.sqlite"),
                                                    conf / "pacs/{study_uid}")
    assert cfg.steps.providers["ai"].ca_file == conf / "ca.pem" == cfg.ca_file
    assert (cfg.audit, cfg.lease_store) == (str(conf / "state/audit.sqlite"), str(conf / "state/leases.db"))
    assert load_site_config(_site(conf, lease_store="postgresql://omi@db/omi")).lease_store == "postgresql://omi@db/omi"


def test_the_steps_get_the_typed_settings(tmp_path):
    from omi_dsf.steps.api import StepContext

    cfg = load_site_config(_site(tmp_path, {"send": {"batch_mb": 8}, "return": {"modalities": ["SEG"]}}))
    ctx = StepContext(topic="send", business_key="bk", site=cfg.steps)
    assert ctx.site is cfg.steps and ctx.site.send.batch_bytes == 8 << 20 and ctx.site.send.batch_instances == 64
    assert ctx.site.return_.modalities == ["SEG"] and ctx.site.pseudonymization is None
    with pytest.raises(ConfigError, match="steps: send.batch_instances: must be greater than or equal to 1, got 0"):
        StepContext(topic="send", business_key="bk", site={"send": {"batch_instances": 0}})


def test_gateway_and_server_files_are_one_line_with_exit_2(tmp_path, capsys):
    gw = tmp_path / "gw.yaml"
    gw.write_text("auth: {anonymous: true}\nbackends:\n  PACS: {type: dimse, host: pacs, port: 104, retreive: get}\n")
    assert main(["gateway", "--config", str(gw), "--check"]) == 2
    assert capsys.readouterr().err == f"error: {gw}: backends.PACS.retreive: unknown key\n"
    reg = tmp_path / "registry.yaml"
    reg.write_text("health: {interval: 30s}\n")
    assert main(["registry", "--config", str(reg)]) == 2
    assert capsys.readouterr().err == f"error: {reg}: health.interval: expected a number, got '30s'\n"


def test_docs_option_tables_are_generated_from_the_models(tmp_path):
    """Every options table in docs/*.md is what `python -m omi_dsf config-docs` makes of the models
    today; after a change to a model, run it (and commit the docs)."""
    stale = update(ROOT, check=True)
    assert stale == [], f"out of date: {', '.join(str(p.relative_to(ROOT)) for p in stale)} " \
                        "(run python -m omi_dsf config-docs)"
    # the check itself: a table that differs from its model is found, and rewritten
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "x.md"
    page.write_text("# x\n<!-- options: omi_dsf.transfer.config:SendSettings -->\n| old |\n<!-- /options -->\n")
    assert update(tmp_path, check=True) == [page]
    assert update(tmp_path) == [page] and update(tmp_path, check=True) == []
    assert "| `batch_mb` | number | `32` | MiB per STOW-RS request at most |" in page.read_text()
    assert "| `send.batch_mb` | number | `32` |" in table("omi_dsf.transfer.config:SendSettings prefix=send.")


def test_deid_provider_options_are_checked_by_the_same_models(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    key = tmp_path / "site.key"
    key.write_text("k" * 32)
    args = ["deid", str(tmp_path / "in"), str(tmp_path / "out"), "--domain", "d", "--key-file", str(key),
            "--store", str(tmp_path / "site.sqlite")]   # not the default store in the working folder
    assert main([*args, "--provider", "gpas"]) == 2
    assert capsys.readouterr().err == "error: --provider gpas needs --provider-url\n"
    assert main([*args, "--provider", "ttp-fhir", "--provider-url", "ftp://ttp"]) == 2
    assert capsys.readouterr().err == "error: --provider-url: url: must be an http(s) URL, got 'ftp://ttp'\n"
