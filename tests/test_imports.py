"""The package's imports run one way, down the layers of docs/design.md ("Layers"), with no
cycles. Every import counts: inside functions and under ``if TYPE_CHECKING:`` too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "detox_exp"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports (``from a import b``: a.b if it is a module,
    else a)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


# top to bottom; a module may import its own layer or a lower one. A name ending in "." is a
# package (it and all its modules).
LAYERS = (
    ("cli", "__main__"),
    ("pipeline", "compare", "compare_plots", "compare_runs", "run_config"),
    ("frontier.",),
    ("ppo.", "guided.", "evaluation."),
    ("training.",),
    ("generation",),
    (
        "fast.",
        "reward.",
        "data.",
        "demo.",
        "models",
        "seq2seq",
        "kl",
        "kl_control",
        "guidance",
        "metrics",
        "frontier_math",
        "hub",
    ),
    (
        "tracking",
        "wandb_run",
        "checkpoint",
        "distributed",
        "schema",
        "errors",
        "metric_names",
        "utils",
        "registry",
        "sweeps",
        "perf",
        "config_keys",
        "interrupt",
        "console",
    ),
)
# packages of one layer that must not import each other (either way)
APART = (("ppo.", "evaluation."), ("ppo.", "guided."), ("guided.", "evaluation."))


def layer_of(module: str) -> int | None:
    name = module.removeprefix("detox_exp.")
    for index, names in enumerate(LAYERS):
        if any(name == n.rstrip(".") or (n.endswith(".") and name.startswith(n)) for n in names):
            return index
    return None


def in_package(module: str, package: str) -> bool:
    name = module.removeprefix("detox_exp.")
    return name.startswith(package) or name == package.rstrip(".")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs up a layer, or between packages kept apart."""
    bad = []
    for module, imported in graph.items():
        for other in imported:
            if layer_of(other) < layer_of(module):
                bad.append(f"{module} -> {other} (up a layer)")
            for a, b in APART:
                if {in_package(module, a), in_package(other, b)} == {True} or {
                    in_package(module, b),
                    in_package(other, a),
                } == {True}:
                    bad.append(f"{module} -> {other} ({a} and {b} are kept apart)")
    return sorted(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_walker_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "detox_exp.errors" in graph["detox_exp.pipeline"]  # the walker sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_every_module_has_a_layer() -> None:
    graph = import_graph()
    unplaced = [m for m in graph if m != "detox_exp" and layer_of(m) is None]
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_imports_run_down_the_layers() -> None:
    graph = import_graph()
    assert graph["detox_exp"] == set()  # the package root loads nothing (cli registers)
    assert "detox_exp.seq2seq" in graph["detox_exp.fast.t5_decoding"]  # the walker sees them
    assert layering_violations(graph) == []


def test_the_layer_check_fails_on_an_import_into_ppo() -> None:
    """From evaluation/ or fast/ into ppo/, including one under TYPE_CHECKING."""
    assert layering_violations({"detox_exp.evaluation.x": {"detox_exp.ppo.core"}})
    assert layering_violations({"detox_exp.fast.x": {"detox_exp.training.policy"}})
    tree = "if TYPE_CHECKING:\n    from detox_exp.ppo.settings import PPOSettings\n"
    found = {n.module for n in ast.walk(ast.parse(tree)) if isinstance(n, ast.ImportFrom)}
    assert found == {"detox_exp.ppo.settings"}
    assert not layering_violations({"detox_exp.ppo.trainer": {"detox_exp.generation"}})
