"""DSF Task resources for the plugin's messages, built from the spec (the same profiles the build
generates), so clients never hand-assemble profile URLs, codes or versions."""

from __future__ import annotations

import datetime as dt
from typing import Mapping

from omi_dsf.spec.model import Spec, load_spec

BPMN_MESSAGE = "http://dsf.dev/fhir/CodeSystem/bpmn-message"
ORG_SID = "http://dsf.dev/sid/organization-identifier"


def _org(identifier: str) -> dict:
    return {"type": "Organization", "identifier": {"system": ORG_SID, "value": identifier}}


def _value(ctype: str, value) -> dict:
    if ctype == "integer":
        return {"valueInteger": int(value)}
    if ctype == "boolean":
        return {"valueBoolean": bool(value)}
    if ctype == "decimal":
        return {"valueDecimal": float(value)}
    return {"valueString": str(value)}


def message_task(message_name: str, requester: str, recipient: str, inputs: Mapping[str, object],
                 business_key: str | None = None, spec: Spec | None = None) -> dict:
    """A Task (status requested) for `message_name` of the plugin; inputs are checked against the spec."""
    spec = spec or load_spec()
    owner = spec.message_owner(message_name)
    if owner is None:
        raise ValueError(f"unknown message '{message_name}'")
    process, message = owner
    allowed = {p.code.code: p for p in message.inputs}
    unknown = sorted(set(inputs) - set(allowed))
    if unknown:
        raise ValueError(f"{message_name}: unknown input(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(c for c, p in allowed.items() if p.min > 0 and inputs.get(c) in (None, ""))
    if missing:
        raise ValueError(f"{message_name}: missing required input(s) {missing}")
    version = spec.plugin.resource_version
    task_inputs = [{"type": {"coding": [{"system": BPMN_MESSAGE, "code": "message-name"}]}, "valueString": message_name}]
    if business_key:
        task_inputs.append({"type": {"coding": [{"system": BPMN_MESSAGE, "code": "business-key"}]}, "valueString": business_key})
    for code, value in inputs.items():
        if value in (None, ""):
            continue
        task_inputs.append({"type": {"coding": [{"system": spec.code_system_url, "code": code}]},
                            **_value(allowed[code].code.type, value)})
    return {
        "resourceType": "Task",
        "meta": {"profile": [spec.profile_canonical(message)]},
        "instantiatesCanonical": f"{spec.process_url(process)}|{version}",
        "status": "requested",
        "intent": "order",
        "authoredOn": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "requester": _org(requester),
        "restriction": {"recipient": [_org(recipient)]},
        "input": task_inputs,
    }


def input_value(task: dict, code: str, system: str | None = None):
    for i in task.get("input", []) + task.get("output", []):
        for c in i.get("type", {}).get("coding", []):
            if c.get("code") == code and (system is None or c.get("system") == system):
                return next((v for k, v in i.items() if k.startswith("value")), None)
    return None


def outputs(task: dict, spec: Spec | None = None) -> dict[str, object]:
    """The Task's outputs by code (the plugin's codes and the DSF's `error`)."""
    spec = spec or load_spec()
    out = {}
    for o in task.get("output", []):
        for c in o.get("type", {}).get("coding", []):
            if c.get("system") in (spec.code_system_url, BPMN_MESSAGE):
                out[c["code"]] = next((v for k, v in o.items() if k.startswith("value")), None)
    return out
