"""Evaluate MII Consent resources (profile mii-pr-consent-einwilligung) for a purpose.

The MII Broad Consent is a root provision of type "deny" with nested "permit" provisions, one
per module, each with its own period and policy codes. For each needed code the deepest
provision that names it decides; its period (intersected with its ancestors') must contain the
moment of use. No consent, a consent that is not active, an expired or not yet valid period,
or a code nobody permits: deny, with the reason (never patient data in it).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Iterable

from fhir.resources.R4B.consent import Consent  # R4B's Consent is structurally R4's

from .policy import MII_CONSENT_PROFILE, MII_POLICY_SYSTEM, label


@dataclass(frozen=True)
class Decision:
    permitted: bool
    reason: str
    codes: tuple[str, ...] = field(default=())
    reference: str = ""         # which consent decided, e.g. "Consent/123" (no patient data)


def _as_datetime(value: Any, end: bool = False) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if isinstance(value, dt.date):
        t = dt.time.max if end else dt.time.min
        return dt.datetime.combine(value, t, tzinfo=dt.timezone.utc)
    text = str(value)
    try:
        if len(text) == 10:
            return _as_datetime(dt.date.fromisoformat(text), end)
        return _as_datetime(dt.datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return None


def _period(p) -> tuple[dt.datetime | None, dt.datetime | None]:
    if p is None:
        return None, None
    return _as_datetime(p.start), _as_datetime(p.end, end=True)


def _codes(provision) -> set[str]:
    out = set()
    for cc in provision.code or ():
        for coding in cc.coding or ():
            if coding.system == MII_POLICY_SYSTEM and coding.code:
                out.add(str(coding.code))
    return out


def _fmt(t: dt.datetime) -> str:
    return t.date().isoformat()


def parse_consent(resource: dict | Consent) -> Consent:
    return resource if isinstance(resource, Consent) else Consent.model_validate(resource)


def evaluate(consent: dict | Consent, codes: Iterable[str], at: dt.datetime | None = None) -> Decision:
    """Is every code permitted by this one Consent at `at` (default now)?"""
    at = _as_datetime(at) if at is not None else dt.datetime.now(dt.timezone.utc)
    codes = tuple(codes)
    try:
        c = parse_consent(consent)
    except Exception as exc:  # pydantic ValidationError and friends
        return Decision(False, f"consent resource is not a valid FHIR R4 Consent ({type(exc).__name__})", codes)
    if c.status != "active":
        return Decision(False, f"consent status is {c.status!r}, not 'active'", codes)
    profiles = [str(p) for p in (c.meta.profile if c.meta and c.meta.profile else [])]
    if profiles and not any(p.split("|")[0] == MII_CONSENT_PROFILE for p in profiles):
        return Decision(False, "consent does not claim the MII Consent profile", codes)
    scope_codes = {cd.code for cd in (c.scope.coding or [])} if c.scope else set()
    if scope_codes and "research" not in scope_codes:
        return Decision(False, f"consent scope is {sorted(scope_codes)}, not research", codes)
    signed = _as_datetime(c.dateTime)
    if signed is not None and signed > at:
        return Decision(False, f"consent is dated {_fmt(signed)}, after the time of use", codes)
    root = c.provision
    if root is None:
        return Decision(False, "consent has no provisions", codes)
    start, end = _period(root.period)
    if start and at < start:
        return Decision(False, f"consent is valid only from {_fmt(start)}", codes)
    if end and at > end:
        return Decision(False, f"consent expired on {_fmt(end)}", codes)
    ref = f"Consent/{c.id}" if c.id else "Consent (without id)"
    for code in codes:
        ok, why = _decide(root, code, at, (start, end), root.type or "deny")
        if not ok:
            return Decision(False, why, codes, ref)
    return Decision(True, "permitted: " + ", ".join(label(c_) for c_ in codes), codes, ref)


def _decide(prov, code: str, at: dt.datetime, window, inherited: str) -> tuple[bool, str]:
    """(permitted, reason) from the deepest provision naming `code` whose window contains `at`."""
    best: tuple[int, str, tuple] | None = None      # (depth, type, window)
    expired: tuple | None = None

    def visit(p, depth: int, win, parent_type: str) -> None:
        nonlocal best, expired
        s, e = _period(p.period)
        lo = max([x for x in (win[0], s) if x is not None], default=None)
        hi = min([x for x in (win[1], e) if x is not None], default=None)
        ptype = p.type or parent_type
        if depth > 0 and code in _codes(p):
            inside = (lo is None or at >= lo) and (hi is None or at <= hi)
            if inside:
                if best is None or depth >= best[0]:
                    best = (depth, ptype, (lo, hi))
            elif ptype == "permit":
                expired = (lo, hi)
        for child in p.provision or ():
            visit(child, depth + 1, (lo, hi), ptype)

    visit(prov, 0, window, inherited)
    if best is not None:
        if best[1] == "permit":
            return True, ""
        return False, f"{label(code)} is denied by the consent"
    if expired is not None:
        lo, hi = expired
        if hi is not None and at > hi:
            return False, f"permission for {label(code)} expired on {_fmt(hi)}"
        return False, f"permission for {label(code)} is valid only from {_fmt(lo)}"
    if inherited == "permit":
        return True, ""
    return False, f"consent does not permit {label(code)}"


def evaluate_all(consents: list[dict | Consent], codes: Iterable[str], at: dt.datetime | None = None) -> Decision:
    """Several Consent resources of one patient: the most recent active one decides."""
    codes = tuple(codes)
    if not consents:
        return Decision(False, "no consent on record for this patient", codes)
    parsed = []
    for r in consents:
        try:
            parsed.append(parse_consent(r))
        except Exception as exc:
            return Decision(False, f"a consent resource is not a valid FHIR R4 Consent ({type(exc).__name__})", codes)
    active = [c for c in parsed if c.status == "active"]
    if not active:
        return Decision(False, "no active consent on record for this patient", codes)
    epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    latest = max(active, key=lambda c: _as_datetime(c.dateTime) or epoch)
    return evaluate(latest, codes, at)
