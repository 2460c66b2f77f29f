"""Re-evaluation (tuner/study/reeval.py): the best points raced on more seeds, ranked by their mean.

Hand-computed statistics and plans first, then the ranking on a search read back from constructed trials, the
scheduler leaving re-evaluations alone, and a real small search on real MNIST whose report, export and Optuna
journal agree on every point's mean over seeds.
"""
import json
import math
from pathlib import Path

import pytest
import yaml

from trainers.config import ConfigError
from tuner.study.keys import CONFIG_OF
from tuner.space.record import SearchRecord, read_space_file
from tuner.study.reeval import ReevalPlan, Score, binomial_se, check_reeval, within_one_se
from tuner.results.experiment import Search, TrialResult, seed_notes, seed_summary


def test_score_by_hand():
    s = Score.of([0.1, 0.2, 0.3])
    # mean 0.2; sample variance (0.01 + 0 + 0.01) / 2 = 0.01; SE sqrt(0.01 / 3)
    assert s.mean == pytest.approx(0.2) and s.se == pytest.approx(math.sqrt(0.01 / 3)) and s.n == 3
    assert s.std == pytest.approx(0.1)
    one = Score.of([0.4])
    assert one.mean == 0.4 and math.isnan(one.se) and math.isnan(one.std) and one.text() == "0.4000 (1 seed)"
    assert Score.of([]).n == 0
    assert within_one_se(Score(0.20, 0.02, 3), Score(0.215, 0.01, 3))
    assert not within_one_se(Score(0.20, 0.02, 3), Score(0.25, 0.01, 3))
    assert not within_one_se(Score(0.20, math.nan, 1), Score(0.20, math.nan, 1))  # no SE: nothing to say
    assert binomial_se(0.2, 5000) == pytest.approx(math.sqrt(0.16 / 5000))  # 0.57 points


def test_plan_races_the_best_points_and_the_defaults():
    finals = {"a": (0.30, True), "b": (0.10, True), "c": (0.20, True), "d": (0.50, True)}
    params = {"a": {"lr": 1}, "b": {"lr": 2}, "c": {"lr": 3}, "d": {"lr": 4}}
    plan = ReevalPlan(top=2, seeds=2, num_samples=12, baseline={"lr": 4})
    assert plan.reserved == 6 and plan.main_trials == 6
    runs = plan.reruns(finals, params, "min")
    assert [(r.of, r.seed_offset) for r in runs] == [("b", 1), ("b", 2), ("c", 1), ("c", 2), ("d", 1), ("d", 2)]
    assert runs[0].params == {"lr": 2}
    # the baseline among the best is raced once and the reserve races the next point; infeasible points come
    # after feasible ones; mode max
    assert [r.of for r in ReevalPlan(2, 1, 9, {"lr": 2}).reruns(finals, params, "min")] == ["b", "c", "a"]
    assert [r.of for r in ReevalPlan(2, 1, 9, {"lr": 9}).reruns(finals, params, "min")] == ["b", "c", "a"]  # unfinished
    infeasible = {**finals, "b": (0.10, False)}
    assert [r.of for r in ReevalPlan(2, 1, 9).reruns(infeasible, params, "min")] == ["c", "a"]
    assert [r.of for r in ReevalPlan(1, 1, 9).reruns(finals, params, "max")] == ["d"]
    # under a budget the room kept follows the points that can be raced: S for each, at most K + 1 of them
    assert [plan.reserved_for(n) for n in (0, 1, 2, 3, 7)] == [0, 2, 4, 6, 6]
    assert ReevalPlan(2, 3, 20).reserved_for(5) == 6  # no defaults point: K points


@pytest.mark.parametrize("top, seeds, samples, match", [
    ("2", "0", 20, "go together"), ("-1", "2", 20, r"in \[0, 100\]"), ("x", "2", 20, "whole number"),
    ("3", "2", 9, "give --num-samples 11 or more"), ("101", "1", 500, r"in \[0, 100\]")])
def test_bad_reeval_flags_are_one_line(top, seeds, samples, match):
    with pytest.raises(ConfigError, match=match) as e:
        check_reeval(top, seeds, samples, first_points=2, has_baseline=True)
    assert "\n" not in str(e.value)
    assert check_reeval("0", "0", 1, 1, True) == (0, 0)


