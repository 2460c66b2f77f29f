"""`--constraint METRIC<=X` / `>=X`: parsed and checked before Ray, set on each Optuna trial for TPE, shown by
`report`, honoured by `export`. One real search (real MNIST subset, real trials on a local Ray instance, real
Optuna) runs once for the module; the export rule is then checked under other constraints on the same trials
(by rewriting the search record, as a user with other limits would read the same search).
"""
from __future__ import annotations

import csv
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from raycluster import own_ray

from tuner.space.constraints import Constraint, parse_constraint, satisfied
from tuner.results.export import export_search
from tuner.space.record import SearchError, read_record, write_record
from tuner.results.report import report_search
from tuner.results.experiment import load_search, load_study
from tuner.run.driver import build_tuner, prepare_search

REPO = Path(__file__).resolve().parents[1]
SPACE = "search_spaces/mnist_tiny.yaml"
TINY = {"eps": 0.02, "data.subset": 256, "data.val_size": 100, "epochs": 4}
CONSTRAINTS = ["clean_err<=0.5", "ibp_err>=0"]


@pytest.mark.parametrize("text, expected", [
    ("clean_err<=0.35", Constraint("clean_err", "<=", 0.35)),
    (" ibp_err >= 1e-2 ", Constraint("ibp_err", ">=", 0.01)),
    ("train_seconds<=60", Constraint("train_seconds", "<=", 60.0)),
])
def test_constraint_syntax_and_violation(text, expected):
    c = parse_constraint(text)
    assert c == expected
    assert c.violation({c.metric: c.bound}) == 0 and satisfied([c], {c.metric: c.bound})
    worse = c.bound + 1 if c.op == "<=" else c.bound - 1
    assert c.violation({c.metric: worse}) == 1 and not satisfied([c], {c.metric: worse})
    assert c.violation({}) == math.inf and c.violation({c.metric: math.nan}) == math.inf


@pytest.mark.parametrize("constraints, message", [
    (["clean_err<0.3"], "--constraint: expected METRIC<=BOUND or METRIC>=BOUND"),
    (["clean_err"], "--constraint: expected METRIC<=BOUND"),
    (["accuracy>=0.9"], "unknown metric 'accuracy'"),
    (["clean_err<=abc"], "the bound must be a finite number"),
    (["clean_err<=nan"], "the bound must be a finite number"),
    (["pgd_err<=0.5"], "pgd_err needs 'pgd' in eval.metrics"),
    (["clean_err<=0.3", "clean_err <= 0.3"], "a constraint is repeated"),
])
def test_bad_constraints_are_refused_before_anything_runs(tmp_path, data_dir, constraints, message):
    with pytest.raises(SearchError, match=message):
        prepare_search(SPACE, {}, "bad", 2, 1, "cpu=1", "none", "ibp_err", str(tmp_path / "results"), None, None,
                       str(data_dir), 0, constraints=constraints)
    assert not (tmp_path / "results").exists()


def test_cli_bad_constraint_is_one_line_and_exit_2(tmp_path, data_dir):
    proc = subprocess.run([sys.executable, "-m", "tuner.cli", "search", "mnist_tiny", "--constraint", "clean_err<=0.3",
                           "--constraint", "clean_err=<0.3", "--storage", str(tmp_path / "r"), "--data-dir",
                           str(data_dir), "--name", "x"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--constraint: expected METRIC<=BOUND" in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def searched(tmp_path_factory, data_dir):
    storage = str(tmp_path_factory.mktemp("constraints") / "results")
    record, storage = prepare_search(SPACE, TINY, "constrained", 3, 2, "cpu=1", "none", "ibp_err", storage, None,
                                     None, str(data_dir), 3, max_trial_seconds="1000",
                                     constraints=[" clean_err <= 0.5", "ibp_err>=0"])
    with own_ray():
        build_tuner(record, storage).fit()
    return record, storage


def test_constraints_are_recorded_and_passed_to_tpe(searched):
    record, storage = searched
    assert read_record(storage, "constrained").constraints == CONSTRAINTS  # canonical form
    study = load_study(Path(storage) / "constrained")
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    search = load_search("constrained", storage)
    last = {t.trial_id: t.last for t in search.trials}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    for t in complete:  # each violation, from the trial's final result, is what TPE reads (FrozenTrial.constraints)
        final = last[t.user_attrs["ray_trial_id"]]
        assert t.constraints == pytest.approx({"clean_err<=0.5": final["clean_err"] - 0.5,
                                               "ibp_err>=0": 0 - final["ibp_err"]})


def test_report_shows_both_budgets_and_which_trials_satisfy(searched):
    record, storage = searched
    search = load_search("constrained", storage)
    text = report_search("constrained", storage)
    assert f"budget: 12 trial-epochs, {search.device_seconds():.4g} of 1000 CPU-seconds" in text
    feasible = [t for t in search.trials if search.feasible(t)]
    assert f"constraints: clean_err<=0.5, ibp_err>=0; {len(feasible)} of 3 finished trials satisfy all" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("rank"))
    assert header.split()[:6] == ["rank", "trial_id", "status", "ibp_err", "clean_err", "epochs"]
    assert header.split()[6] == "ok"
    for t in search.trials:
        row = next(line for line in lines if f" {t.trial_id} " in line).split()
        assert row[6] == ("yes" if t.last["clean_err"] <= 0.5 else "no")


def rewrite_constraints(record, storage, constraints):
    write_record(dataclasses.replace(record, constraints=constraints), storage)


def test_export_picks_the_best_trial_satisfying_every_constraint(searched, tmp_path):
    record, storage = searched
    unconstrained = dataclasses.replace(record, constraints=[])
    rewrite_constraints(unconstrained, storage, [])
    search = load_search("constrained", storage)
    ranked = search.ranked()
    best = ranked[0]
    # A bound on clean_err that the objective's best trial misses and another finished trial meets.
    other = next(t for t in ranked[1:] if t.last["clean_err"] != best.last["clean_err"])
    op = "<=" if other.last["clean_err"] < best.last["clean_err"] else ">="
    limit = f"clean_err{op}{other.last['clean_err']!r}"
    try:
        rewrite_constraints(record, storage, [limit])
        constrained = load_search("constrained", storage)
        ok = [t for t in ranked if constrained.feasible(t)]
        assert other in ok and best not in ok
        summary = export_search("constrained", storage, tmp_path / "out", top_k=2)
        assert summary["best"]["trial_id"] == ok[0].trial_id  # the best feasible one, by the same tie-break
        assert "satisfying every constraint" in summary["constraints"]
        head = (tmp_path / "out" / "best.yaml").read_text().splitlines()[:4]
        assert any(f"# constraints {parse_constraint(limit)}: all satisfied" == line for line in head), head
        rows = {r["trial_id"]: r for r in csv.DictReader((tmp_path / "out" / "trials.csv").open())}
        assert {i for i, r in rows.items() if r["constraints_ok"] == "true"} == {t.trial_id for t in ok}

        rewrite_constraints(record, storage, ["clean_err<=0"])  # no trial can meet it
        summary = export_search("constrained", storage, tmp_path / "none", top_k=1)
        assert summary["best"]["trial_id"] == best.trial_id  # the unconstrained best, said so
        assert summary["constraints"].startswith("no finished trial satisfies every constraint (clean_err<=0)")
        assert "NOT all satisfied" in (tmp_path / "none" / "best.yaml").read_text()
    finally:
        rewrite_constraints(record, storage, CONSTRAINTS)
