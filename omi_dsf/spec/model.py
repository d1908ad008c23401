"""The plugin spec as typed objects, loaded from YAML and checked before anything is rendered.

Names derived here (process id, process and profile URLs, …) follow the DSF's rules for
plugins. The rules the validator checks in any plugin too (`process_id`, `resource_version`) are
the functions below, which `omi_dsf.validate` uses: the generator and the validator share one
definition of them.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_SPEC = Path(__file__).with_name("omi.yaml")

VERSION_RE = re.compile(r"^(?P<resource>\d+\.\d+)\.\d+\.\d+$")
NAME_RE = re.compile(r"^[a-zA-Z0-9-]+$")
CODE_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
DURATION_RE = re.compile(r"^P(?!$)(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+S)?)?$")
CARDINALITY_RE = re.compile(r"^(?P<min>\d+)\.\.(?P<max>\d+|\*)$")

# Task.input value[x] and Questionnaire.item.type for each code type.
VALUE_TYPES = {"string": "string", "integer": "integer", "boolean": "boolean", "decimal": "decimal"}

# Authorization codes (CodeSystem process-authorization) and where they may stand.
REQUESTER_CODES = {"LOCAL_ALL", "REMOTE_ALL", "LOCAL_ORGANIZATION", "REMOTE_ORGANIZATION", "LOCAL_ROLE", "REMOTE_ROLE"}
RECIPIENT_CODES = {"LOCAL_ALL", "LOCAL_ORGANIZATION", "LOCAL_ROLE"}
ROLE_CODES = {"LOCAL_ROLE", "REMOTE_ROLE"}
ORGANIZATION_CODES = {"LOCAL_ORGANIZATION", "REMOTE_ORGANIZATION"}
DSF_ORGANIZATION_ROLES = {"UAC", "COS", "CRR", "DIC", "DMS", "DTS", "HRP", "TTP", "AMS"}


def process_id(domain: str, name: str) -> str:
    """The BPMN process id the DSF expects for `http://<domain>/bpe/Process/<name>`."""
    return f"{domain.replace('.', '')}_{name}"


def resource_version(version: str) -> str | None:
    """`a.b` of a plugin version `a.b.c.d` (the version its FHIR resources carry); None if malformed."""
    m = VERSION_RE.match(version)
    return m.group("resource") if m else None


class SpecError(Exception):
    """The spec is wrong; `findings` holds one line per problem."""

    def __init__(self, findings: list[str]):
        super().__init__("\n".join(findings))
        self.findings = findings


@dataclass(frozen=True)
class Code:
    code: str
    type: str
    display: str
    definition: str
    example: str = ""               # a value for draft and example Tasks


@dataclass(frozen=True)
class Authorization:
    code: str                      # process-authorization code, e.g. REMOTE_ROLE
    role: str | None = None        # organization-role code (resolved from the spec's role key)
    organization: str | None = None


@dataclass(frozen=True)
class Parameter:
    code: Code
    min: int
    max: int | None                # None = unbounded


@dataclass(frozen=True)
class Message:
    name: str
    profile: str                   # Task profile name, e.g. task-start-omi-inference
    requester: tuple[Authorization, ...]
    recipient: tuple[Authorization, ...]
    inputs: tuple[Parameter, ...]
    is_start: bool


@dataclass(frozen=True)
class Step:
    kind: str                      # work_item | send | receive | end_send | parallel
    name: str                      # work item topic, or message name ("parallel" for a parallel step)
    title: str = ""
    inputs: tuple[Code, ...] = ()
    outputs: tuple[Code, ...] = ()
    timeout: str | None = None
    continue_on_error: bool = False
    target_variable: str | None = None   # send: variable holding the target organization
    to_requester: bool = False           # end_send: answer the start Task's requester
    role: str | None = None              # organization-role code of the target
    branches: tuple[tuple["Step", ...], ...] = ()   # parallel: the steps of each branch, all run at once


@dataclass(frozen=True)
class Process:
    name: str
    title: str
    description: str
    start: Message
    outputs: tuple[Code, ...]
    steps: tuple[Step, ...]
    messages: tuple[Message, ...]        # received after the start

    def topics(self) -> list[str]:
        """The topics of the process's work items, in order (a worker of the process's site runs these)."""
        return [s.name for s in self.all_steps() if s.kind == "work_item"]

    def all_steps(self) -> list[Step]:
        """Every step, those of parallel branches in place (branch by branch), parallel steps left out."""
        return [inner for step in self.steps
                for inner in ([s for branch in step.branches for s in branch] if step.kind == "parallel" else [step])]


@dataclass(frozen=True)
class Plugin:
    name: str
    version: str
    release_date: dt.date
    domain: str
    title: str
    publisher: str
    parent_organization: str
    roles: dict[str, str]

    @property
    def resource_version(self) -> str:
        return resource_version(self.version)

    @property
    def base(self) -> str:
        return f"http://{self.domain}"


@dataclass(frozen=True)
class Spec:
    plugin: Plugin
    codes: dict[str, Code]
    processes: tuple[Process, ...]
    source: Path = field(default=DEFAULT_SPEC, compare=False)

    # -- names derived from the spec --
    def process_url(self, process: Process) -> str:
        return f"{self.plugin.base}/bpe/Process/{process.name}"

    def process_id(self, process: Process) -> str:
        return process_id(self.plugin.domain, process.name)

    @property
    def code_system_url(self) -> str:
        return f"{self.plugin.base}/fhir/CodeSystem/omi"

    @property
    def value_set_url(self) -> str:
        return f"{self.plugin.base}/fhir/ValueSet/omi"

    def profile_url(self, message: Message) -> str:
        return f"{self.plugin.base}/fhir/StructureDefinition/{message.profile}"

    def profile_canonical(self, message: Message) -> str:
        """`url|version`, as a Task's meta.profile names it; DSF 2.x's `_profile` search matches only
        this form (1.9 also the bare url)."""
        return f"{self.profile_url(message)}|{self.plugin.resource_version}"

    def questionnaire_url(self, step: Step) -> str:
        return f"{self.plugin.base}/fhir/Questionnaire/omi-{step.name}"

    def all_messages(self) -> list[tuple[Process, Message]]:
        return [(p, m) for p in self.processes for m in (p.start, *p.messages)]

    def message_owner(self, name: str) -> tuple[Process, Message] | None:
        return next(((p, m) for p, m in self.all_messages() if m.name == name), None)


# ------------------------------------------------------------------------------------------
# loading


def load_spec(path: Path = DEFAULT_SPEC) -> Spec:
    """Read and check a spec file; raises SpecError listing every problem found."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError([f"{path}: cannot read spec: {exc}"]) from exc
    return parse_spec(raw, Path(path))


