"""`python -m omi_dsf worker --site CONFIG --topics consent,prepare,send,return`, and
`audit --site CONFIG [KEY]` (the site's audit trail, as the site configuration names it)."""

from __future__ import annotations

import logging
import signal

from omi_dsf.errors import UserError


def register(sub) -> None:
    _register_audit(sub)
    p = sub.add_parser("worker", help="run the step handlers of this site's OMI work items")
    p.add_argument("--site", required=True, help="site configuration (YAML)")
    p.add_argument("--topics", required=True, help="comma-separated: consent,prepare,send,infer,return")
    p.add_argument("--demo", action="store_true", help="answer every item with the demo handler (proves the loop)")
    p.add_argument("--no-websocket", action="store_true", help="poll only")
    p.add_argument("--max-items", type=int, help="stop after this many items")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from omi_dsf import malloc
    from omi_dsf.dsf.client import DsfClient
    from omi_dsf.dsf.workitem import topics_from_spec
    from omi_dsf.worker.config import load_site_config
    from omi_dsf.worker.lease import open_lease_store
    from omi_dsf.worker.runtime import Worker, WorkerSettings

    site = load_site_config(args.site)
    all_topics = topics_from_spec()
    topics = [t.strip() for t in args.topics.split(",") if t.strip()]
    unknown = sorted(set(topics) - set(all_topics))
    if unknown or not topics:
        raise UserError(f"--topics: unknown topic(s) {unknown or topics}; known: {', '.join(all_topics)}")
    handlers = {t: site.handler(t, demo=args.demo) for t in topics}
    if not args.demo:
        site.check_steps(topics)   # a step without its settings: refused now, not at the first item
    w = site.worker
    settings = WorkerSettings(topics=all_topics, lease_ttl=w.lease_ttl, max_attempts=w.max_attempts,
                              backoff=w.backoff, poll_interval=w.poll_interval, concurrency=w.concurrency,
                              websocket=w.websocket and not args.no_websocket)
    if w.owner:
        settings.owner = w.owner
    from omi_dsf.audit import certificate_subject, trail

    identity = site.identity
    client = DsfClient(identity)
    audit = trail(site.audit)
    actor = certificate_subject(identity.cert_file)
    # the steps' audit events go to the site's trail and name the site's certificate, unless steps: says
    steps = site.steps.model_copy(update={"audit": site.steps.audit or site.audit,
                                          "actor": site.steps.actor or actor})
    worker = Worker(client, open_lease_store(site.lease_store), handlers, settings, steps, audit=audit, actor=actor)
    malloc.keep_freed_memory()   # the infer step's volumes: no page faults on every copy (omi_dsf/malloc.py)

    def on_term(signum, frame):
        if worker.stopping.is_set():
            raise KeyboardInterrupt    # second signal: give back the item at once
        logging.getLogger("omi_dsf.worker").info("stopping: finishing the current item")
        worker.stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    logging.getLogger("omi_dsf.worker").info("worker %s: topics %s at %s", settings.owner, ",".join(topics),
                                             identity.fhir_url)
    try:
        worker.run(max_items=args.max_items)
    finally:
        client.close()
    return 0


def _register_audit(sub) -> None:
    p = sub.add_parser("audit", help="what this site sent and received, per business key (no patient data)")
    p.add_argument("--site", required=True, help="site configuration (YAML)")
    p.add_argument("business_key", nargs="?", help="only this request")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_audit)


def _audit(args) -> int:
    import json

    from omi_dsf.audit import AuditTrail
    from omi_dsf.worker.config import load_site_config

    site = load_site_config(args.site)
    events = AuditTrail(site.audit).events(args.business_key)
    if args.json:
        print(json.dumps([e.__dict__ for e in events], indent=2))
        return 0
    for e in events:
        details = " ".join(f"{k}={v}" for k, v in sorted(e.details.items()))
        print(f"{e.time}  {e.business_key}  {e.action:16s} {e.actor}  {details}")
    if not events:
        print("no audit events" + (f" for {args.business_key}" if args.business_key else ""))
    return 0
