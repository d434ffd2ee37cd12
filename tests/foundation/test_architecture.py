"""The package's shape (docs/architecture.md): its import graph has no cycle and no import from a
lower layer to a higher one (lazy imports inside functions included), and a method is one module
in spoxl/methods/ plus its registry line."""

import ast
from pathlib import Path

import spoxl

ROOT = Path(spoxl.__file__).parent

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("spoxl", "spoxl.errors", "spoxl.paths", "spoxl.rng", "spoxl.registry"),
    ("spoxl.sampling", "spoxl.kernels"),
    ("spoxl.models", "spoxl.data"),
    ("spoxl.imaging", "spoxl.evaluation", "spoxl.toy", "spoxl.spo", "spoxl.preference_models"),
    ("spoxl.config", "spoxl.engine", "spoxl.cluster"),
    ("spoxl.methods",),
    ("spoxl.train", "spoxl.commands", "spoxl.cli", "spoxl.demo_report"),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the spoxl modules it imports anywhere in its body (the parent packages of a module
    are not counted: importing spoxl.kernels.losses.spo runs spoxl.kernels first by necessity)."""
    mods = modules()

    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t) if t.startswith("spoxl") else None
                if r and r != m and not m.startswith(r + "."):
                    graph[m].add(r)
    return graph


def layer(module: str) -> int:
    matches = [(len(n), i) for i, names in enumerate(LAYERS) for n in names if module == n or module.startswith(n + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return max(matches)[1]


def upward_imports(graph) -> list[tuple[str, str]]:
    return sorted((m, t) for m, targets in graph.items() for t in targets if layer(t) > layer(m))


def find_cycle(graph) -> list[str] | None:
    """One import cycle as a path of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (cycle := visit(t, path + [t])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_no_import_reaches_up_a_layer():
    assert upward_imports(import_graph()) == []


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


def test_the_checks_catch_a_planted_violation():
    """Both checks can fail: an upward import and a cycle planted in the real graph."""
    graph = import_graph()
    graph["spoxl.sampling"].add("spoxl.methods.spo")
    assert upward_imports(graph) == [("spoxl.sampling", "spoxl.methods.spo")]
    graph = import_graph()
    graph["spoxl.errors"].add("spoxl.rng")
    graph["spoxl.rng"].add("spoxl.errors")
    assert find_cycle(graph) in (["spoxl.errors", "spoxl.rng", "spoxl.errors"], ["spoxl.rng", "spoxl.errors", "spoxl.rng"])


def test_every_method_module_is_registered_and_builds_from_a_recipe():
    from spoxl.config import load_config
    from spoxl.methods.base import Objective
    from spoxl.registry import METHOD_MODULES, build_objective

    modules_on_disk = {f"spoxl.methods.{p.stem}" for p in (ROOT / "methods").glob("*.py")
                       if not p.stem.startswith("_") and p.stem != "base"}  # fmt: skip
    assert modules_on_disk == set(METHOD_MODULES.values())
    for name in METHOD_MODULES:
        recipe = load_config(None, [f"method.name={name}"])
        objective = build_objective(recipe)
        assert isinstance(objective, Objective) and objective.recipe is recipe