def parse_spec(raw: Any, source: Path = DEFAULT_SPEC) -> Spec:
    findings: list[str] = []
    where = str(source)

    def bad(msg: str) -> None:
        findings.append(f"{where}: {msg}")

    if not isinstance(raw, dict):
        raise SpecError([f"{where}: spec must be a mapping with plugin, codes, processes"])

    plugin = _parse_plugin(raw.get("plugin") or {}, bad)
    codes = _parse_codes(raw.get("codes") or {}, bad)
    roles = plugin.roles if plugin else {}
    processes = tuple(
        p for p in (_parse_process(i, rp, codes, roles, bad) for i, rp in enumerate(raw.get("processes") or []))
        if p is not None
    )
    if not processes:
        bad("processes: at least one process is needed")
    if findings:
        raise SpecError(findings)
    spec = Spec(plugin=plugin, codes=codes, processes=processes, source=source)
    findings = check_spec(spec)
    if findings:
        raise SpecError([f"{where}: {f}" for f in findings])
    return spec


def _parse_plugin(rp: dict, bad) -> Plugin | None:
    missing = [k for k in ("name", "version", "release_date", "domain", "parent_organization", "roles") if k not in rp]
    for k in missing:
        bad(f"plugin.{k}: missing")
    if missing:
        return None
    version = str(rp["version"])
    if not VERSION_RE.match(version):
        bad(f"plugin.version: '{version}' is not a DSF plugin version a.b.c.d (e.g. 1.0.0.0)")
    if not NAME_RE.match(str(rp["name"])):
        bad(f"plugin.name: '{rp['name']}' may only contain letters, digits and '-'")
    if not re.match(r"^[a-zA-Z0-9-]+(\.[a-zA-Z0-9-]+)+$", str(rp["domain"])):
        bad(f"plugin.domain: '{rp['domain']}' is not a domain name")
    date = rp["release_date"]
    if not isinstance(date, dt.date):
        try:
            date = dt.date.fromisoformat(str(date))
        except ValueError:
            bad(f"plugin.release_date: '{date}' is not a date yyyy-mm-dd")
            date = dt.date.min
    roles = {str(k): str(v) for k, v in (rp.get("roles") or {}).items()}
    for key, role in roles.items():
        if role not in DSF_ORGANIZATION_ROLES:
            bad(f"plugin.roles.{key}: '{role}' is not a DSF organization-role code {sorted(DSF_ORGANIZATION_ROLES)}")
    return Plugin(
        name=str(rp["name"]), version=version, release_date=date, domain=str(rp["domain"]),
        title=str(rp.get("title", rp["name"])), publisher=str(rp.get("publisher", "")),
        parent_organization=str(rp["parent_organization"]), roles=roles,
    )


