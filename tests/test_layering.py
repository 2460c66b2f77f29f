"""The import graph: tuner/ modules import downward only (no cycle, lazy imports inside functions included),
and trainers/ imports no Ray, Optuna or W&B. Read with ast from the source, so nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = ("ray", "optuna", "wandb")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (`from tuner import x` counts as tuner.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve against the package
            package = path.parent.name
            names.add(f"{package}.{node.module}" if node.module else package)
    return names


def package_graph(package: str) -> dict[str, set[str]]:
    modules = {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    return {m: {n for n in imported_modules(p) if n in modules and n != m} for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None. Depth-first search with colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_tuner_imports_have_no_cycle():
    graph = package_graph("tuner")
    assert len(graph) >= 10 and graph["tuner.export"]  # the check really reads the package
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    graph = package_graph("tuner")
    graph["tuner.record"] = graph["tuner.record"] | {"tuner.export"}  # export → results → record → export
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "tuner.record" in cycle


def test_trial_needs_no_searcher_and_readers_need_no_tuner_wiring():
    graph = package_graph("tuner")
    assert "tuner.searcher" not in graph["tuner.trial"]  # result keys come from tuner.keys
    for reader in ("tuner.results", "tuner.export", "tuner.report", "tuner.plots", "tuner.record"):
        assert "tuner.search" not in graph[reader], reader


def test_trainers_import_no_ray_optuna_or_wandb():
    offenders = []
    for path in sorted((ROOT / "trainers").glob("*.py")):
        for name in imported_modules(path):
            if name.split(".")[0] in FORBIDDEN_IN_CORE:
                offenders.append(f"{path.name}: {name}")
    assert not offenders, offenders
    assert imported_modules(ROOT / "trainers" / "train.py")  # the reader sees the core's imports


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for n in graph[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


VERIFIER_MODULES = {"trainers.evaluate", "trainers.verify", "trainers.bab", "trainers.alpha_crown"}


def test_training_losses_sit_below_the_verifiers():
    """The training losses take the input box from its own module, not from evaluate: nothing they import
    leads to evaluation, α-CROWN or BaB (docs/decisions.md, "The import order")."""
    graph = package_graph("trainers")
    assert "trainers.input_box" in graph["trainers.methods"]  # the check reads real imports
    assert not reaches(graph, "trainers.methods") & (VERIFIER_MODULES | {"trainers.crown", "trainers.train"})


def test_verification_does_not_import_the_training_loop():
    graph = package_graph("trainers")
    assert "trainers.device" in graph["trainers.verify"]
    assert "trainers.train" not in reaches(graph, "trainers.verify")
    assert "trainers.methods" not in reaches(graph, "trainers.verify")


def test_trainers_import_nothing_from_tuner():
    offenders = [f"{p.name}: {n}" for p in sorted((ROOT / "trainers").glob("*.py"))
                 for n in imported_modules(p) if n.split(".")[0] in ("tuner", "bench")]
    assert not offenders, offenders
