"""TPE's startup (`--startup-trials`, tuner/run/driver.py startup_trials_of): how many trials it samples at random
before it models the results. Optuna's 10 turns a search that affords a dozen trials into random search (issue 19's
benchmark: a TPE and a random search of one seed drew the same points), so by default it is a quarter of the trials
the search affords, between 2 and 10. And TPE's good set (`good_trials`, Optuna's gamma) holds more than one trial
in a small search, so TPE does not propose near the one finished trial only."""
from __future__ import annotations

import optuna
import pytest

from tuner.run.driver import (good_trials, make_sampler, prepare_search, small_search_tpe, startup_trials_of,
                              trial_epochs)
from tuner.space.record import SearchError, read_record
from tuner.space.search_space import load_space


@pytest.mark.parametrize("main_trials, budget_epochs, per_trial, reeval, expected", [
    (100, None, 6, 0, 10),  # Optuna's own 10 where 40 or more trials fit
    (40, None, 6, 0, 10),
    (20, None, 6, 0, 5),  # a quarter
    (11, None, 6, 0, 2),
    (5, None, 6, 0, 2),  # never fewer than 2: TPE splits what it has into better and worse
    (38, 385, 35, 6, 2),  # issue 19's searches: 385 trial-epochs buy 11 full trials, 6 of them re-evaluations
    (38, 35 * 46, 35, 6, 9),  # the budget holds 40 trials of its own, the samples 38: the fewer decide
    (30, 35 * 26, 35, 6, 5),
])
def test_the_default_is_a_quarter_of_the_trials_the_search_affords(main_trials, budget_epochs, per_trial, reeval,
                                                                   expected):
    assert startup_trials_of(None, "tpe", main_trials, budget_epochs, per_trial, reeval) == expected


def test_a_given_startup_is_kept_and_random_sampling_has_none():
    assert startup_trials_of("7", "tpe", 11, None, 6, 0) == 7
    assert startup_trials_of(None, "random", 11, None, 6, 0) is None
    for bad in ("0", "-1", "two", "2.5"):
        with pytest.raises(SearchError, match="--startup-trials: must be an integer >= 1"):
            startup_trials_of(bad, "tpe", 11, None, 6, 0)
    with pytest.raises(SearchError, match="--startup-trials: goes with --sampler tpe"):
        startup_trials_of("3", "random", 11, None, 6, 0)


def test_the_record_builds_a_seeded_tpe_with_that_startup(tmp_path, data_dir):
    record, storage = prepare_search("search_spaces/mnist_tiny.yaml", {}, "startup", 11, 1, "cpu=1", "asha",
                                     "ibp_err", str(tmp_path / "results"), None, None, str(data_dir), 4)
    assert read_record(storage, "startup").startup_trials == 2  # 11 // 4
    sampler = make_sampler(record)
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == 2
    assert sampler._gamma is good_trials
    again = make_sampler(record)  # seeded by the search's seed: the same first draws
    draws = [optuna.create_study(sampler=s).ask().suggest_float("x", 0, 1) for s in (sampler, again)]
    assert draws[0] == draws[1]
    record.startup_trials = None  # a record from before: Ray builds Optuna's default TPE with the seed
    assert make_sampler(record) is None
    from tuner.results.report import sampler_text
    assert sampler_text(record) == "tpe (its first 10 trials at random)"


def test_a_full_length_trial_is_counted_at_the_fidelity():
    space = load_space("search_spaces/mnist_short_warmup.yaml")
    assert trial_epochs(space, "target") == trial_epochs(space, "subset:20000") == 35  # a subset keeps the epochs
    assert trial_epochs(space, "epochs:9") == 9


def test_a_space_whose_defaults_do_not_name_every_param_counts_its_base_epochs():
    from tuner.space.record import space_with_overrides

    space = space_with_overrides({"base": {"epochs": 7, "eps": 0.1, "schedule": {"start": 1, "length": 3}},
                                  "params": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}, {}, "test")
    assert trial_epochs(space, "target") == 7 and trial_epochs(space, "epochs:3") == 3


@pytest.mark.parametrize("ended, good", [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3), (12, 3), (20, 3), (21, 3), (31, 4),
                                         (100, 10), (1000, 25)])
def test_the_good_set_is_a_quarter_up_to_3_or_optunas_tenth(ended, good):
    assert good_trials(ended) == good


def small_search_history():
    """Issue 19's searches in small: the defaults point finished (batch 256); of the early-stopped trials, two with
    batch 64 went furthest (to rung 9), the rest were stopped at rungs 1 and 3."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    dists = {"batch_size": CategoricalDistribution([64, 128, 256]), "lr": FloatDistribution(1e-4, 3e-3, log=True)}
    trials = [create_trial(params={"batch_size": 256, "lr": 5e-4}, distributions=dists, value=0.136,
                           intermediate_values={step: 0.2 - 0.003 * step for step in range(1, 25)})]
    for batch, lr, rung, value in [(64, 9e-4, 9, 0.172), (64, 2.8e-3, 9, 0.160), (128, 1e-3, 3, 0.19),
                                   (256, 1.1e-3, 1, 0.195), (256, 3e-4, 1, 0.447), (128, 2e-4, 1, 0.9),
                                   (256, 1.6e-3, 1, 0.254), (128, 4e-4, 1, 0.33)]:
        trials.append(create_trial(params={"batch_size": batch, "lr": lr}, distributions=dists,
                                   state=TrialState.PRUNED, intermediate_values={s: value for s in range(1, rung + 1)}))
    return dists, trials


def next_batch_sizes(make_tpe) -> list[int]:
    dists, history = small_search_history()
    picks = []
    for seed in range(20):  # one proposal per seed, each from the same 9 ended trials
        study = optuna.create_study(sampler=make_tpe(2, seed))
        study.add_trials(history)
        picks.append(study.ask(dists).params["batch_size"])
    return picks


def test_with_one_finished_trial_tpe_follows_the_trials_that_went_furthest_not_the_defaults_alone():
    # Optuna's 10 %: the good set is the defaults point alone
    stock = next_batch_sizes(lambda startup, seed: optuna.samplers.TPESampler(n_startup_trials=startup, seed=seed))
    ours = next_batch_sizes(small_search_tpe)  # 3 of 9: the defaults and the two that reached rung 9
    assert stock.count(256) >= 14, stock
    assert ours.count(64) >= 14, ours
