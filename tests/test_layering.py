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


def module_files(package: str) -> dict[str, Path]:
    """{dotted module name: file} for a package and its subpackages (their __init__ files left out)."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p
            for p in sorted((ROOT / package).rglob("*.py")) if p.stem != "__init__"}


def package_graph(package: str) -> dict[str, set[str]]:
    modules = module_files(package)
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
    assert len(graph) >= 10 and graph["tuner.results.export"]  # the check really reads the package
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    graph = package_graph("tuner")
    graph["tuner.space.record"] = graph["tuner.space.record"] | {"tuner.results.export"}  # export → results → record → export
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "tuner.space.record" in cycle


# The service's parts, in the order they may import each other (tuner/__init__.py); api, commands and cli on top.
PARTS = ["tuner.space", "tuner.study", "tuner.results", "tuner.tracking", "tuner.run"]
TOP = {"tuner.api", "tuner.commands", "tuner.cli"}


def part_of(module: str) -> str:
    return module if module in TOP else ".".join(module.split(".")[:2])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a part into a later part (or into the top): what the order forbids."""
    rank = {part: i for i, part in enumerate(PARTS)} | {m: len(PARTS) for m in TOP}
    return [f"{m} imports {n}" for m, names in sorted(graph.items()) for n in sorted(names)
            if rank[part_of(n)] > rank[part_of(m)]]


def test_tuner_parts_import_in_one_order():
    graph = package_graph("tuner")
    assert {part_of(m) for m in graph} == set(PARTS) | TOP  # every module sits in a part
    assert "tuner.space.search_space" in graph["tuner.run.trial"]  # the check reads real imports
    assert upward_imports(graph) == []


def test_the_order_check_finds_an_upward_import():
    graph = package_graph("tuner")
    graph["tuner.space.fidelity"] = graph["tuner.space.fidelity"] | {"tuner.run.driver"}
    assert upward_imports(graph) == ["tuner.space.fidelity imports tuner.run.driver"]


def test_trial_needs_no_searcher_and_readers_need_no_tuner_wiring():
    graph = package_graph("tuner")
    assert "tuner.study.searcher" not in graph["tuner.run.trial"]  # result keys come from tuner.study.keys
    for reader in ("tuner.results.experiment", "tuner.results.export", "tuner.results.report", "tuner.results.plots", "tuner.space.record"):
        assert "tuner.run.driver" not in graph[reader], reader


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


def test_training_loop_imports_no_stronger_verifier():
    """The loop evaluates per epoch (evaluate.py) but never loads CROWN, α-CROWN or BaB: the table names
    their modules and evaluate imports them only when one is asked for (trainers/verifiers.py)."""
    graph = package_graph("trainers")
    assert {"trainers.evaluate", "trainers.verifiers"} <= reaches(graph, "trainers.train")
    stronger = {"trainers.bab", "trainers.alpha_crown", "trainers.crown", "trainers.verify"}
    assert not reaches(graph, "trainers.train") & stronger


def test_verification_does_not_import_the_training_loop():
    graph = package_graph("trainers")
    assert "trainers.device" in graph["trainers.verify"]
    assert "trainers.train" not in reaches(graph, "trainers.verify")
    assert "trainers.methods" not in reaches(graph, "trainers.verify")


def test_trainers_import_nothing_from_tuner():
    offenders = [f"{p.name}: {n}" for p in sorted((ROOT / "trainers").glob("*.py"))
                 for n in imported_modules(p) if n.split(".")[0] in ("tuner", "bench")]
    assert not offenders, offenders


# ---- one table of verifiers (trainers/verifiers.py) -------------------------------------------------
def _table():
    import trainers.verifiers as table  # plain data: imports nothing else of the package
    return table


def _core_files():
    return [p for package in ("trainers", "tuner") for p in module_files(package).values()
            if p.name != "verifiers.py"]


