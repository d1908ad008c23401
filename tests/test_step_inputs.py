"""Each work item declares in the spec exactly the inputs its step module reads: what a step needs
arrives as a declared process variable, and no declared input goes unread."""

from __future__ import annotations

import ast
import importlib.util

import pytest

from omi_dsf.spec.model import load_spec
from omi_dsf.steps import HANDLERS

WORK_ITEMS = [(proc.name, step) for proc in load_spec().processes for step in proc.all_steps() if step.kind == "work_item"]


def inputs_read(module_name: str) -> set[str]:
    """The input codes a step module reads: text_input(inputs, CODE), inputs.get(CODE) and
    inputs[CODE], with CODE a string or a module-level string constant."""
    spec = importlib.util.find_spec(module_name)
    tree = ast.parse(open(spec.origin).read())
    constants = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 for t in node.targets if isinstance(t, ast.Name)}

    def code(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return constants.get(node.id) if isinstance(node, ast.Name) else None

    def is_inputs(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == "inputs"

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "text_input" and len(node.args) > 1 and is_inputs(node.args[0]):
                found.add(code(node.args[1]))
            elif isinstance(f, ast.Attribute) and f.attr == "get" and is_inputs(f.value) and node.args:
                found.add(code(node.args[0]))
        elif isinstance(node, ast.Subscript) and is_inputs(node.value):
            found.add(code(node.slice))
    assert None not in found, f"{module_name}: an input read by a code the test cannot resolve"
    return found


@pytest.mark.parametrize("process,step", WORK_ITEMS, ids=[s.name for _, s in WORK_ITEMS])
def test_declared_inputs_are_what_the_step_reads(process, step):
    module = HANDLERS[step.name].partition(":")[0]
    declared = {c.code for c in step.inputs}
    read = inputs_read(module)
    assert read - declared == set(), f"{process}.{step.name} reads inputs the spec does not declare"
    assert declared - read == set(), f"{process}.{step.name} declares inputs no code reads"


def test_every_work_item_has_a_step_module():
    assert {s.name for _, s in WORK_ITEMS} == set(HANDLERS)
