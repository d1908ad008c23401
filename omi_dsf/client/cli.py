"""The `omi` client for a DIC: `services`, `submit`, `status`, `results`.

`services` asks the service registry; the others talk to the site's own DSF FHIR server with the
site's certificate (the site YAML of the workers). Human-readable output by default, `--json` for
scripts; every error is one line on stderr (exit code 2).

What it sends is checked first: URLs (http or https with a host; plain http only to the registry,
which gets no patient data, unless the site file says `insecure: true`), UIDs (PS3.5 9.1), numbers.
What servers answer is printed with control characters and terminal escapes made visible.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _positive(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not n > 0 or n == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {value!r}")
    return n


def _not_negative(value: str) -> float:
    return 0.0 if value.strip() in ("0", "0.0") else _positive(value)


def _count(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 1000, got {value!r}")
    return int(value)


def _registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", help="registry base URL (default: $OMI_REGISTRY_URL or registry_url in --site)")
    p.add_argument("--registry-ca", help="CA file for the registry's TLS certificate (default: $OMI_REGISTRY_CA, "
                                         "registry_ca_file in --site, or the system CAs)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("services", help="AI services in the registry, with their status")
    _registry_args(p)
    p.add_argument("--site", help="site configuration (YAML) to read registry_url from")
    p.add_argument("--modality", help="e.g. CT (comma: any of)")
    p.add_argument("--body-site", help="e.g. 39607008 or http://snomed.info/sct|39607008")
    p.add_argument("--type", dest="service_type", help="service type, e.g. segmentation")
    p.add_argument("--organization", help="provider organization (DSF identifier)")
    p.add_argument("--status", help="up, degraded, down, unknown (comma: any of)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_services)

    p = subparsers.add_parser("submit", help="start an OMI inference request at this site's DSF (one study, "
                                             "or one request per study of a cohort)")
    p.add_argument("--study", help="StudyInstanceUID in the local PACS")
    p.add_argument("--patient", help="the patient's identifier at this site (never leaves it)")
    p.add_argument("--cohort", help="CSV file, one study per row: StudyInstanceUID, patient identifier")
    p.add_argument("--query", help="the cohort as a QIDO-RS query at the site's gateway (gateway_url), "
                                   "e.g. 'ModalitiesInStudy=CT&StudyDate=20240101-20241231'")
    p.add_argument("--record", help="the cohort record file (default: COHORT.record.csv next to --cohort; "
                                    "required with --query); running again resumes it")
    p.add_argument("--parallel", type=_count, default=4, help="requests of the cohort in flight at once (default 4)")
    p.add_argument("--retry-failed", action="store_true", help="run the cohort's failed studies again")
    p.add_argument("--interval", type=_positive, default=2.0, help="seconds between looks at the DSF (cohorts)")
    p.add_argument("--gateway", help="the site's DICOMweb gateway for --query (default: gateway_url in --site)")
    p.add_argument("--gateway-ca", help="CA file for the gateway's certificate (default: gateway_ca_file in --site)")
    p.add_argument("--service", required=True, help="AI service identifier (registry HealthcareService id)")
    p.add_argument("--provider", help="provider organization; default: the registry entry's provider")
    p.add_argument("--site", required=True, help="site configuration (YAML)")
    _registry_args(p)
    p.add_argument("--wait", type=_not_negative, default=60, help="seconds to wait for the business key (default 60)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_submit)

    p = subparsers.add_parser("status", help="where requests are: consent, prepare, send, infer, return")
    p.add_argument("business_key", nargs="?", help="one request (default: the newest requests)")
    p.add_argument("--site", required=True, help="site configuration (YAML)")
    p.add_argument("--cohort", help="a cohort: its record file (or the cohort CSV it was made from)")
    p.add_argument("--watch", action="store_true", help="follow live until the request completes or fails")
    p.add_argument("--interval", type=_positive, default=2.0, help="seconds between refreshes with --watch")
    p.add_argument("--timeout", type=_positive, help="stop watching after this many seconds (exit code 3)")
    p.add_argument("--limit", type=_count, default=20, help="how many requests to list (1 to 1000)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)

    p = subparsers.add_parser("results", help="the returned objects of a request and where they are stored")
    p.add_argument("business_key")
    p.add_argument("--site", required=True, help="site configuration (YAML)")
    p.add_argument("--gateway", help="the site's DICOMweb gateway (service root) to list the stored result "
                                     "series from (default: gateway_url in --site; none: outputs only)")
    p.add_argument("--gateway-ca", help="CA file for the gateway's certificate (default: gateway_ca_file in --site)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_results)


# -- helpers -------------------------------------------------------------------------------------


def _url(url: str, what: str, site=None, patient_data: bool = False) -> str:
    """`url` if it is an http(s) URL with a host; plain http only where no patient data goes, or
    where the site file says `insecure: true` (a test set-up)."""
    import httpx

    from omi_dsf.errors import UserError

    try:
        parsed = httpx.URL(str(url))
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise UserError(f"{what} {str(url)[:200]!r} is not a valid URL ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise UserError(f"{what} {str(url)[:200]!r}: unsupported URL scheme {parsed.scheme!r} (http or https)")
    if not parsed.host or parsed.port is not None and not 0 < parsed.port < 65536:
        raise UserError(f"{what} {str(url)[:200]!r} has no valid host and port")
    if patient_data and parsed.scheme == "http" and not (site is not None and site.insecure):
        where = f"set insecure: true in {site.path}" if site is not None else "use https://"
        raise UserError(f"{what} {url} is plain http://: patient identifiers would travel in clear text; "
                        f"use https:// (or, for a test set-up only, {where})")
    return str(url)


def _tls(what: str, ca_file: str | None, cert=None, key=None, password=None):
    """A verifying TLS context, or one line saying which file is wrong."""
    import ssl

    from omi_dsf.errors import UserError
    from omi_dsf.tls import client_context

    if ca_file and not os.path.exists(ca_file):
        raise UserError(f"{what} CA file {ca_file} does not exist")
    try:
        ctx = client_context(ca_file)
    except ssl.SSLError as exc:
        raise UserError(f"{what} CA file {ca_file} holds no PEM certificate ({exc.reason or exc})") from None
    except OSError as exc:
        raise UserError(f"{what} CA file {ca_file}: {exc.strerror}") from None
    if cert:
        try:
            ctx.load_cert_chain(cert, key, password)
        except (ssl.SSLError, OSError) as exc:
            raise UserError(f"{what}: cannot load client certificate {cert}: {exc}") from None
    return ctx


def _uid(value: str, what: str) -> str:
    """A DICOM UID (PS3.5 9.1: digits and dots, no leading zeros, at most 64 characters), or one line."""
    from omi_dsf.errors import UserError
    from omi_dsf.dicomweb.query import is_uid

    if not (value.isascii() and value.isprintable() and is_uid(value)):
        raise UserError(f"{what} {value[:80]!r} is not a valid DICOM UID (digits and dots, no leading zeros "
                        "in a component, at most 64 characters)")
    return value


def _site(path: str):
    from omi_dsf.errors import UserError
    from omi_dsf.worker.config import load_site_config

    site = load_site_config(path)
    org = site.site
    if not org:
        raise UserError(f"{site.path}: 'site' (this organization's DSF identifier) is missing")
    return site, str(org)


def _registry(args, site=None):
    from omi_dsf.errors import UserError
    from omi_dsf.client.registry_client import RegistryClient

    url = args.registry or os.environ.get("OMI_REGISTRY_URL") or (site.registry_url if site else None)
    if not url:
        raise UserError("no registry: give --registry URL, set OMI_REGISTRY_URL, or registry_url in the site YAML")
    ca = args.registry_ca or os.environ.get("OMI_REGISTRY_CA")
    if not ca and site and site.registry_ca_file:
        ca = str(site.registry_ca_file)
    # the registry learns which services are searched for, nothing about patients: http is allowed
    return RegistryClient(_url(url, "registry"), verify=_tls("registry", ca))


def _dsf(site):
    from omi_dsf.errors import UserError
    from omi_dsf.dsf.client import DsfClient
    from omi_dsf.dsf.errors import DsfError

    identity = site.identity
    _url(identity.fhir_url, f"{site.path}: fhir_url", site, patient_data=True)
    try:
        return DsfClient(identity)
    except (DsfError, OSError) as exc:
        raise UserError(f"{site.path}: {exc}") from None


def _emit(args, data, text: str) -> None:
    from omi_dsf.terminal import printable

    print(json.dumps(data, indent=2, default=str) if args.json else printable(text))


def _warn(text: str) -> None:
    from omi_dsf.terminal import printable

    print(f"warning: {printable(text, lines=False)}", file=sys.stderr)


# -- commands ------------------------------------------------------------------------------------


def _services(args) -> int:
    from omi_dsf.client import render

    site = _site(args.site)[0] if args.site else None
    filters = {"modality": args.modality, "body-site": args.body_site, "service-type": args.service_type,
               "organization": args.organization, "health": args.status}
    with _registry(args, site) as reg:
        found = reg.services(filters)
    _emit(args, [s.as_dict() for s in found], render.services_table(found))
    return 0


def _provider(args, site) -> str:
    from omi_dsf.errors import UserError

    if args.provider:
        return args.provider
    with _registry(args, site) as reg:
        service = reg.service(args.service)
    if not service.provider:
        raise UserError(f"registry entry {args.service} names no provider organization; give --provider")
    if service.status == "down":
        _warn(f"{args.service} is down at the registry ({service.detail or 'no detail'})")
    return service.provider


def _submit(args) -> int:
    from omi_dsf.errors import UserError
    from omi_dsf.client.requests import dsf_call, start

    sources = [o for o, v in (("--study", args.study), ("--cohort", args.cohort), ("--query", args.query)) if v]
    if len(sources) != 1:
        raise UserError("give one of --study (with --patient), --cohort FILE or --query QUERY"
                        + (f", not {' and '.join(sources)}" if sources else ""))
    if args.study is None:
        return _submit_cohort(args)
    if args.patient is None:
        raise UserError("--study needs --patient (the patient's identifier at this site)")
    _uid(args.study, "--study")
    site, org = _site(args.site)
    provider = _provider(args, site)
    inputs = {"study-instance-uid": args.study, "patient-identifier": args.patient,
              "ai-service-identifier": args.service, "provider-organization": provider}
    with _dsf(site) as client:
        try:
            task, key = dsf_call("submit", start, client, org, inputs, wait=args.wait)
        except ValueError as exc:   # an input the spec does not allow (e.g. an empty --study)
            raise UserError(f"submit: {exc}") from None
    from omi_dsf.dsf.tasks import outputs
    error = outputs(task).get("error")
    if task.get("status") == "failed" and not key:   # refused before the process started
        raise UserError(f"the DSF refused the request: Task/{task['id']} failed: {error or 'no reason given'}")
    if not key:
        raise UserError(f"Task/{task['id']} was accepted but has no business key after {args.wait:g} s "
                        "(is the OMI plugin deployed in this site's BPE?)")
    data = {"business_key": key, "task": f"Task/{task['id']}", "status": task.get("status"),
            "service": args.service, "provider": provider, "error": error}
    if task.get("status") == "failed":   # started, and already failed (e.g. a fast denial)
        _warn(f"the request already failed: {error or 'no reason given'}")
    _emit(args, data, f"submitted: business key {key}\n  Task/{task['id']} {task.get('status')}; "
                      f"service {args.service} at {provider}\n  follow it: omi status {key} --site {args.site} --watch")
    return 0


def _cohort_record(args):
    from pathlib import Path

    from omi_dsf.client.cohort import Record
    from omi_dsf.errors import UserError

    if args.record:
        return Record(args.record)
    if args.query:
        raise UserError("--query needs --record FILE (where the cohort's progress is kept)")
    cohort = Path(args.cohort)
    return Record(cohort.with_name(cohort.stem + ".record.csv"))


def _submit_cohort(args) -> int:
    from omi_dsf.client import cohort
    from omi_dsf.client.progress_view import CohortView
    from omi_dsf.dicomweb.query import is_uid
    from omi_dsf.errors import UserError

    site, org = _site(args.site)
    record = _cohort_record(args)
    if args.cohort:
        studies = cohort.read_cohort_csv(args.cohort, is_uid)
    else:
        studies = _query_cohort(args, site)
    provider = _provider(args, site)
    if not record.lock():
        raise UserError(f"another omi submit is running the cohort {record.path} (lock {record.path.name}.lock)")
    try:
        if record.exists():
            record.load()
        added = record.add(studies)
        retried = cohort.retry_failed(record) if args.retry_failed else 0
        record.save()
        limits = cohort.Limits(parallel=args.parallel, provider=site.in_flight_per_provider, interval=args.interval)
        with _dsf(site) as client, CohortView(enabled=not args.json) as view:
            if added != len(record.rows) or retried:
                view.note(f"resuming {record.path}: {added} new, {retried} failed ones again")
            run = cohort.Run(record, client, org, args.service, provider, limits, on_change=view.update)
            from omi_dsf.client.requests import dsf_call
            result = dsf_call("cohort", run.run)
    finally:
        record.unlock()
    _emit(args, result, cohort.summary_text(result))
    return 1 if result["failed"] else 0


def _query_cohort(args, site):
    from omi_dsf.client import cohort
    from omi_dsf.dicomweb.query import is_uid
    from omi_dsf.dicomweb_client import DicomwebClient, DicomwebError
    from omi_dsf.errors import UserError
    from omi_dsf.peer import PeerTlsError, PeerUnreachable

    url, http = _gateway_client(args, site)
    if not url:
        raise UserError(f"--query needs the site's gateway: --gateway URL or gateway_url in {site.path}")
    try:
        return cohort.query_studies(DicomwebClient(http=http, url=url), args.query, is_uid)
    except (PeerUnreachable, PeerTlsError, DicomwebError) as exc:
        raise UserError(f"gateway {url}: {exc}") from None
    finally:
        http.close()


def _cohort_status(args) -> int:
    from pathlib import Path

    from omi_dsf.client import cohort
    from omi_dsf.client.requests import dsf_call

    path = Path(args.cohort)
    sibling = path.with_name(path.stem + ".record.csv")
    record = cohort.Record(sibling if sibling.exists() else path).load()
    site, org = _site(args.site)
    if record.with_status("submitted", "running") and record.lock():   # nobody runs it: look at the DSF
        try:
            with _dsf(site) as client:
                dsf_call("status", cohort.Run(record, client, org, "", "").follow)
        finally:
            record.unlock()
    s = cohort.summary(record)
    if args.json:
        s["studies_detail"] = [{k: v for k, v in r.items() if k != "patient"} for r in record.rows.values()]
    _emit(args, s, cohort.summary_text(s))
    return 0


def _progress_of(client, task):
    from omi_dsf.client.progress import business_key, derive
    from omi_dsf.client.requests import result_messages, since_of, topic_of, work_items

    key = business_key(task)
    if not key:
        return derive(task, [], topic_of())
    since = since_of(task)
    return derive(task, work_items(client, key, since).get(key, []), topic_of(),
                  result_messages(client, key, since).get(key))


def _progress_list(client, limit: int):
    from omi_dsf.client.requests import progress_of_tasks, request_tasks

    tasks = request_tasks(client, limit)
    progress = progress_of_tasks(client, tasks)
    return [progress[t["id"]] for t in tasks]


def _status(args) -> int:
    from omi_dsf.terminal import printable
    from omi_dsf.client import render
    from omi_dsf.client.requests import dsf_call, find_task

    if args.cohort:
        return _cohort_status(args)
    site, _ = _site(args.site)
    client = _dsf(site)
    task_id = None

    def snapshot():
        nonlocal task_id
        if not args.business_key:
            return dsf_call("status", _progress_list, client, args.limit)
        if task_id is None:   # find the request once, then follow its Task by id
            task = dsf_call("status", find_task, client, args.business_key)
            task_id = task["id"]
        else:
            task = dsf_call("status", client.read, "Task", task_id)
        return dsf_call("status", _progress_of, client, task)

    def show(snap) -> str:
        if args.business_key:
            return json.dumps(snap.as_dict(), default=str) if args.json else printable(render.progress(snap))
        return json.dumps([p.as_dict() for p in snap], default=str) if args.json else printable(render.request_list(snap))

    def finished(snap) -> bool:
        items = [snap] if args.business_key else snap
        return all(p.task_status in ("completed", "failed") for p in items)

    try:
        snap = snapshot()
        if not args.watch:
            data = snap.as_dict() if args.business_key else [p.as_dict() for p in snap]
            print(json.dumps(data, indent=2, default=str) if args.json else show(snap))
            return 0
        tty = sys.stdout.isatty() and not args.json
        deadline = time.monotonic() + args.timeout if args.timeout else None
        last = None
        while True:
            text = show(snap)
            if text != last:   # without a terminal: one frame per change
                if tty:
                    sys.stdout.write("\x1b[H\x1b[2J")  # redraw in place
                    text_out = f"{text}\n({time.strftime('%H:%M:%S')}, every {args.interval:g} s, Ctrl-C to stop)"
                else:
                    text_out = text
                print(text_out, flush=True)
                last = text
            if finished(snap):
                return 0
            if deadline and time.monotonic() >= deadline:
                print(f"error: still running after {args.timeout:g} s", file=sys.stderr)
                return 3
            time.sleep(args.interval)
            snap = snapshot()
    finally:
        client.close()


def _gateway_client(args, site):
    """An HTTP client for the site's gateway: TLS verified, the site's certificate for mutual TLS."""
    from omi_dsf.peer import http_client

    url = args.gateway or site.gateway_url
    if not url:
        return None, None
    # QIDO-RS there names the study of a real patient
    url = _url(url, "gateway", site, patient_data=True)
    ca = args.gateway_ca or (str(site.gateway_ca_file) if site.gateway_ca_file else None)
    ident = site.identity
    ctx = _tls(f"{site.path}: gateway", ca, ident.cert_file, ident.key_file, ident.key_password)
    return url, http_client(verify=ctx, timeout=30)


def _results(args) -> int:
    from omi_dsf.client import render
    from omi_dsf.client.requests import dsf_call, find_task
    from omi_dsf.client.stored import stored_series

    site, _ = _site(args.site)
    url, http = _gateway_client(args, site)   # its settings are checked before anything is asked
    try:
        with _dsf(site) as client:
            p = dsf_call("results", lambda: _progress_of(client, find_task(client, args.business_key)))
        stored_uid = p.outputs.get("stored-study-instance-uid")
        data = {"business_key": p.business_key, "task": f"Task/{p.task_id}", "status": p.task_status,
                "result_study_instance_uid": p.outputs.get("result-study-instance-uid"),
                "result_location": p.outputs.get("result-location"),
                "stored_study_instance_uid": stored_uid, "error": p.error}
        text = render.results(p)
        if url and stored_uid:
            _uid(str(stored_uid), "the request's stored-study-instance-uid")
            series = stored_series(http, url, str(stored_uid))
            data["stored_series"] = series
            data["stored_at"] = f"{url.rstrip('/')}/studies/{stored_uid}"
            text += "\n" + render.stored(data["stored_at"], series)
        target = site.steps.fhir_results
        if target is not None and target.url and stored_uid:
            from omi_dsf.client import fhir_record

            _uid(str(stored_uid), "the request's stored-study-instance-uid")
            with target.peer(target.url, "steps.fhir_results", timeout=30).client(base_url=False) as fhir:
                record = fhir_record.study_record(fhir, str(target.url), str(stored_uid))
            data["fhir_store"] = record
            text += "\n" + fhir_record.render(record, str(target.url))
    finally:
        if http is not None:
            http.close()
    _emit(args, data, text)
    return 0 if p.task_status != "failed" else 1