def _parse_codes(rc: dict, bad) -> dict[str, Code]:
    codes = {}
    for code, body in rc.items():
        body = body or {}
        if not CODE_RE.match(str(code)):
            bad(f"codes.{code}: a code is lower-case letters, digits and '-'")
        typ = body.get("type", "string")
        if typ not in VALUE_TYPES:
            bad(f"codes.{code}.type: '{typ}' is not one of {sorted(VALUE_TYPES)}")
        for k in ("display", "definition"):
            if not body.get(k):
                bad(f"codes.{code}.{k}: missing")
        example = str(body.get("example", {"integer": "1", "boolean": "true", "decimal": "1.0"}.get(typ, f"example-{code}")))
        codes[str(code)] = Code(str(code), typ, str(body.get("display", "")), str(body.get("definition", "")), example)
    return codes


def _code_list(names, codes, ctx: str, bad) -> tuple[Code, ...]:
    out = []
    for n in names or []:
        if n not in codes:
            bad(f"{ctx}: unknown code '{n}' (not in codes)")
        else:
            out.append(codes[n])
    return tuple(out)


def _parse_auth(items, roles, ctx: str, bad, allowed: set[str]) -> tuple[Authorization, ...]:
    out = []
    if not items:
        bad(f"{ctx}: at least one authorization code is needed")
    for i, a in enumerate(items or []):
        code = str((a or {}).get("code", ""))
        if code not in allowed:
            bad(f"{ctx}[{i}].code: '{code}' is not allowed here (allowed: {sorted(allowed)})")
            continue
        role = None
        if code in ROLE_CODES:
            key = a.get("role")
            if key not in roles:
                bad(f"{ctx}[{i}].role: '{key}' is not a key of plugin.roles {sorted(roles)}")
                continue
            role = roles[key]
        org = a.get("organization")
        if code in ORGANIZATION_CODES and not org:
            bad(f"{ctx}[{i}].organization: {code} needs an organization identifier")
        out.append(Authorization(code, role, org))
    return tuple(out)


def _parse_message(name, rm: dict, codes, roles, ctx: str, bad, is_start: bool) -> Message:
    for k in ("profile", "requester", "recipient"):
        if k not in rm:
            bad(f"{ctx}.{k}: missing")
    if not NAME_RE.match(str(name)):
        bad(f"{ctx}: message name '{name}' may only contain letters, digits and '-'")
    inputs = []
    for code, card in (rm.get("inputs") or {}).items():
        m = CARDINALITY_RE.match(str(card))
        if code not in codes:
            bad(f"{ctx}.inputs: unknown code '{code}' (not in codes)")
        elif not m:
            bad(f"{ctx}.inputs.{code}: cardinality '{card}' is not min..max")
        else:
            mx = None if m["max"] == "*" else int(m["max"])
            inputs.append(Parameter(codes[code], int(m["min"]), mx))
    return Message(
        name=str(name), profile=str(rm.get("profile", "")),
        requester=_parse_auth(rm.get("requester"), roles, f"{ctx}.requester", bad, REQUESTER_CODES),
        recipient=_parse_auth(rm.get("recipient"), roles, f"{ctx}.recipient", bad, RECIPIENT_CODES),
        inputs=tuple(inputs), is_start=is_start,
    )


