"""Search-space files: loading, validation errors, sampling with real Optuna samplers, Ray's OptunaSearch."""
from __future__ import annotations

import copy
import pickle
from pathlib import Path

import optuna
import pytest
import yaml

from trainers.config import TrainConfig
from tuner.space.search_space import SPACES_DIR, Expr, ExprError, SpaceError, load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHIPPED = ["mnist_eps0.4", "cifar10_eps8", "cifar10_eps2", "tinyimagenet_eps1", "mnist_tiny", "mnist_small_budget",
           "mnist_methods", "mnist_short_warmup"]
# each method's own knobs (docs/methods.md), searched only when it runs
METHOD_KNOBS = {"sabr.": ("sabr", "staps"), "expressive.": ("mtl-ibp", "cc-ibp", "exp-ibp"), "taps.": ("taps", "staps")}
N_TRIALS = 200


# ---- shipped spaces -----------------------------------------------------------------------------
def test_shipped_spaces_load():
    found = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
    assert set(SHIPPED) <= set(found)
    for name in found:
        space = load_space(SPACES_DIR / f"{name}.yaml")
        assert space.name == name and space.searched_names() and space.default_point()
    assert load_space("cifar10_eps8").name == "cifar10_eps8"  # bare names resolve to search_spaces/


def paper(**over) -> dict:
    """A resolved paper config: the common recipe (Adam 5e-4, x0.2 decays, clip 10, smoothed ramp,
    IBP init, both regularizers, lambda0 = tau = 0.5, full BN) with the setting's values."""
    raw = dict(method="fast", model="cnn7", lr=5e-4, optimizer="adam", lr_decay=0.2, grad_clip=10.0,
               bn="full", init="ibp", train_eps_mul=1.0, grad_accum=1,
               reg=dict(tightness=True, relu=True, std=False, lambda0=0.5, tau=0.5),
               schedule=dict(kind="smoothed", mid=0.25, beta=4.0))
    for key, value in over.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return TrainConfig.from_dict(raw).resolve().to_dict()