def search_of(values: dict[str, list[float]], order: list[str], defaults_point: str | None = None) -> Search:
    """A search read back from trials: `values[id]` = [own value, re-evaluations...] of objective ibp_err."""
    source, raw = read_space_file("mnist_tiny")
    record = SearchRecord(name="s", space_path=source, space=raw, objective=["ibp_err"], modes=["min"],
                          scheduler="asha", num_samples=20, max_concurrent=2, resources_per_trial={"cpu": 1},
                          data_dir="/data", reeval_top=2, reeval_seeds=2)
    trials, n = [], 0
    for point in order:
        params = raw["defaults"] if point == defaults_point else {**raw["defaults"], "lr": 1e-3 + n * 1e-5}
        for offset, v in enumerate(values[point]):
            tid = point if offset == 0 else f"{point}-r{offset}"
            trials.append(TrialResult(tid, "finished", dict(params), [{"epoch": 6, "epochs": 6, "ibp_err": v}],
                                      order=n, config_of=point, seed_offset=offset))
            n += 1
    return Search("s", Path("/nonexistent"), record, trials)


def test_points_rank_by_their_mean_and_more_seeds_first():
    # A won on one seed but loses on three; C was never raced: it ranks after both raced points.
    search = search_of({"A": [0.10, 0.30, 0.32], "B": [0.12, 0.13, 0.11], "C": [0.05]}, ["A", "B", "C"])
    assert [t.trial_id for t in search.ranked()] == ["B", "A", "C"]
    assert search.best().trial_id == "B" and len(search.reruns()) == 4
    assert search.score(search.best(), "ibp_err").mean == pytest.approx(0.12)
    summary = seed_summary(search)
    assert summary["seeds"] == 3 and summary["close_call"] is False and summary["runner_up"] == "A"


def test_close_call_validation_error_and_spread_are_said():
    search = search_of({"A": [0.20, 0.30, 0.10], "B": [0.21, 0.22, 0.20], "D": [0.40, 0.41, 0.40]},
                       ["D", "B", "A"], defaults_point="D")
    summary = seed_summary(search)
    assert summary["trial_id"] == "A" and summary["close_call"] is True  # 0.20 vs 0.21, A's SE 0.058
    assert summary["val_images"] == 500 and summary["val_se"] == pytest.approx(math.sqrt(0.2 * 0.8 / 500))
    assert summary["val_se_ok"] is False  # 1.8 points on 500 images
    assert summary["defaults_trial"] == "D" and summary["unstable"] is True  # std 0.1 against 0.0058
    notes = "\n".join(seed_notes(summary))
    assert "within one standard error" in notes and "UNSTABLE" in notes and "enlarge data.val_size" in notes


def test_the_scheduler_never_stops_a_reevaluation():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from tuner.run.schedulers import WarmupAwareASHA

    sched = WarmupAwareASHA(metric="ibp_err", mode="min", max_epochs_at_target=9)
    good, bad = Trial("t", stub=True), Trial("t", stub=True)
    rerun = Trial("t", stub=True, config={CONFIG_OF: "x", "seed_offset": 1})
    for t in (good, bad, rerun):
        sched.on_trial_add(None, t)
    row = {"epoch": 1, "epochs": 9, "at_target": True, "training_iteration": 1}
    assert sched.on_trial_result(None, good, {**row, "ibp_err": 0.1}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, bad, {**row, "ibp_err": 0.9}) == TrialScheduler.STOP
    assert sched.on_trial_result(None, rerun, {**row, "ibp_err": 0.9}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, rerun, {**row, "ibp_err": float("nan")}) == TrialScheduler.CONTINUE


