"""The trial-epoch budget (`--max-trial-epochs`) and the random sampler, in a real local Ray Tune run.

The trials are the service's own sleeping trainable (bench/search_overhead.py) so the budget arithmetic is
exact and fast; everything else (record, searcher, scheduler, checkpoints, stopper) is the real search.
"""
from __future__ import annotations

import json

import pytest
import ray

from bench.search_overhead import make_sleep_trainable
from tuner.budget import TrialEpochBudget, epochs_reported
from tuner.record import SearchError, read_record
from tuner.results import load_search, load_study
from tuner.search import build_tuner, prepare_search

SPACE = "search_spaces/mnist_tiny.yaml"
EPOCHS = 3


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_results(trial_dir, epochs):
    trial_dir.mkdir(parents=True)
    (trial_dir / "result.json").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in epochs))


def test_budget_counts_each_trials_furthest_epoch_once_and_starts_from_what_is_on_disk(tmp_path):
    write_results(tmp_path / "trial_a", [1, 2, 3])
    write_results(tmp_path / "trial_b", [1, 2, 1, 2])  # a retry replayed epochs 1-2: they count once
    (tmp_path / "trial_c").mkdir()  # started, nothing reported yet
    assert epochs_reported(tmp_path / "trial_b") == 2 and epochs_reported(tmp_path / "trial_c") == 0
    budget = TrialEpochBudget(8, tmp_path)
    assert budget.spent == 5 and not budget.stop_all()
    assert budget("b", {"epoch": 2}) is False and budget.spent == 5  # replay: nothing new
    budget("c", {"epoch": 1})
    budget("c", {"epoch": 2})
    assert budget.spent == 7 and not budget.stop_all()
    assert budget("d", {"epoch": 1}) is True and budget.stop_all()  # this result spends the budget
    # Pickled with the experiment: the counts are not frozen into the pickle but re-read on restore.
    restored = TrialEpochBudget.__new__(TrialEpochBudget)
    restored.__dict__.update(budget.__getstate__())
    assert restored.spent == 5


def search_record(tmp_path, data_dir, name, **kwargs):
    return prepare_search(SPACE, {}, name, kwargs.pop("num_samples", 10), 1, "cpu=1",
                          kwargs.pop("scheduler", "none"), "ibp_err", str(tmp_path / "results"), None, None,
                          str(data_dir), 5, **kwargs)


def test_search_stops_when_its_trial_epoch_budget_is_spent(local_ray, tmp_path, data_dir):
    # One trial at a time, 3 epochs each, budget 7: two full trials, then the third stops after epoch 1.
    record, storage = search_record(tmp_path, data_dir, "budget", max_trial_epochs=7)
    assert read_record(storage, "budget").max_trial_epochs == 7
    results = build_tuner(record, storage, trainable=make_sleep_trainable(EPOCHS, 0.01)).fit()
    epochs = sorted(r.metrics["epoch"] for r in results)
    search = load_search("budget", storage)
    assert epochs == [1, 3, 3] and search.trial_epochs() == 7
    assert search.is_complete()  # the budget is spent, although 7 of 10 samples never ran
    # The cut trial is never taken as finished: not by Optuna, not by the export.
    study = load_study(tmp_path / "results" / "budget")
    assert sorted(t.state.name for t in study.trials)[:2] == ["COMPLETE", "COMPLETE"]
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 2
    search = load_search("budget", str(tmp_path / "results"))
    assert search.counts()["finished"] == 2 and search.counts()["stopped"] == 1


def test_random_sampler_is_seeded_and_recorded(local_ray, tmp_path, data_dir):
    record, storage = search_record(tmp_path, data_dir, "random", num_samples=4, sampler="random")
    assert read_record(storage, "random").sampler == "random"
    build_tuner(record, storage, trainable=make_sleep_trainable(EPOCHS, 0.01)).fit()
    study = load_study(tmp_path / "results" / "random")
    assert read_record(storage, "random").sampler == "random"  # the study's storage keeps no sampler
    assert len(study.trials) == 4
    # The space's defaults are the first point, then seeded random draws: a second search repeats them.
    again, storage2 = search_record(tmp_path, data_dir, "random2", num_samples=4, sampler="random")
    build_tuner(again, storage2, trainable=make_sleep_trainable(EPOCHS, 0.01)).fit()
    params = [t.params for t in study.trials]
    assert params == [t.params for t in load_study(tmp_path / "results" / "random2").trials]
    assert params[0]["lr"] == 1.0e-3 and len({p["lr"] for p in params}) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"sampler": "grid"}, "--sampler: 'grid' is not one of tpe, random"),
    ({"max_trial_epochs": "0"}, "--max-trial-epochs"),
    ({"max_trial_epochs": "many"}, "--max-trial-epochs"),
])
def test_bad_sampler_or_budget_is_refused_before_anything_runs(tmp_path, data_dir, kwargs, message):
    with pytest.raises(SearchError, match=message):
        search_record(tmp_path, data_dir, "bad", **kwargs)
    assert not (tmp_path / "results" / "bad").exists()