PAPER = {
    "mnist_eps0.4": paper(dataset="mnist", eps=0.4, epochs=70, batch_size=256, lr_milestones=[50, 60],
                          schedule=dict(start=1, length=20)),
    "cifar10_eps8": paper(dataset="cifar10", eps=8 / 255, epochs=160, batch_size=128,
                          lr_milestones=[120, 140], schedule=dict(start=2, length=80)),
    "cifar10_eps2": paper(dataset="cifar10", eps=2 / 255, epochs=160, batch_size=128,
                          lr_milestones=[120, 140], schedule=dict(start=2, length=80)),
    "tinyimagenet_eps1": paper(dataset="tinyimagenet", eps=1 / 255, epochs=80, batch_size=128, grad_accum=2,
                               lr_milestones=[60, 70], schedule=dict(start=2, length=20),
                               reg=dict(lambda0=0.2)),
    # bench/shorter_warmup.py's first trial: the MNIST recipe with every epoch count halved, on its trials' subset
    "mnist_short_warmup": paper(dataset="mnist", model="cnn_small", eps=0.4, epochs=35, batch_size=256,
                                lr_milestones=[25, 30], schedule=dict(start=1, length=10),
                                data=dict(subset=0, val_size=5000), eval=dict(metrics=["clean", "ibp"],
                                                                                  batch_size=1000)),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_default_point_is_the_paper_config(name):
    space = load_space(name)
    assert space.to_train_config(space.default_point()).to_dict() == PAPER[name]


def test_mnist_tiny_is_cpu_sized():
    cfg = load_space("mnist_tiny").to_train_config(load_space("mnist_tiny").default_point())
    assert (cfg.model, cfg.epochs, cfg.data.subset, cfg.data.val_size, cfg.eval.metrics) == \
        ("cnn_small", 6, 2000, 500, ["clean", "ibp"])
    assert cfg.schedule.start + cfg.schedule.length - 1 < cfg.epochs


def fake_objective(params: dict) -> float:
    """Any finite value that depends on the point, so TPE leaves its random start-up phase."""
    return sum(float(v) for v in params.values() if isinstance(v, (int, float))) % 7.0


def expected_milestones(params: dict, cfg: TrainConfig, gap_default: float | None) -> list[int]:
    m1 = round(params["_milestone_frac"] * cfg.epochs)
    gap = params.get("_milestone_gap", gap_default)
    return [m1, m1 + max(1, round(gap * (cfg.epochs - m1)))]


@pytest.mark.parametrize("sampler", ["tpe", "random"])
@pytest.mark.parametrize("name", SHIPPED)
def test_sampled_points_give_valid_configs(name, sampler):
    space = load_space(name)
    base = space.base_config.resolve()
    make = {"tpe": lambda: optuna.samplers.TPESampler(seed=1, n_startup_trials=10),
            "random": lambda: optuna.samplers.RandomSampler(seed=2)}[sampler]
    study = optuna.create_study(sampler=make())
    study.enqueue_trial(space.default_point())
    seen = {"lambda0": 0, "no_lambda0": 0, "mid": 0, "no_mid": 0}
    for i in range(N_TRIALS // (2 if sampler == "tpe" else 1)):
        trial = study.ask()
        assert space.define_by_run(trial) is None
        params = trial.params  # what Ray's OptunaSearch captures as the trial config
        if i == 0:
            assert params == space.default_point()
        cfg = space.to_train_config(params)
        s = cfg.schedule
        assert s.start + s.length - 1 <= cfg.epochs
        if name in PAPER:  # paper spaces: the ramp ends before the first LR decay
            assert s.start + s.length - 1 < cfg.lr_milestones[0]
        assert cfg.lr_milestones == expected_milestones(params, cfg, 0.5)
        assert all(1 <= m <= cfg.epochs for m in cfg.lr_milestones)
        assert cfg.batch_size % cfg.grad_accum == 0
        # conditionals: lambda0/tau only when a regularizer is on, mid only for the smoothed schedule
        method = params.get("method", base.method)
        fast = method not in ("vanilla", "crown-ibp")  # fast and the newer methods take init/regs
        reg_on = fast and (cfg.reg.tightness or cfg.reg.relu)
        assert ("reg.lambda0" in params) == reg_on
        seen["lambda0" if reg_on else "no_lambda0"] += 1
        if not reg_on:
            assert cfg.reg.lambda0 == base.reg.lambda0 and "reg.tau" not in params
        if not fast:
            assert not {"init", "reg.tightness", "reg.relu"} & set(params)
            assert (cfg.init, cfg.reg.tightness, cfg.reg.relu) == ("default", False, False)
        for prefix, methods in METHOD_KNOBS.items():
            searched = [k for k in space.params if k.startswith(prefix)]
            assert all((k in params) == (method in methods) for k in searched), (method, params)
            if searched:
                seen[f"{prefix} on" if method in methods else f"{prefix} off"] = 1
        assert cfg.method == method
        smoothed = cfg.schedule.kind == "smoothed"
        assert ("schedule.mid" in params) == smoothed
        seen["mid" if smoothed else "no_mid"] += 1
        if not smoothed:
            assert cfg.schedule.mid == base.schedule.mid
        # the searched fields land in the config under their dotted names
        for key, value in params.items():
            if not key.startswith("_"):
                section, _, leaf = key.rpartition(".")
                assert getattr(getattr(cfg, section) if section else cfg, leaf) == value
        study.tell(trial, fake_objective(params))
    # both sides of each condition were explored, where the space searches what it depends on
    if not {"method", "reg.tightness", "reg.relu"} & set(space.params):
        base_reg_on = base.method not in ("vanilla", "crown-ibp") and (base.reg.tightness or base.reg.relu)
        seen.pop("no_lambda0" if base_reg_on else "lambda0")
    if "schedule.kind" not in space.params:
        seen.pop("no_mid" if base.schedule.kind == "smoothed" else "mid")
    assert all(seen.values()), seen
    for prefix in METHOD_KNOBS:
        if any(k.startswith(prefix) for k in space.params):
            assert f"{prefix} on" in seen and f"{prefix} off" in seen, seen


def test_mnist_methods_seeds_each_method_with_its_paper_settings():
    """The defaults (fast) and one seed per other method are Ray's first trials, in file order."""
    from ray.tune.search.optuna import OptunaSearch

    space = load_space("mnist_methods")
    seeds = space.start_points()
    search = OptunaSearch(space=space.define_by_run, metric="ibp_err", mode="min", points_to_evaluate=seeds,
                          sampler=optuna.samplers.TPESampler(seed=0))
    configs = []
    for i, seed in enumerate(seeds):
        config = search.suggest(f"t{i}")
        assert config == seed
        configs.append(space.to_train_config(config))
        search.on_trial_complete(f"t{i}", {"ibp_err": 0.5})
    assert [c.method for c in configs] == ["fast", "vanilla", "crown-ibp", "sabr", "mtl-ibp", "cc-ibp", "exp-ibp",
                                           "taps", "staps"]
    by = {c.method: c for c in configs}
    assert (by["sabr"].sabr.ratio, by["staps"].sabr.ratio, by["staps"].taps.gradient_scale) == (0.6, 0.6, 4.0)
    assert (by["mtl-ibp"].expressive.alpha, by["mtl-ibp"].expressive.pgd_steps) == (0.5, 1)
    assert by["sabr"].init == "ibp" and by["sabr"].reg.relu and by["vanilla"].init == "default"
    shared = {"lr", "batch_size", "epochs", "lr_milestones", "schedule", "grad_clip", "train_eps_mul"}
    assert all({k: c.to_dict()[k] for k in shared} == {k: configs[0].to_dict()[k] for k in shared} for c in configs)
    assert set(search.suggest("t_next")) <= set(space.searched_names())  # then TPE proposes


def test_dynamic_bounds_follow_other_params():
    space = load_space("mnist_tiny")  # schedule.length high = epochs - schedule.start
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    highs = set()
    for _ in range(60):
        trial = study.ask()
        space.define_by_run(trial)
        highs.add(trial.distributions["schedule.length"].high)
        assert trial.params["schedule.start"] + trial.params["schedule.length"] <= 6
        study.tell(trial, 0.0)
    assert highs == {5, 4}
    with pytest.raises(SpaceError, match=r"mnist_tiny.yaml: param 'schedule.length': 5 is outside \[1, 4\]"):
        space.to_train_config({**space.default_point(), "schedule.start": 2, "schedule.length": 5})


def test_ray_optuna_search_gives_sampled_params_under_their_names():
    from ray.tune.search.optuna import OptunaSearch

    space = load_space("cifar10_eps8")
    search = OptunaSearch(space=space.define_by_run, metric="ibp_err", mode="min",
                          points_to_evaluate=[space.default_point()],
                          sampler=optuna.samplers.TPESampler(seed=0))
    first = search.suggest("t0")
    assert first == space.default_point()
    assert space.to_train_config(first).to_dict() == PAPER["cifar10_eps8"]
    second = search.suggest("t1")
    assert set(second) <= set(space.searched_names()) and "lr" in second and "schedule.length" in second
    space.to_train_config(second)
    search.on_trial_complete("t0", {"ibp_err": 0.7})


def test_to_train_config_ignores_inactive_and_rejects_unknown():
    space = load_space("cifar10_eps8")
    point = {**space.default_point(), "schedule.kind": "linear"}
    del point["schedule.mid"], point["schedule.beta"]
    cfg = space.to_train_config({**point, "schedule.mid": 0.9})  # inactive: ignored, base kept
    assert (cfg.schedule.kind, cfg.schedule.mid) == ("linear", 0.25)
    with pytest.raises(SpaceError, match="param 'lrr': not in this space"):
        space.to_train_config({**point, "lrr": 1e-3})
    with pytest.raises(SpaceError, match="param 'schedule.mid': active at this point but has no value"):
        space.to_train_config({**point, "schedule.kind": "smoothed"})
    pickled = pickle.loads(pickle.dumps(SpaceError("f.yaml", "param 'lr'", "bad")))
    assert str(pickled) == "f.yaml: param 'lr': bad"


# ---- validation errors --------------------------------------------------------------------------
VALID = {
    "base": {"dataset": "mnist", "model": "cnn_small", "eps": 0.1, "epochs": 8,
             "data": {"subset": 3000, "val_size": 1000}},
    "params": {
        "lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3},
        "schedule.length": {"type": "int", "low": 1, "high": 5},
        "schedule.kind": {"type": "categorical", "choices": ["smoothed", "linear"]},
        "schedule.mid": {"type": "uniform", "low": 0.1, "high": 0.6, "when": {"schedule.kind": "smoothed"}},
        "reg.relu": {"type": "categorical", "choices": [True, False]},
        "reg.lambda0": {"type": "loguniform", "low": 0.05, "high": 2.0, "when": {"reg.relu": True}},
        "_milestone_frac": {"type": "uniform", "low": 0.6, "high": 0.9},
    },
    "derived": {"lr_milestones":
                "[round(_milestone_frac * epochs), round(min(0.95, _milestone_frac + 0.1) * epochs)]"},
    "defaults": {"lr": 5e-4, "schedule.length": 3, "schedule.kind": "smoothed", "schedule.mid": 0.25,
                 "reg.relu": True, "reg.lambda0": 0.5, "_milestone_frac": 0.7},
}


def write(tmp_path: Path, raw: dict, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_the_example_space_loads(tmp_path):
    space = load_space(write(tmp_path, VALID, "example.yaml"))
    assert space.to_train_config(space.default_point()).lr_milestones == [6, 6]
    assert space.order.index("schedule.kind") < space.order.index("schedule.mid")


def _set(path: str, value):
    """A mutation that sets a nested key ('params/lr/low') of the valid space."""
    def apply(raw):
        *parents, leaf = path.split("/")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return apply


DELETE = object()

BAD = [  # (mutations, the param or place named, the problem named)
    ([_set("parms", {})], "section 'parms'", "unknown section"),
    ([_set("params/schedule.lenght", {"type": "int", "low": 1, "high": 2})], "schedule.lenght", "unknown name"),
    ([_set("params/lr/type", "logunif")], "'lr'", "unknown type 'logunif'"),
    ([_set("params/schedule.length/low", 6)], "'schedule.length'", "low 6 > high 5"),
    ([_set("params/lr/low", 0)], "'lr'", "low must be > 0 for loguniform"),
    ([_set("params/schedule.kind/choices", [])], "'schedule.kind'", "non-empty list 'choices'"),
    ([_set("params/schedule.mid/when", {"schedule.kindd": "smoothed"})], "'schedule.mid'",
     "'schedule.kindd', which is not in params"),
    ([_set("params/schedule.mid/when", {"schedule.kind": "smooth"})], "'schedule.mid'", "can never be 'smooth'"),
    ([_set("derived/lr_milestone", "[1]")], "derived 'lr_milestone'", "not a TrainConfig dotted key"),
    ([_set("derived/lr_milestones", "__import__('os').system('true')")], "derived 'lr_milestones'",
     "not allowed"),
    ([_set("derived/lr_milestones", "[x for x in _milestone_frac]")], "derived 'lr_milestones'", "not allowed"),
    ([_set("derived/lr_milestones", "[round(_milestone * epochs)]")], "derived 'lr_milestones'",
     "unknown name '_milestone'"),
    ([_set("derived/schedule.length", "3")], "derived 'schedule.length'", "also a searched param"),
    ([_set("params/_h", {"type": "uniform", "low": 0, "high": 1, "when": {"reg.relu": True}}),
      _set("derived/eps", "_h * 0.1")], "derived 'eps'", "conditional helper"),
    ([_set("defaults/lrr", 1e-3)], "defaults 'lrr'", "not a searched param"),
    ([_set("defaults/lr", 1.0)], "defaults 'lr'", "outside [0.0001, 0.003]"),
    ([_set("defaults/lr", DELETE)], "defaults 'lr'", "missing"),
    ([_set("defaults/reg.relu", False)], "defaults 'reg.lambda0'", "inactive at the defaults"),
    ([_set("base/epochs", 4), _set("defaults/schedule.length", 5)], "defaults",
     "schedule.length: the ramp (start 1 + length 5 - 1 = epoch 5) must end by the last epoch (4)"),
    ([_set("params/schedule.length/high", 9)], "high corner", "schedule.length: the ramp"),
    ([_set("params/epochs", {"type": "uniform", "low": 4, "high": 8})], "'epochs'", "integer field"),
    ([_set("params/method", {"type": "categorical", "choices": ["fast", "fastt"]}), _set("defaults/method", "fast")],
     "param 'method' choice 'fastt'", "method: unknown value 'fastt'"),
    ([_set("params/schedule.kind/when", {"schedule.mid": 0.25})], "param 'schedule.kind'", "circular"),
    ([_set("params/schedule.length/high", "epochs - _milestone")], "'schedule.length'",
     "unknown name '_milestone'"),
    ([_set("params/lr/log", True)], "'lr'", "unknown key 'log' for type loguniform"),
    ([_set("base/epochz", 3)], "base", "unknown config key 'epochz'"),
    ([_set("seeds", {"lr": 1e-3})], "seeds", "expected a list of mappings"),
    ([_set("seeds", [{"lr": 1.0}])], "seeds[0]: param 'lr'", "outside [0.0001, 0.003]"),
    ([_set("seeds", [{"lrr": 1e-3}])], "seeds[0] 'lrr'", "not a searched param"),
    ([_set("seeds", [{"lr": 1e-3}]), _set("defaults", DELETE)], "seeds", "give a defaults section"),
    ([_set("seeds", [{"schedule.length": 5}]), _set("base/epochs", 4), _set("params/schedule.length/high", 3)],
     "seeds[0]", "5 is outside [1, 3]"),
    ([_set("starts", [{"lrr": 1e-3}])], "starts[0] 'lrr'", "not a searched param"),
    ([_set("starts", [{"lr": 1e-3}]), _set("defaults", DELETE)], "starts", "give a defaults section"),
    ([_set("starts", [{"lr": 1e-3}]), _set("seeds", [{"lr": 2e-3}])], "seeds", "former name of 'starts'"),
]


@pytest.mark.parametrize("mutations, where, problem", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_space_raises_one_line_error(tmp_path, mutations, where, problem):
    raw = copy.deepcopy(VALID)
    for mutate in mutations:
        mutate(raw)
    with pytest.raises(SpaceError) as info:
        load_space(write(tmp_path, raw))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "bad.yaml") + ": ")
    assert where in msg and problem in msg, msg


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    text = write(tmp_path, VALID).read_text().replace("0.0001", "1e-4")
    assert "1e-4" in text
    (tmp_path / "e.yaml").write_text(text)
    assert load_space(tmp_path / "e.yaml").params["lr"].low == 1e-4


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpaceError, match="not found"):
        load_space(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("params: [unclosed\n  - 1")
    with pytest.raises(SpaceError, match="not valid YAML") as info:
        load_space(tmp_path / "x.yaml")
    assert "\n" not in str(info.value)


# ---- the expression evaluator -------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [
    ("[round(0.75 * epochs), epochs - 10]", [120, 150]),
    ("schedule.length + 1", 81),
    ("max(1, min(epochs // 3, 7)) ** 2", 49),
    ("-epochs / 2 if schedule.start < 2 <= epochs else 0.5", 0.5),
    ("abs(int(-2.7)) + float(1) + 7 % 4", 6.0),
])
def test_expressions_evaluate(text, value):
    assert Expr.parse(text).evaluate({"epochs": 160, "schedule.length": 80, "schedule.start": 2}) == value