STEP_KINDS = ("work_item", "send", "receive", "end_send", "parallel")


def _parse_step(rs: dict, codes, roles, ctx: str, bad, nested: bool = False) -> Step | None:
    kinds = [k for k in STEP_KINDS if k in rs]
    if len(kinds) != 1:
        bad(f"{ctx}: a step is exactly one of {', '.join(STEP_KINDS)}")
        return None
    kind = kinds[0]
    if kind == "parallel":
        return _parse_parallel(rs["parallel"], codes, roles, ctx, bad, nested)
    timeout = rs.get("timeout")
    if timeout is not None and not DURATION_RE.match(str(timeout)):
        bad(f"{ctx}.timeout: '{timeout}' is not an ISO 8601 duration like PT1H")
    role_key = rs.get("role")
    if kind in ("send", "end_send") and role_key not in roles:
        bad(f"{ctx}.role: '{role_key}' is not a key of plugin.roles {sorted(roles)}")
    return Step(
        kind=kind, name=str(rs[kind]), title=str(rs.get("title", "")),
        inputs=_code_list(rs.get("inputs"), codes, f"{ctx}.inputs", bad),
        outputs=_code_list(rs.get("outputs"), codes, f"{ctx}.outputs", bad),
        timeout=str(timeout) if timeout is not None else None,
        continue_on_error=rs.get("on_error") == "continue",
        target_variable=rs.get("to"), to_requester=bool(rs.get("to_requester")),
        role=roles.get(role_key) if role_key else None,
    )


def _parse_parallel(raw, codes, roles, ctx: str, bad, nested: bool) -> Step | None:
    """`parallel: [[steps of branch 1], [steps of branch 2], ...]`: the branches start together and the
    process goes on when all have ended; a failing step in any branch fails the whole process."""
    if nested:
        bad(f"{ctx}: a parallel step cannot be inside another one")
        return None
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(b, list) and b for b in raw):
        bad(f"{ctx}.parallel: a list of at least two branches, each a non-empty list of steps")
        return None
    branches = []
    for k, branch in enumerate(raw):
        steps = [_parse_step(st or {}, codes, roles, f"{ctx}.parallel[{k}][{j}]", bad, nested=True)
                 for j, st in enumerate(branch)]
        branches.append(tuple(st for st in steps if st is not None))
    return Step(kind="parallel", name="parallel", branches=tuple(branches))


def _parse_process(i: int, rp: dict, codes, roles, bad) -> Process | None:
    ctx = f"processes[{i}]"
    name = rp.get("name")
    if not name or not NAME_RE.match(str(name)):
        bad(f"{ctx}.name: '{name}' is missing or not letters, digits and '-'")
        return None
    ctx = f"processes.{name}"
    rs = rp.get("start") or {}
    if "message" not in rs:
        bad(f"{ctx}.start.message: missing (every DSF process starts with a message)")
        return None
    start = _parse_message(rs["message"], rs, codes, roles, f"{ctx}.start", bad, True)
    steps = tuple(
        s for s in (_parse_step(st or {}, codes, roles, f"{ctx}.steps[{j}]", bad) for j, st in enumerate(rp.get("steps") or []))
        if s is not None
    )
    messages = tuple(
        _parse_message(mn, mb or {}, codes, roles, f"{ctx}.messages.{mn}", bad, False)
        for mn, mb in (rp.get("messages") or {}).items()
    )
    return Process(
        name=str(name), title=str(rp.get("title", name)), description=str(rp.get("description", "")),
        start=start, outputs=_code_list(rs.get("outputs"), codes, f"{ctx}.start.outputs", bad),
        steps=steps, messages=messages,
    )


# ------------------------------------------------------------------------------------------
# cross checks: every name used is defined, every value is set before it is used


