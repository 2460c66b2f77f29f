"""The budgets (`--max-trial-epochs`, `--max-trial-seconds`) and the random sampler, in a real local Ray Tune run.

The trials are the service's own sleeping trainable (bench/search_overhead.py) so the budget arithmetic is
exact and fast; everything else (record, searcher, scheduler, checkpoints, stopper) is the real search.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
from raycluster import own_ray

from bench.search_overhead import make_sleep_trainable
from ray import tune

from tuner.run.budget import SearchBudget, TrialEpochBudget, epochs_reported
from tuner.space.record import SearchError, read_record
from tuner.results.experiment import load_search, load_study
from tuner.run.driver import build_tuner, prepare_search

SPACE = "search_spaces/mnist_tiny.yaml"
EPOCHS = 3


@pytest.fixture(scope="module")
def local_ray():
    with own_ray():
        yield


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
    return prepare_search(SPACE, {}, name, kwargs.pop("num_samples", 10), 1, kwargs.pop("resources", "cpu=1"),
                          kwargs.pop("scheduler", "none"), "ibp_err", str(tmp_path / "results"), None, None,
                          str(data_dir), 5, **kwargs)


def test_search_stops_when_its_trial_epoch_budget_is_spent(local_ray, tmp_path, data_dir):
    # One trial at a time, 3 epochs each, budget 7: two full trials, then the third stops after epoch 1.
    record, storage = search_record(tmp_path, data_dir, "budget", max_trial_epochs=7)
    assert read_record(storage, "budget").max_trial_epochs == 7
    results = build_tuner(record, storage, trainable=make_sleep_trainable(EPOCHS, 0.01, record.checkpoint_every_s)).fit()
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
    assert [search.stop_rule(t) for t in search.trials if t.status == "stopped"] == ["budget"]


def test_random_sampler_is_seeded_and_recorded(local_ray, tmp_path, data_dir):
    record, storage = search_record(tmp_path, data_dir, "random", num_samples=4, sampler="random")
    assert read_record(storage, "random").sampler == "random"
    build_tuner(record, storage, trainable=make_sleep_trainable(EPOCHS, 0.01, record.checkpoint_every_s)).fit()
    study = load_study(tmp_path / "results" / "random")
    assert read_record(storage, "random").sampler == "random"  # the study's storage keeps no sampler
    assert len(study.trials) == 4
    # The space's defaults are the first point, then seeded random draws: a second search repeats them.
    again, storage2 = search_record(tmp_path, data_dir, "random2", num_samples=4, sampler="random")
    build_tuner(again, storage2, trainable=make_sleep_trainable(EPOCHS, 0.01, record.checkpoint_every_s)).fit()
    params = [t.params for t in study.trials]
    assert params == [t.params for t in load_study(tmp_path / "results" / "random2").trials]
    assert params[0]["lr"] == 1.0e-3 and len({p["lr"] for p in params}) == 4


def test_seconds_budget_weights_each_trials_seconds_by_its_cpus(local_ray, tmp_path, data_dir):
    # The sleeping trial reports train_seconds = epoch * 0.25 exactly. On cpu=2 a 3-epoch trial spends
    # 1.5 CPU-seconds; budget 2.4: the second trial stops after epoch 2 (1.5 + 2 * 0.5 = 2.5 >= 2.4).
    # Unweighted it would have run a second full trial and part of a third.
    record, storage = search_record(tmp_path, data_dir, "seconds", max_trial_seconds="2.4", resources="cpu=2")
    assert record.max_trial_seconds == 2.4 and record.seconds_device == "cpu"
    assert read_record(storage, "seconds").seconds_weight() == ("cpu", 2.0)
    results = build_tuner(record, storage, trainable=make_sleep_trainable(EPOCHS, 0.25, record.checkpoint_every_s)).fit()
    assert sorted(r.metrics["epoch"] for r in results) == [2, 3]
    search = load_search("seconds", storage)
    assert search.device_seconds() == pytest.approx(2.5) and search.trial_epochs() == 5
    assert search.is_complete() and search.counts()["finished"] == 1 and search.counts()["stopped"] == 1
    assert search.budget_text() == "5 trial-epochs, 2.5 of 2.4 CPU-seconds (largest trial 62% of it, no cap)"


def test_gpu_trials_count_gpu_seconds():
    from tuner.space.record import device_weight
    assert device_weight({"cpu": 4, "gpu": 0.5}) == ("gpu", 0.5)  # 100 s on half a GPU: 50 GPU-seconds
    assert device_weight({"cpu": 4, "gpu": 0}) == ("cpu", 4.0)
    budget = SearchBudget(None, None, max_trial_seconds=50, seconds_weight=0.5)
    assert budget("a", {"epoch": 1, "train_seconds": 60.0}) is False and budget.spent_seconds == 30
    assert budget("a", {"epoch": 2, "train_seconds": 100.0}) is True and budget.spent_seconds == 50


class InterruptOnce(tune.Callback):
    """Ctrl-C for the driver (SIGINT: Ray saves the experiment and fit returns) after `after` results, once:
    the flag file outlives the callback, which is pickled with the experiment and restored with it."""

    def __init__(self, flag, after: int):
        self.flag, self.after, self.seen = str(flag), after, 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.seen += 1
        if self.seen >= self.after and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os.kill(os.getpid(), signal.SIGINT)


def test_resume_on_uri_storage_does_not_grant_the_budget_again(local_ray, tmp_path, data_dir):
    # file:// is a URI to Ray and pyarrow as s3:// is: Ray syncs the experiment there from a staging directory.
    uri = "file://" + str(tmp_path / "remote")
    record, storage = prepare_search(SPACE, {}, "uri", 10, 1, "cpu=1", "none", "ibp_err", uri, None, None,
                                     str(data_dir), 5, max_trial_epochs=6, max_trial_seconds=100)
    assert storage == uri
    trainable = make_sleep_trainable(EPOCHS, 0.2, record.checkpoint_every_s)
    tuner = build_tuner(record, storage, trainable=trainable)
    tuner._local_tuner._run_config.callbacks = [InterruptOnce(tmp_path / "interrupted", 3)]  # no public hook
    tuner.fit()
    before = load_search("uri", storage)
    assert 3 <= before.trial_epochs() < 6 and not before.is_complete()  # interrupted with budget left
    restored = tune.Tuner.restore(f"{uri}/uri", trainable=tune.with_resources(trainable, {"cpu": 1}),
                                  resume_unfinished=True, resume_errored=False, restart_errored=False)
    # The stopper Ray unpickled with the experiment counts what its storage holds (the old one counted 0 here).
    stopper = restored._local_tuner._run_config.stop
    assert stopper.experiment == f"{uri}/uri" and stopper.spent == before.trial_epochs()
    restored.fit()
    after = load_search("uri", storage)
    # Exactly the budget: counting from 0 again would have run a third 3-epoch trial (9 trial-epochs).
    assert after.trial_epochs() == 6 and after.is_complete() and len(after.trials) == 2
    assert after.device_seconds() == pytest.approx(6 * 0.2)


def test_old_trial_epoch_budget_pickles_restore_as_search_budgets(tmp_path):
    write_results(tmp_path / "trial_a", [1, 2])
    old = TrialEpochBudget.__new__(TrialEpochBudget)
    old.__setstate__({"max_trial_epochs": 3, "experiment_dir": str(tmp_path), "_furthest": None})
    assert old.spent == 2 and old.max_trial_seconds is None and not old.stop_all()


@pytest.mark.parametrize("kwargs, message", [
    ({"sampler": "grid"}, "--sampler: 'grid' is not one of tpe, random"),
    ({"max_trial_seconds": "0"}, "--max-trial-seconds: must be a number of device-seconds > 0"),
    ({"max_trial_seconds": "inf"}, "--max-trial-seconds"),
    ({"max_trial_seconds": "ten"}, "--max-trial-seconds"),
    ({"max_trial_epochs": "0"}, "--max-trial-epochs"),
    ({"max_trial_epochs": "many"}, "--max-trial-epochs"),
])
def test_bad_sampler_or_budget_is_refused_before_anything_runs(tmp_path, data_dir, kwargs, message):
    with pytest.raises(SearchError, match=message):
        search_record(tmp_path, data_dir, "bad", **kwargs)
    assert not (tmp_path / "results" / "bad").exists()
