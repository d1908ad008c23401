"""A process of the spec → the nodes and flows of its BPMN model, laid out for BPMN DI.

The shape is fixed by the DSF's way of working: a message start, the start Task's inputs read
into variables, then the steps in order. A work item is a user task (the DSF external work item)
followed by a gateway that leaves for the failure end when the step answered `error`. Every
error path ends in the start Task failing with that error, never in a process that waits forever:
its end event terminates the process, so a failing step in one branch of a parallel step also
ends what the other branches are waiting for. A parallel step is a parallel gateway splitting into
its branches (each a lane of its own in the diagram, the first on the main line, the others above)
and one joining them; the process goes on when every branch has arrived.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omi_dsf.spec.model import Process, Spec, Step

JAVA_PACKAGE = "de.medizininformatik_initiative.omi.dsf"
ERROR_CONDITION = "${execution.getVariable('error') != null}"
# Flow names out of a step's "ok?" gateway: the condition above, and the default flow.
ERROR_FLOW_NAME, OK_FLOW_NAME = "error", "no error"
# camunda:historyTimeToLive of each process: the engine's history (finished instances and their
# variables, which include the patient identifier at the requester) is cleaned up after this. P30D is
# what the DSF BPE (1.9 and 2.x) sets on a process that has none, so stating it changes nothing at
# run time; it says so in the model, where the DSF linter looks for it.
HISTORY_TIME_TO_LIVE = "P30D"

SIZES = {  # width, height of each kind for the diagram
    "startEvent": (36, 36), "endEvent": (36, 36), "messageEndEvent": (36, 36),
    "intermediateThrowEvent": (36, 36), "messageCatchEvent": (36, 36), "timerCatchEvent": (36, 36),
    "terminateEndEvent": (36, 36), "serviceTask": (100, 80), "userTask": (100, 80),
    "exclusiveGateway": (50, 50), "eventBasedGateway": (50, 50), "parallelGateway": (50, 50),
    "boundaryTimer": (36, 36),
}


@dataclass
class Node:
    id: str
    kind: str
    name: str = ""
    x: int = 0
    y: int = 0
    attrs: dict = field(default_factory=dict)   # kind-specific: class, fields, formKey, message, …

    @property
    def width(self) -> int:
        return SIZES[self.kind][0]

    @property
    def height(self) -> int:
        return SIZES[self.kind][1]


@dataclass
class Flow:
    id: str
    source: Node
    target: Node
    condition: str | None = None
    name: str = ""      # required when the source has more than one outgoing flow (a gateway)

    @property
    def waypoints(self) -> list[tuple[int, int]]:
        s, t = self.source, self.target
        scx, scy = s.x + s.width // 2, s.y + s.height // 2
        tcx, tcy = t.x + t.width // 2, t.y + t.height // 2
        if abs(scy - tcy) < 5:
            return [(s.x + s.width, scy), (t.x, tcy)]
        start = (scx, s.y + s.height) if tcy > scy else (scx, s.y)
        if abs(tcx - scx) < 5:
            return [start, (tcx, t.y if tcy > scy else t.y + t.height)]
        return [start, (scx, tcy), (t.x if tcx > scx else t.x + t.width, tcy)]


@dataclass
class Graph:
    process: Process
    process_id: str
    nodes: list[Node] = field(default_factory=list)
    flows: list[Flow] = field(default_factory=list)
    messages: dict[str, str] = field(default_factory=dict)   # message name -> BPMN message id
    history_time_to_live: str = HISTORY_TIME_TO_LIVE

    def incoming(self, node: Node) -> list[Flow]:
        return [f for f in self.flows if f.target is node]

    def outgoing(self, node: Node) -> list[Flow]:
        return [f for f in self.flows if f.source is node]

    def default_flow(self, node: Node) -> Flow | None:
        return next((f for f in self.outgoing(node) if f.condition is None), None) if node.kind == "exclusiveGateway" else None


MAIN_Y, STEP_X = 100, 160
LANE_DY = 200        # between the lanes of a parallel step's branches
FAIL_DY = 200        # from the main line down to the failure path


class _Builder:
    def __init__(self, spec: Spec, process: Process):
        self.spec, self.g = spec, Graph(process, spec.process_id(process))
        self.x = 60
        self.fail: Node | None = None
        lanes = max((len(s.branches) for s in process.steps if s.kind == "parallel"), default=1)
        self.main_y = MAIN_Y + LANE_DY * (lanes - 1)    # the other branches' lanes above the main line
        self.fail_y = self.main_y + FAIL_DY
        self.lane_y = self.main_y

    def add(self, id_: str, kind: str, name: str = "", y: int | None = None, advance: bool = True, **attrs) -> Node:
        w, h = SIZES[kind]
        node = Node(id_, kind, name, self.x + (100 - w) // 2, (self.lane_y if y is None else y) + (80 - h) // 2, attrs)
        self.g.nodes.append(node)
        if advance:
            self.x += STEP_X
        return node

    def flow(self, source: Node, target: Node, condition: str | None = None, name: str = "") -> Flow:
        f = Flow(f"Flow_{source.id}_{target.id}", source, target, condition, name)
        self.g.flows.append(f)
        return f

    def message_id(self, name: str) -> str:
        return self.g.messages.setdefault(name, f"Message_{name}")

    def service(self, id_: str, name: str, cls: str, fields: dict[str, str] | None = None, y=None, advance=True) -> Node:
        return self.add(id_, "serviceTask", name, y=y, advance=advance, cls=f"{JAVA_PACKAGE}.{cls}", fields=fields or {})

    def failure_end(self) -> Node:
        """The shared failure path: start Task failed with the step's error, then end."""
        if self.fail is None:
            x = self.x
            self.fail = self.service("FailStartTask", "fail start Task", "SetTaskOutputs",
                                     {"failed": "true", "outputs": ",".join(c.code for c in self.g.process.outputs)},
                                     y=self.fail_y, advance=False)
            self.fail.x = 60 + STEP_X * 2
            end = self.add("EndFailed", "terminateEndEvent", "failed", y=self.fail_y, advance=False)
            end.x = self.fail.x + STEP_X + 32
            self.flow(self.fail, end)
            self.x = x
        return self.fail

    def timeout_end(self, anchor: Node, step_name: str, timeout: str, message_end: dict | None) -> Node:
        """Where a boundary or event timer leads: a failed start Task, or (provider) an error message."""
        text = f"step {step_name} did not complete within {timeout}"
        x = self.x
        self.x = anchor.x + 60
        if message_end is not None:
            fields = dict(message_end, errorMessage=text)
            end = self.add(f"Timeout_{step_name}", "messageEndEvent", f"{step_name} timed out", y=self.fail_y,
                           advance=False, cls=f"{JAVA_PACKAGE}.SendTaskMessage", fields=fields)
            self.x = x
            return end
        task = self.service(f"Timeout_{step_name}", f"{step_name} timed out", "SetTaskOutputs",
                            {"failed": "true", "errorMessage": text}, y=self.fail_y + 120, advance=False)
        end = self.add(f"EndTimeout_{step_name}", "terminateEndEvent", "timed out", y=self.fail_y + 120,
                       advance=False)
        end.x = task.x + STEP_X
        self.flow(task, end)
        self.x = x
        return task

    def error_gateway(self, prev: Node, step_name: str) -> Node:
        gw = self.add(f"Gateway_{step_name}_ok", "exclusiveGateway", f"{step_name} ok?")
        self.flow(prev, gw)
        self.flow(gw, self.failure_end(), ERROR_CONDITION, ERROR_FLOW_NAME)
        return gw

    def leave(self, prev: Node, target: Node) -> Flow:
        """The flow on from the previous node; out of a step's "ok?" gateway it is the default, "no error"."""
        return self.flow(prev, target, name=OK_FLOW_NAME if prev.kind == "exclusiveGateway" else "")

    def send_fields(self, step: Step) -> dict[str, str]:
        target_proc, msg = self.spec.message_owner(step.name)
        fields = {
            "instantiatesCanonical": f"{self.spec.process_url(target_proc)}|#{{version}}",
            "messageName": msg.name,
            "profile": f"{self.spec.profile_url(msg)}|#{{version}}",
            "targetRole": step.role or "",
            "inputs": ",".join(p.code.code for p in msg.inputs),
        }
        if step.target_variable:
            fields["targetOrganizationVariable"] = step.target_variable
        return fields

    def step(self, step: Step, prev: Node, end_send: Step | None) -> Node:
        """The nodes of one step after `prev`, on the current lane; answers the node to go on from."""
        if step.kind == "work_item":
            task = self.add(f"WorkItem_{step.name}", "userTask", step.name,
                            formKey=f"{self.spec.questionnaire_url(step)}|#{{version}}",
                            listener=f"{JAVA_PACKAGE}.WorkItemListener",
                            withdrawn=f"{JAVA_PACKAGE}.WorkItemWithdrawn",
                            answers=f"{JAVA_PACKAGE}.WorkItemAnswers")
            self.leave(prev, task)
            if step.timeout:
                timer = self.add(f"Timer_{step.name}", "boundaryTimer", f"{step.timeout}", advance=False,
                                 attached=task.id, duration=step.timeout)
                timer.x, timer.y = task.x + 32, task.y + task.height - 18
                target = self.timeout_end(task, step.name, step.timeout,
                                          self.send_fields(end_send) if (step.continue_on_error and end_send) else None)
                self.flow(timer, target)
            return task if step.continue_on_error else self.error_gateway(task, step.name)
        if step.kind == "send":
            node = self.add(f"Send_{step.name}", "intermediateThrowEvent", step.name,
                            cls=f"{JAVA_PACKAGE}.SendTaskMessage", fields=self.send_fields(step))
            self.leave(prev, node)
            return node
        if step.kind == "receive":
            gw = self.add(f"Await_{step.name}", "eventBasedGateway", f"await {step.name}")
            self.leave(prev, gw)
            catch = self.add(f"Receive_{step.name}", "messageCatchEvent", step.name, message=self.message_id(step.name))
            self.flow(gw, catch, name=f"{step.name} received")
            if step.timeout:
                timer = self.add(f"Timer_{step.name}", "timerCatchEvent", step.timeout, advance=False,
                                 y=self.lane_y + (FAIL_DY // 2 if self.lane_y == self.main_y else -FAIL_DY // 2),
                                 duration=step.timeout)
                timer.x = catch.x
                self.flow(gw, timer, name=f"{step.timeout} passed")
                self.flow(timer, self.timeout_end(timer, step.name, step.timeout, None))
            read = self.service(f"Read_{step.name}", f"read {step.name} inputs", "ReadTaskInputs")
            self.flow(catch, read)
            return self.error_gateway(read, step.name)
        raise AssertionError(f"step kind {step.kind}")

    def parallel(self, step: Step, prev: Node, end_send: Step | None) -> Node:
        """A parallel gateway into the branches, each on its lane, and one out of them all."""
        n = sum(1 for node in self.g.nodes if node.kind == "parallelGateway") // 2 + 1
        split = self.add(f"Split_{n}", "parallelGateway", "at once")
        self.leave(prev, split)
        x0, ends, xs = self.x, [], []
        for k, branch in enumerate(step.branches):
            self.x, self.lane_y = x0, self.main_y - LANE_DY * k
            last = split
            for inner in branch:
                last = self.step(inner, last, end_send)
            ends.append(last)
            xs.append(self.x)
        for f in self.g.outgoing(split):   # each flow named for the branch it starts
            f.name = f.target.name
        self.x, self.lane_y = max(xs), self.main_y
        # asynchronous before: the branches end in their own transactions (a work item answered, a message
        # received: at the same moment, the two joins clashed in the engine, OptimisticLockingException, and
        # the BPE dropped the answer); the engine's job executor then joins them one at a time
        join = self.add(f"Join_{n}", "parallelGateway", "all done", async_before=True)
        for last in ends:
            self.leave(last, join)
        return join

    def build(self) -> Graph:
        proc = self.g.process
        start = self.add("Start", "startEvent", proc.start.name, message=self.message_id(proc.start.name))
        prev = self.service("ReadStartInputs", "read start inputs", "ReadTaskInputs")
        self.flow(start, prev)
        end_send = next((s for s in proc.steps if s.kind == "end_send"), None)
        for step in proc.steps:
            if step.kind == "end_send":
                end = self.add(f"End_{step.name}", "messageEndEvent", step.name,
                               cls=f"{JAVA_PACKAGE}.SendTaskMessage", fields=self.send_fields(step))
                self.leave(prev, end)
                return self.g
            prev = self.parallel(step, prev, end_send) if step.kind == "parallel" else self.step(step, prev, end_send)
        done = self.service("SetOutputs", "set start Task outputs", "SetTaskOutputs",
                            {"outputs": ",".join(c.code for c in proc.outputs)})
        self.leave(prev, done)
        end = self.add("End", "endEvent", "done")
        self.flow(done, end)
        return self.g


def build_graph(spec: Spec, process: Process) -> Graph:
    g = _Builder(spec, process).build()
    for node in g.nodes:   # a branch must say in the model which way it goes (the DSF linter checks this too)
        out = g.outgoing(node)
        if len(out) > 1 and not all(f.name for f in out):
            raise AssertionError(f"{g.process_id}: unnamed flow out of {node.id}")
    return g