def test_a_real_search_races_its_best_points_and_every_reader_agrees(data_dir, tmp_path, ray_shut_down_after):
    """mnist_tiny at fidelity epochs:4 of its 6-epoch target; 6 trials, of which the best point and the defaults
    are trained again with 2 more seeds each (the defaults among the best: only 2)."""
    import optuna

    import certtune
    from tuner.results.export import export_search
    from tuner.results.report import report_search
    from tuner.results.experiment import load_search
    from tuner.study.journal import load_search_study

    storage = tmp_path / "st"
    certtune.search("mnist_tiny", {"data.subset": 500, "data.val_size": 200}, name="race", num_samples=6,
                    max_concurrent=2, data_dir=str(data_dir), storage=str(storage), fidelity="epochs:4",
                    reeval_top=1, reeval_seeds=2, objective="clean_err", echo=False)
    search = load_search("race", str(storage))
    reruns = search.reruns()
    assert search.is_complete() and len(search.trials) == search.planned_trials() in (4, 6)
    # every trial ran at the fidelity; one the warmup-aware ASHA stopped lost at a rung (which trials do depends on the
    # order their results arrive in, so on the machine's load), and every re-evaluation ran its whole length
    assert all(t.last["epochs"] == 4 for t in search.trials)  # the fidelity, not 6
    assert all(t.status == "finished" or search.stop_rule(t) == "rung" for t in search.trials)
    assert reruns and all(t.status == "finished" for t in reruns)
    by_id = {t.trial_id: t for t in search.trials}
    best_single = min((t for t in search.points() if t.status == "finished"), key=lambda t: (t.value("clean_err"), t.order))
    assert {t.config_of for t in reruns} >= {best_single.trial_id}
    for t in reruns:
        assert t.params == by_id[t.config_of].params and t.seed_offset in (1, 2)
        trained = yaml.safe_load(next((storage / "race" / t.dirname).glob("checkpoint_*/config.yaml")).read_text())
        assert trained["seed"] == search.space().base_config.seed + t.seed_offset and trained["epochs"] == 4
    # the journal: one COMPLETE trial per seed, grouped by config_of; its means are the report's
    study = load_search_study(search.record, str(storage))
    groups: dict[str, list[float]] = {}
    for ot in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        groups.setdefault(ot.user_attrs[CONFIG_OF], []).append(ot.value)
    assert len(sum(groups.values(), [])) == sum(t.status == "finished" for t in search.trials)
    for point in search.ranked():
        assert Score.of(groups[point.trial_id]).mean == pytest.approx(search.score(point, "clean_err").mean)
    text = report_search("race", str(storage))
    assert "mean±se" in text and "re-evaluation: the best 1 points" in text and "fidelity: epochs:4" in text
    summary = export_search("race", str(storage), out=tmp_path / "export")
    best = search.best()
    assert summary["best"]["trial_id"] == best.trial_id and summary["seeds"]["seeds"] == 3
    assert summary["best"]["clean_err_mean"] == pytest.approx(search.score(best, "clean_err").mean)
    exported = (tmp_path / "export" / "best.yaml").read_text()
    assert "over seeds: clean_err" in exported and yaml.safe_load(exported)["epochs"] == 6  # the target run
    rows = (tmp_path / "export" / "trials.csv").read_text().splitlines()
    assert rows[0].split(",")[-7:-2] == ["config_of", "seed_offset", "clean_err_mean", "clean_err_se", "seeds"]
    assert len(rows) == 1 + len(search.trials)
    assert json.loads(json.dumps(summary, default=str))  # the CLI prints it as JSON


def test_a_budget_keeps_room_for_the_reevaluations(data_dir, tmp_path, ray_shut_down_after):
    """With --max-trial-epochs, the search's own points stop while the re-evaluations still fit: 2-epoch trials,
    a 14 trial-epoch budget and 2 reserved trials (the best point and the defaults, one more seed each), so the
    search explores until its spent and running epochs and the reserve reach 14, then races, and ends inside
    the budget with every re-evaluation finished (before, the budget ended the search before any)."""
    import certtune
    from tuner.results.experiment import load_search

    storage = tmp_path / "st"
    certtune.search("mnist_tiny", {"data.subset": 500, "data.val_size": 200}, name="fit", num_samples=40,
                    max_concurrent=2, data_dir=str(data_dir), storage=str(storage), fidelity="epochs:2",
                    scheduler="none", reeval_top=1, reeval_seeds=1, max_trial_epochs=14, objective="clean_err",
                    echo=False)
    search = load_search("fit", str(storage))
    reruns = search.reruns()
    assert reruns and all(t.status == "finished" and t.seed_offset == 1 for t in reruns)
    assert {t.config_of for t in reruns} >= {min(search.points(), key=lambda t: (t.value("clean_err"), t.order)).trial_id}
    assert search.trial_epochs() <= 14 and len(search.points()) >= 3  # it explored, then raced, within budget
    # its own trials ended early for the race: the search is complete with what it ran, not "interrupted" at 40
    assert search.is_complete() and len(search.trials) == search.planned_trials() < 40