def _strings(nodes) -> list[str]:
    return [n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def repeated_verifier_facts(path: Path, names: set[str], own: set[str]) -> list[str]:
    """Where a file lists verifiers itself: a tuple/list/set/dict literal with two or more verifier names or
    metric keys, or any string that is the name or metric key of a verifier only the table should name
    (`own`: those not also a training method or bound). TRAINING_BOUNDS (config.py) is the training losses'
    fact, not the verifiers'."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    allowed = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == "TRAINING_BOUNDS" for t in n.targets)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and id(node) not in allowed:
            hits = [s for s in _strings(node.keys if isinstance(node, ast.Dict) else node.elts) if s in names]
            if len(hits) >= 2:
                found.append(f"{path.name}:{node.lineno} lists {hits}")
        if isinstance(node, ast.Constant) and node.value in own:
            found.append(f"{path.name}:{node.lineno} names {node.value!r}")
    return found


def test_verifier_names_and_metric_keys_live_only_in_the_table():
    table = _table()
    names = {s for v in table.VERIFIERS.values() for s in (v.name, v.metric)}
    own = {s for v in table.VERIFIERS.values() if not v.per_epoch for s in (v.name, v.metric)}
    assert {"alpha-crown", "bab_err", "crown_ibp_err"} <= names and "ibp" not in own
    offenders = [f for p in _core_files() for f in repeated_verifier_facts(p, names, own)]
    assert not offenders, offenders


def test_the_names_check_finds_a_list_of_verifiers(tmp_path):
    table = _table()
    names = {s for v in table.VERIFIERS.values() for s in (v.name, v.metric)}
    src = tmp_path / "rerank.py"
    src.write_text('RERANK = ("ibp", "crown-ibp")\nKEYS = {"pgd_err": 1, "ibp_err": 2}\nif x == "bab": pass\n')
    assert len(repeated_verifier_facts(src, names, {"bab"})) == 3


KNOB_ALIASES = {"iterations", "lr", "time_limit", "ITERATIONS", "LR", "TIME_LIMIT"}  # a knob's name in bab/α-CROWN


def literal_knob_defaults(path: Path, knobs: dict) -> list[str]:
    """Knob defaults written as numbers outside the table: a parameter default, a dataclass field or a
    module constant named after a knob (or its name in bab.py/alpha_crown.py) holding one of the table's
    default numbers, or `add_argument(FLAG, default=number)` for a knob's flag."""
    numbers = {k.default for k in knobs.values()}
    names = set(knobs) | KNOB_ALIASES
    flags = {k.flag for k in knobs.values()}

    def literal(node) -> bool:
        return isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value in numbers

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args
            pairs = list(zip(args[len(args) - len(node.args.defaults):], node.args.defaults))
            pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
            found += [f"{path.name}:{node.lineno} {a.arg}={d.value}" for a, d in pairs
                      if a.arg in names and literal(d)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in names:
            if literal(node.value):
                found.append(f"{path.name}:{node.lineno} {node.target.id} = {node.value.value}")
        elif isinstance(node, ast.Assign) and literal(node.value):
            found += [f"{path.name}:{node.lineno} {t.id} = {node.value.value}" for t in node.targets
                      if isinstance(t, ast.Name) and t.id in names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            if set(_strings(node.args)) & flags:
                found += [f"{path.name}:{node.lineno} {_strings(node.args)} default={k.value.value}"
                          for k in node.keywords if k.arg == "default" and literal(k.value)]
    return found


def test_knob_defaults_live_only_in_the_table():
    table = _table()
    assert table.default("alpha_iterations") == 20 and table.default("bab_time_limit") == 10.0
    offenders = [f for p in _core_files() for f in literal_knob_defaults(p, table.KNOBS)]
    assert not offenders, offenders


def test_the_defaults_check_finds_a_copied_default(tmp_path):
    src = tmp_path / "cli.py"
    src.write_text("def verify(alpha_iterations=20, *, bab_time_limit: float = 10.0): pass\n"
                   "class BabConfig:\n    lr: float = 0.1\nITERATIONS = 20\n"
                   "p.add_argument('--alpha-lr', type=float, default=0.1)\n")
    assert len(literal_knob_defaults(src, _table().KNOBS)) == 5


STATUS_NAMES = {"finished", "stopped", "failed", "running", "pending"}
OPTUNA_VERDICTS = {"COMPLETE", "PRUNED", "FAIL"}


def verdict_offenders(root: Path = ROOT) -> list[str]:
    """Places outside tuner/study/verdict.py that decide how a trial ended: a status name written out, Optuna's
    COMPLETE/PRUNED/FAIL produced (returned or assigned; comparing is reading), a 'diverged: ' reason built, epochs at target counted."""
    offenders = []
    for path in sorted((root / "tuner").rglob("*.py")):
        if path.name == "verdict.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in STATUS_NAMES:
                offenders.append(f"{path.name}:{node.lineno}: status name {node.value!r}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("diverged: "):
                offenders.append(f"{path.name}:{node.lineno}: a 'diverged: ' reason")
            if isinstance(node, ast.ClassDef) and node.name == "TargetEpochCounter":
                offenders.append(f"{path.name}:{node.lineno}: counts epochs at target")
            if isinstance(node, (ast.Return, ast.Assign, ast.AnnAssign)) and getattr(node, "value", None) is not None:
                compared = {id(n) for c in ast.walk(node.value) if isinstance(c, ast.Compare) for n in ast.walk(c)}
                for sub in ast.walk(node.value):
                    if (isinstance(sub, ast.Attribute) and id(sub) not in compared and isinstance(sub.value, ast.Name)
                            and sub.value.id == "TrialState" and sub.attr in OPTUNA_VERDICTS):
                        offenders.append(f"{path.name}:{node.lineno}: decides TrialState.{sub.attr}")
    return offenders


def test_only_verdict_decides_how_a_trial_ended():
    assert verdict_offenders() == []
    verdict = (ROOT / "tuner" / "study" / "verdict.py").read_text()
    assert "def trial_status" in verdict and "def optuna_verdict" in verdict and "class TargetEpochCounter" in verdict


def test_verdict_check_finds_a_second_decider(tmp_path):
    # The check really reads the modules: a copy of tuner/ with a searcher deciding on its own is caught.
    import shutil
    copy = tmp_path / "tuner"
    shutil.copytree(ROOT / "tuner", copy)
    with open(copy / "study" / "searcher.py", "a") as f:
        f.write("\n\ndef own_verdict(result):\n    return TrialState.PRUNED if result else 'failed'\n")
    offenders = verdict_offenders(tmp_path)
    assert any("TrialState.PRUNED" in o for o in offenders) and any("'failed'" in o for o in offenders)


# ---- the ReLU steps: one function per algorithm, no optional switches (trainers/backward.py) -------------
def _defaults(fn: ast.FunctionDef) -> dict[str, ast.expr]:
    args = fn.args.posonlyargs + fn.args.args
    pairs = zip(args[len(args) - len(fn.args.defaults):], fn.args.defaults)
    kw = ((a, d) for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is not None)
    return {a.arg: d for a, d in (*pairs, *kw)}


def _builds_a_step(fn: ast.FunctionDef) -> bool:
    return isinstance(fn.returns, ast.Name) and fn.returns.id == "ReluStep"


def step_switches(path: Path) -> list[str]:
    """Functions that serve several algorithms through optional switches: `alpha` and `beta` both defaulting
    to None (CROWN, α-CROWN and β-CROWN in one function), or a ReLU step builder (returns ReluStep) with
    any optional parameter: each step takes exactly what its algorithm needs."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        defaults = _defaults(fn)
        nones = {a for a, d in defaults.items() if isinstance(d, ast.Constant) and d.value is None}
        if {"alpha", "beta"} <= nones or (_builds_a_step(fn) and defaults):
            found.append(f"{path.name}:{fn.lineno} {fn.name}({', '.join(sorted(defaults))} optional)")
    return found


def test_each_relu_step_is_its_own_function_without_switches():
    files = sorted((ROOT / "trainers").glob("*.py"))
    assert not [f for p in files for f in step_switches(p)]
    builders = {fn.name for p in files for fn in ast.walk(ast.parse(p.read_text()))
                if isinstance(fn, ast.FunctionDef) and _builds_a_step(fn)}
    assert {"crown_step", "alpha_step", "beta_step", "keeping_incoming"} <= builders, builders


def test_the_steps_check_finds_an_optional_switch(tmp_path):
    src = tmp_path / "crown.py"
    src.write_text("def relaxed_step(bounds, alpha=None, beta=None, splits=None, seen=None) -> ReluStep: pass\n"
                   "def optimise(model, *, alpha: dict | None = None, beta=None): pass\n"
                   "def noting_step(step, incoming=None) -> ReluStep: pass\n"
                   "def alpha_step(bounds, alpha) -> ReluStep: pass\n")
    assert [f.split()[1].split("(")[0] for f in step_switches(src)] == ["relaxed_step", "optimise", "noting_step"]


# ---- one meaning for "record": the search's (tuner's SearchRecord); trainers/ names none --------------
def record_names(path: Path) -> list[str]:
    """Identifiers in a file (names, attributes, parameters, functions, classes) that say "record"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        name = (getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "arg", None)
                or (node.name if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None))
        if isinstance(name, str) and "record" in name.lower():
            found.append(f"{path.name}:{node.lineno} {name}")
    return found


def test_trainers_name_nothing_record():
    """The backward passes' per-layer facts are `Tape.facts` / `BatchNormAffine` (docs/decisions.md, "Facts
    per layer"); "record" is left to the search's record."""
    assert not [f for p in sorted((ROOT / "trainers").glob("*.py")) for f in record_names(p)]


def test_the_record_check_finds_a_record_name(tmp_path):
    src = tmp_path / "bounds.py"
    src.write_text("class BatchNormRecord: pass\ndef walk(records): tape.record(layer, 1)\n")
    assert len(record_names(src)) == 3