def check_spec(spec: Spec) -> list[str]:
    findings: list[str] = []
    seen_profiles: dict[str, str] = {}
    for proc, msg in spec.all_messages():
        if msg.profile in seen_profiles:
            findings.append(f"message {msg.name}: profile '{msg.profile}' is used by {seen_profiles[msg.profile]} too")
        seen_profiles[msg.profile] = msg.name
    names = [m.name for _, m in spec.all_messages()]
    for n in {n for n in names if names.count(n) > 1}:
        findings.append(f"message {n}: defined more than once")

    received = {s.name for p in spec.processes for s in p.all_steps() if s.kind == "receive"}
    sent = {s.name for p in spec.processes for s in p.all_steps() if s.kind in ("send", "end_send")}
    starts = {p.start.name for p in spec.processes}
    for proc in spec.processes:
        for msg in proc.messages:
            if msg.name not in {s.name for s in proc.all_steps() if s.kind == "receive"}:
                findings.append(f"processes.{proc.name}.messages.{msg.name}: no receive step waits for it (dangling message)")
            if msg.name not in sent:
                findings.append(f"processes.{proc.name}.messages.{msg.name}: no process sends it (dangling message)")
        if proc.start.name not in sent and not any(a.code.startswith("LOCAL") for a in proc.start.requester):
            findings.append(f"processes.{proc.name}.start: nobody can start it (not sent by a process, no LOCAL requester)")

        topics = [s.name for s in proc.all_steps() if s.kind == "work_item"]
        for t in {t for t in topics if topics.count(t) > 1}:
            findings.append(f"processes.{proc.name}: work item '{t}' appears more than once")
        available = _check_steps(spec, proc, proc.steps, {p.code.code for p in proc.start.inputs},
                                 f"processes.{proc.name}.steps", findings, last=True)
        for c in proc.outputs:
            if c.code not in available:
                findings.append(f"processes.{proc.name}.start.outputs: '{c.code}' is never set")
    for name in received - sent:
        findings.append(f"message {name}: received but never sent (dangling message)")
    for name in sent - received - starts:
        findings.append(f"message {name}: sent but neither a start message nor received (dangling message)")
    return findings


def _check_steps(spec: Spec, proc: Process, steps: tuple[Step, ...], available: set[str], ctx_base: str,
                 findings: list[str], last: bool) -> set[str]:
    """Check steps in order against the variables set before each; answer those set after them. A
    parallel step's branches each start from what is set before it and cannot use each other's
    outputs; after it, all of theirs are set."""
    available = set(available)
    for j, step in enumerate(steps):
        ctx = f"{ctx_base}[{j}] ({step.kind} {step.name})"
        if step.kind == "parallel":
            after = set(available)
            for k, branch in enumerate(step.branches):
                sets = _check_steps(spec, proc, branch, available, f"{ctx_base}[{j}].parallel[{k}]", findings,
                                    last=False) - available - {"error"}
                for code in sorted(sets & after):   # which branch's value would stay is left to chance
                    findings.append(f"{ctx}: '{code}' is set by more than one branch")
                after |= sets
            available = after | ({"error"} if any(s.kind == "work_item" for b in step.branches for s in b) else set())
        elif step.kind == "work_item":
            if not NAME_RE.match(step.name):
                findings.append(f"{ctx}: topic may only contain letters, digits and '-'")
            for c in step.inputs:
                if c.code not in available:
                    findings.append(f"{ctx}: Questionnaire item '{c.code}' has no value at this point "
                                    f"(not a start input nor an earlier output)")
            available |= {c.code for c in step.outputs} | {"error"}
        elif step.kind in ("send", "end_send"):
            owner = spec.message_owner(step.name)
            if owner is None:
                findings.append(f"{ctx}: message '{step.name}' is not defined by any process (dangling message)")
                continue
            target_proc, target_msg = owner
            if step.kind == "send" and not target_msg.is_start:
                findings.append(f"{ctx}: '{step.name}' is not a start message; send starts another process")
            if step.kind == "send" and step.target_variable not in available:
                findings.append(f"{ctx}: target variable '{step.target_variable}' has no value at this point")
            for p in target_msg.inputs:
                if p.min > 0 and p.code.code not in available:
                    findings.append(f"{ctx}: Task input '{p.code.code}' (min {p.min}) has no value at this point")
            if step.kind == "end_send" and not (last and j == len(steps) - 1):
                findings.append(f"{ctx}: a message end must be the last step")
        elif step.kind == "receive":
            msg = next((m for m in proc.messages if m.name == step.name), None)
            if msg is None:
                findings.append(f"{ctx}: message '{step.name}' is not in processes.{proc.name}.messages (dangling message)")
            else:
                available |= {p.code.code for p in msg.inputs}
    return available
