"""The registry's status page: one HTML document, no scripts, refreshed by the browser.

It shows what a check found, not where: no endpoint addresses, and a failed check's detail only up to
its kind (``unreachable: ConnectError``), since the exception text names internal hosts and URLs.
"""

from __future__ import annotations

import re
from html import escape

from omi_dsf.registry import validation as v
from omi_dsf.registry.store import ServiceState

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1d232a;background:#f7f8fa}
h1{font-size:1.4rem;margin:0 0 .3rem} p.sub{color:#555;margin:0 0 1rem}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 3px #0002}
th,td{padding:.45rem .6rem;border-bottom:1px solid #e3e6ea;text-align:left;vertical-align:top;font-size:.9rem}
th{background:#eef1f4}
.st{display:inline-block;padding:.1rem .5rem;border-radius:.7rem;color:#fff;font-weight:600}
.up{background:#2e7d32}.degraded{background:#ed8c00}.down{background:#c62828}.unknown{background:#78838f}
.checks span{display:inline-block;width:.8rem;height:.8rem;margin-right:2px;border-radius:2px}
.detail{color:#555;font-size:.8rem}
"""


_ADDRESS = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S*|\b\d{1,3}(\.\d{1,3}){3}(:\d+)?\b|\[[0-9a-fA-F:]+\](:\d+)?")


def public_detail(detail: str | None) -> str:
    """A check's detail fit for the public page: the kind of failure, no addresses."""
    text = detail or ""
    if text.startswith("unreachable:"):
        text = ":".join(text.split(":")[:2])
    return _ADDRESS.sub("(address)", text)


def render(services: list[dict], states: dict[str, ServiceState], devices: dict[str, dict],
           checks: dict[str, list[dict]], refresh: int = 15) -> str:
    rows = []
    for s in services:
        st = states.get(s["id"]) or ServiceState(s["id"])
        dev = devices.get(s["id"]) or {}
        provider = ((s.get("providedBy") or {}).get("identifier") or {}).get("value", "")
        modality = ", ".join(c for _, c in v.device_property(dev, "modality"))
        site = ", ".join(c for _, c in v.device_property(dev, "body-site"))
        stype = ", ".join(c.get("display") or c.get("code", "") for t in s.get("type", []) for c in t.get("coding", []))
        recent = "".join(f'<span class="{escape(c["status"])}" title="{escape(c["checked_at"])} {escape(c["status"])}'
                         f'{"" if c["latency_ms"] is None else " %.0f ms" % c["latency_ms"]}"></span>'
                         for c in reversed(checks.get(s["id"], [])))
        latency = "" if st.latency_ms is None else f"{st.latency_ms:.0f} ms"
        rows.append(
            f'<tr data-service="{escape(s["id"])}"><td><b>{escape(s.get("name", s["id"]))}</b><br>'
            f'<span class="detail">{escape(s["id"])}</span></td>'
            f"<td>{escape(provider)}</td><td>{escape(stype)}</td><td>{escape(modality)}</td><td>{escape(site)}</td>"
            f'<td><span class="st {escape(st.status)}">{escape(st.status)}</span>'
            f'<br><span class="detail">{escape(public_detail(st.detail))}</span></td>'
            f"<td>{escape(st.checked_at or '–')}</td><td>{latency}</td><td>{escape(st.heartbeat_at or '–')}</td>"
            f'<td class="checks">{recent}</td></tr>')
    body = "\n".join(rows) or '<tr><td colspan="10">no services registered</td></tr>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{refresh}">
<title>OMI service registry</title><style>{STYLE}</style></head>
<body><h1>OMI service registry</h1>
<p class="sub">{len(services)} AI service(s); status from active Open Inference Protocol checks and provider heartbeats
(times in UTC). FHIR API: <a href="fhir/metadata">fhir/metadata</a></p>
<table><thead><tr><th>Service</th><th>Provider</th><th>Type</th><th>Modality</th><th>Body site</th><th>Status</th>
<th>Last check</th><th>Latency</th><th>Last heartbeat</th><th>Recent checks (oldest → newest)</th></tr></thead>
<tbody>
{body}
</tbody></table></body></html>
"""
