"""Text for people (the --json output is the dataclasses as they are)."""

from __future__ import annotations

from omi_dsf.client.progress import RequestProgress
from omi_dsf.client.registry_client import Service

MARK = {"done": "[x]", "running": "[>]", "failed": "[!]", "pending": "[ ]", "stopped": "[-]"}


def _short(stamp: str | None) -> str:
    return (stamp or "-").replace("T", " ")[:19]


def services_table(services: list[Service]) -> str:
    if not services:
        return "no AI services match"
    rows = [("SERVICE", "STATUS", "PROVIDER", "TYPE", "MODALITY", "BODY SITE", "LATENCY", "LAST CHECK")]
    for s in services:
        rows.append((s.id, s.status, s.provider or "-", ",".join(s.service_type) or "-", ",".join(s.modality) or "-",
                     ",".join(s.body_site) or "-", "-" if s.latency_ms is None else f"{s.latency_ms:.0f} ms",
                     _short(s.checked)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    down = [s for s in services if s.status in ("down", "degraded") and s.detail]
    lines += [f"  {s.id}: {s.status}: {s.detail}" for s in down]
    return "\n".join(lines)


def progress(p: RequestProgress) -> str:
    lines = [f"request {p.business_key or '(no business key yet)'}: {p.current}",
             f"  Task/{p.task_id} {p.task_status}, started {_short(p.authored)}, updated {_short(p.updated)}",
             f"  service {p.service or '-'} at {p.provider or '-'}"]
    for s in p.steps:
        extra = f"  {s.detail}" if s.detail else ""
        lines.append(f"  {MARK.get(s.state, '[?]')} {s.name:<13}{s.state:<8} {_short(s.updated) if s.updated else ''}{extra}".rstrip())
    if p.error and not any(p.error in (s.detail or "") for s in p.steps):
        lines.append(f"  error: {p.error}")
    return "\n".join(lines)


def request_list(items: list[RequestProgress]) -> str:
    if not items:
        return "no OMI inference requests at this site"
    rows = [("BUSINESS KEY", "STATE", "TASK", "SERVICE", "PROVIDER", "UPDATED")]
    for p in items:
        rows.append((p.business_key or "-", p.current, p.task_status, p.service or "-", p.provider or "-",
                     _short(p.updated)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


RESULT_LABELS = {
    "result-study-instance-uid": "result objects (study at the provider)",
    "result-location": "result location (provider's DICOMweb)",
    "stored-study-instance-uid": "stored in the local PACS as study",
}


def results(p: RequestProgress) -> str:
    lines = [f"request {p.business_key}: {p.current}"]
    shown = False
    for code, label in RESULT_LABELS.items():
        if p.outputs.get(code) not in (None, ""):
            lines.append(f"  {label}: {p.outputs[code]}")
            shown = True
    if p.error:
        lines.append(f"  error: {p.error}")
    if not shown and not p.error:
        lines.append("  no results yet" + ("" if p.task_status in ("completed", "failed") else
                                            f" (the request is at step {p.current}; see omi status {p.business_key})"))
    return "\n".join(lines)


def stored(location: str, series: list[dict]) -> str:
    if not series:
        return f"  not (yet) in the local PACS at {location}"
    lines = [f"  in the local PACS at {location}:"]
    for s in series:
        lines.append(f"    {s['modality'] or '?':<4} {s['instances'] if s['instances'] is not None else '?':>4} instance(s)  "
                     f"{s['description'] or ''}  series {s['series_instance_uid']}".rstrip())
    return "\n".join(lines)