@pytest.mark.parametrize("text", [
    "__import__('os')", "().__class__", "open('f')", "(lambda: 1)()", "epochs[0]", "'a' * 3",
    "round(epochs, ndigits=1)", "x.y()", "[*epochs]", "epochs and 1", "{1: 2}", "max(*epochs)",
])
def test_expressions_reject_other_constructs(text):
    with pytest.raises(ExprError):
        Expr.parse(text)


def test_expression_runtime_errors_are_expr_errors():
    for text in ("2 ** 1000", "1 / epochs", "nope + 1"):
        with pytest.raises(ExprError):
            Expr.parse(text).evaluate({"epochs": 0})


def test_starts_is_the_section_and_seeds_its_former_name(tmp_path, capsys):
    # `starts:` holds starting points; a file that still says `seeds:` gives the same space and one note.
    raw = copy.deepcopy(VALID)
    raw["starts"] = [{"lr": 1e-3}]
    new = load_space(write(tmp_path, raw, "new.yaml"))
    assert capsys.readouterr().err == ""
    raw["seeds"] = raw.pop("starts")
    old = load_space(write(tmp_path, raw, "old.yaml"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "section 'seeds:' is now 'starts:'" in err and "old.yaml" in err
    assert old.start_points() == new.start_points() and len(new.start_points()) == 2


def test_spaces_are_built_only_by_the_space_module_and_the_record():
    # A space is parsed and validated in tuner/space/search_space.py, and built from a search's record only by
    # tuner/space/record.py (read_space_file, build_space: cached, once per process); every other module is handed
    # a SearchSpace, so no reader builds its own.
    import ast

    builders = ("from_dict", "load_space", "parse_space_yaml", "_Builder")
    root = Path(__file__).resolve().parents[1]
    found = {}
    for path in sorted((root / "tuner").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                owner = getattr(getattr(node.func, "value", None), "id", "")
                if name in builders and (name != "from_dict" or owner == "SearchSpace"):
                    found.setdefault(path.name, []).append(name)
    assert set(found) == {"search_space.py", "record.py"}, found
    assert sorted(found["record.py"]) == ["from_dict", "load_space", "parse_space_yaml"]
