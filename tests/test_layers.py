"""The package layering of omi_dsf, read from the source (every import statement, module-level or
inside a function): lower layers never import higher ones, no two packages import each other,
directly or around a cycle, and no product module uses the test and demo harness (omi_dsf/testkit)."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

from helpers_source import parsed

ROOT = Path(__file__).resolve().parent.parent / "omi_dsf"

# The allowed dependency direction, lowest layer first: a package may import packages of its own
# layer (as long as no cycle results) and of the layers below it, never above. A "package" is a
# folder under omi_dsf/ or a top-level module (omi_dsf/audit.py is "audit"); "omi_dsf" is the
# package's own __init__ (the version).
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"omi_dsf", "errors", "terminal", "tls", "peer", "spec", "database", "processes", "malloc", "config"}),
    ("domain", {"serving", "dsf", "audit", "consent", "deid", "dicomweb", "dicomweb_client", "inference", "registry",
                "transfer", "validate", "generate"}),
    ("steps", {"steps"}),                  # one module per step + the contract; map domain errors
    ("runtime", {"worker"}),               # poll → claim → handle → complete; finds the steps
    ("apps", {"client", "fhirstore", "testbed", "demo", "testkit"}),
    ("entry", {"cli", "__main__"}),        # the command line; parts are loaded by name, not imported
]

# Domain packages: besides the layering, named here so that the rule reads as the issue states it.
DOMAIN = {"deid", "consent", "inference", "dicomweb", "dsf", "registry", "audit", "transfer", "serving"}
NOT_FROM_DOMAIN = {"worker", "steps", "cli", "demo", "testbed", "testkit"}

# The test and demo harness (phantoms, synthetic identities, PACS / gateway / AI service launchers,
# test bed site files) and who may use it: itself and the demo command, omi_dsf/demo.py (besides
# tests/ and tools/, which are not read here). The demo command is the harness's user, not a
# product module: nothing but the command line's table of commands (a name, loaded when `omi demo`
# runs) reaches it. Every other module of omi_dsf is product and never imports the harness, neither
# by an import statement, nor through a module that does (omi_dsf.demo), nor by name (importlib, a
# handler reference "module:function"). omi_dsf/steps/demo.py, the no-op handler of `worker --demo`,
# is product and uses no harness.
HARNESS = "testkit"
HARNESS_USERS = {"testkit", "demo"}
_HARNESS_NAME = re.compile(rf"omi_dsf\.{HARNESS}(\.\w+)*(:\w+)?")

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The omi_dsf modules `path` imports (`from a import b` counts as a.b where b is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if _is_module(sub) else module)
    return {m for m in found if m == "omi_dsf" or m.startswith("omi_dsf.")}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "omi_dsf"


@functools.cache
def module_imports() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def _named_modules(path: Path) -> set[str]:
    """The omi_dsf.testkit modules a string constant of `path` names as a whole (what importlib or a
    handler reference would load); docstrings and prose that mention one do not count."""
    return {node.value for node in ast.walk(parsed(path))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _HARNESS_NAME.fullmatch(node.value)}


def package_edges() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) → the module imports behind it, temporary ones left out."""
    edges: dict[tuple[str, str], list[str]] = {}
    for module, imported in module_imports().items():
        for target in imported:
            a, b = _package(module), _package(target)
            if a != b:
                edges.setdefault((a, b), []).append(f"{module} -> {target}")
    return edges


def _layer_of() -> dict[str, int]:
    return {pkg: i for i, (_, pkgs) in enumerate(LAYERS) for pkg in pkgs}


def test_every_package_has_a_layer():
    packages = {_package(m) for m in module_imports()}
    missing = sorted(packages - set(_layer_of()))
    assert not missing, f"packages without a layer in LAYERS: {missing}"


def test_lower_layers_do_not_import_higher_ones():
    layer = _layer_of()
    upward = [f"{a} ({LAYERS[layer[a]][0]}) imports {b} ({LAYERS[layer[b]][0]}): {why}"
              for (a, b), why in sorted(package_edges().items())
              if a in layer and b in layer and layer[b] > layer[a]]
    assert not upward, "\n".join(upward)


def test_domain_packages_import_no_runtime_steps_cli_or_harness():
    bad = [f"{a} imports {b}: {why}" for (a, b), why in sorted(package_edges().items())
           if a in DOMAIN and b in NOT_FROM_DOMAIN]
    assert not bad, "\n".join(bad)


def harness_uses(imports: dict[str, set[str]], named: dict[str, set[str]]) -> list[str]:
    """Product modules (every package but HARNESS_USERS) that import the harness or name it, directly
    or through a module that does (importing omi_dsf.demo, the harness's user, counts too)."""
    reaches: dict[str, bool] = {}

    def uses_harness(module: str, seen: frozenset = frozenset()) -> bool:
        if _package(module) == HARNESS:
            return True
        if module not in reaches:
            reaches[module] = module not in seen and any(
                uses_harness(t, seen | {module}) for t in imports.get(module, ()))
        return reaches[module]

    bad = []
    for module in sorted(set(imports) | set(named)):
        if _package(module) in HARNESS_USERS:
            continue
        for t in sorted(imports.get(module, ())):
            if _package(t) == HARNESS:
                bad.append(f"{module} imports {t}")
            elif uses_harness(t):
                bad.append(f"{module} imports {t}, which uses the harness")
        bad += [f"{module} names {t!r}" for t in sorted(named.get(module, ()))]
    return bad


def test_product_modules_do_not_use_the_harness():
    assert (ROOT / HARNESS / "__init__.py").is_file()
    named = {_module_name(p): _named_modules(p) for p in sorted(ROOT.rglob("*.py"))}
    bad = harness_uses(module_imports(), named)
    assert not bad, "product modules using omi_dsf.testkit (only the demo, tests and tools may):\n" + "\n".join(bad)


def test_the_harness_rule_catches_an_import_and_a_name(tmp_path):
    """The rule above, fed a product module that imports the harness, one that names it for
    importlib, and the users allowed to do both."""
    (tmp_path / "m.py").write_text('import importlib\n'
                                   'from omi_dsf.testkit.phantom import write_ct_study\n'
                                   'HANDLER = "omi_dsf.testkit.steps:no_op"\n'
                                   '"""omi_dsf.testkit.phantom is prose here"""\n')
    named = _named_modules(tmp_path / "m.py")
    assert named == {"omi_dsf.testkit.steps:no_op"}
    imports = {"omi_dsf.deid.cli": {"omi_dsf.testkit.phantom", "omi_dsf.deid.pipeline"},
               "omi_dsf.demo": {"omi_dsf.testkit.phantom"}, "omi_dsf.testkit.gateway": {"omi_dsf.testkit.procs"},
               "omi_dsf.client.cli": {"omi_dsf.demo", "omi_dsf.deid.pipeline"}}
    assert harness_uses(imports, {"omi_dsf.worker.config": named, "omi_dsf.demo": named}) == [
        "omi_dsf.client.cli imports omi_dsf.demo, which uses the harness",
        "omi_dsf.deid.cli imports omi_dsf.testkit.phantom", "omi_dsf.worker.config names 'omi_dsf.testkit.steps:no_op'"]


def test_no_package_cycles():
    graph: dict[str, set[str]] = {}
    for a, b in package_edges():
        graph.setdefault(a, set()).add(b)
    cycles, done, path = [], set(), []

    def visit(node: str) -> None:
        if node in path:
            cycles.append(" -> ".join(path[path.index(node):] + [node]))
            return
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert not cycles, "package cycles:\n" + "\n".join(cycles)
