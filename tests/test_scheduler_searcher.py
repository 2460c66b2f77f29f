"""Warmup-aware ASHA and honest Optuna bookkeeping, on a real local Ray, real Optuna and a synthetic trainable.

The trainable reports the per-epoch metrics of the trainer contract with made-up values: during its ε ramp
the error at target ε is high (0.95); at target it decays towards the trial's `final_err`.
Trials run one at a time (max_concurrent_trials=1) so which trial meets which rung cutoff is deterministic.
"""
import os
import sys
import time

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

import optuna  # noqa: E402
import ray  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.experiment import Trial  # noqa: E402
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402
from raycluster import own_ray  # noqa: E402

from trainers.config import ConfigError  # noqa: E402
from tuner.run.schedulers import TargetEpochCounter, WarmupAwareASHA, make_scheduler  # noqa: E402
from tuner.study.keys import FAIL_REASON, RAY_TRIAL_ID  # noqa: E402
from tuner.study.searcher import HonestOptunaSearch  # noqa: E402

EPOCHS = 9          # rungs at 1, 3, 9 epochs (at target) with grace 1, rf 3
EPS_TARGET = 0.3
RAMP_ERR = 0.95     # verified error at target ε while ε is still ramping

GOOD = {"ramp": 1, "final_err": 0.3}          # at target from epoch 1, decent
BAD = {"ramp": 1, "final_err": 0.7}           # at target from epoch 1, clearly worse
LONG_BEST = {"ramp": 5, "final_err": 0.1}     # long ramp: terrible during it, best once at target
LONG_BAD = {"ramp": 5, "final_err": 0.9}      # long ramp and bad at target


def ibp_err(case: dict, epoch: int) -> float:
    if epoch < case["ramp"]:
        return RAMP_ERR
    return case["final_err"] + 0.1 / (epoch - case["ramp"] + 1)


def metrics(case: dict, epoch: int) -> dict:
    err = ibp_err(case, epoch)
    return {"epoch": epoch, "epochs": EPOCHS, "eps": EPS_TARGET * min(1.0, epoch / case["ramp"]),
            "eps_target": EPS_TARGET, "at_target": epoch >= case["ramp"], "ibp_err": err, "clean_err": err / 2}


def synthetic_trainable(config: dict) -> None:
    case = config.get("case", config)  # a whole case from a grid, or ramp/final_err sampled by Optuna
    failure = config.get("failure", "none")
    for epoch in range(1, EPOCHS + 1):
        if failure == "raise" and epoch == 2:
            raise RuntimeError("synthetic divergence")
        m = metrics(case, epoch)
        if failure == "nan" and epoch == EPOCHS:
            m["ibp_err"] = float("nan")
        time.sleep(0.005)
        tune.report(m)


@pytest.fixture(scope="module")
def local_ray():
    # Ray workers cannot import this test module (tests/ is not on their path): ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with own_ray():
        yield


def run(tmp_path, name, param_space, scheduler=None, searcher=None, num_samples=1):
    tuner = tune.Tuner(
        synthetic_trainable, param_space=param_space,
        tune_config=tune.TuneConfig(scheduler=scheduler, search_alg=searcher, num_samples=num_samples,
                                    max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0))
    return tuner.fit()


def key(case):
    return case["ramp"], case["final_err"]


# --- scheduler ------------------------------------------------------------------------------------

def drive(scheduler, cases: list[dict]) -> dict:
    """Feed interleaved epochs (all trials report epoch 1, then epoch 2, ...) to a scheduler, as Tune would.

    Returns {case index: epoch at which it was stopped, or None if it ran all epochs}."""
    trials = [Trial("synthetic", stub=True) for _ in cases]
    for t in trials:
        scheduler.on_trial_add(None, t)
    stopped = {i: None for i in range(len(cases))}
    for epoch in range(1, EPOCHS + 1):
        for i, (t, case) in enumerate(zip(trials, cases)):
            if stopped[i] is not None:
                continue
            result = {**metrics(case, epoch), "training_iteration": epoch}
            if scheduler.on_trial_result(None, t, result) == TrialScheduler.STOP:
                stopped[i] = epoch
                scheduler.on_trial_complete(None, t, result)
    return stopped


def test_warmup_aware_rule_never_judges_the_ramp_and_stops_bad_trials_at_their_first_rung():
    cases = [GOOD, BAD, LONG_BEST, LONG_BAD]
    warm = drive(WarmupAwareASHA(metric="ibp_err", mode="min", max_epochs_at_target=EPOCHS), cases)
    plain = drive(AsyncHyperBandScheduler(metric="ibp_err", mode="min", max_t=EPOCHS, reduction_factor=3,
                                          stop_last_trials=False), cases)
    # Warmup-aware: the long-ramp best trial runs to the end; bad trials stop at their first rung at target
    # (epoch 1 for a 1-epoch ramp, epoch 5 = first epoch at target for a 5-epoch ramp), never during a ramp.
    assert warm == {0: None, 1: 1, 2: None, 3: 5}
    # Plain ASHA compares ramp errors with at-target errors and kills both long ramps at epoch 1.
    assert plain[2] == 1 and plain[3] == 1


def test_warmup_aware_rule_follows_mode_max():
    flip = lambda case: {**case, "final_err": 1 - case["final_err"]}  # noqa: E731 - accuracy-like metric
    sched = WarmupAwareASHA(metric="ibp_err", mode="max", max_epochs_at_target=EPOCHS)
    # Values 1 - err: with mode max the flipped GOOD (0.7 + decay) survives and the flipped BAD (0.3 + decay),
    # now the smaller value, is stopped at its first rung.
    assert drive(sched, [flip(GOOD), flip(BAD)]) == {0: None, 1: 1}


def test_non_finite_metric_at_target_stops_but_not_during_ramp():
    sched = WarmupAwareASHA(metric="ibp_err", mode="min", max_epochs_at_target=EPOCHS)
    trial = Trial("synthetic", stub=True)
    sched.on_trial_add(None, trial)
    ramping = {**metrics(LONG_BEST, 1), "ibp_err": float("nan")}
    assert sched.on_trial_result(None, trial, ramping) == TrialScheduler.CONTINUE
    at_target = {**metrics(LONG_BEST, 6), "ibp_err": float("inf")}
    assert sched.on_trial_result(None, trial, at_target) == TrialScheduler.STOP


def test_epochs_at_target_counts_from_the_first_epoch_at_target_even_when_a_retry_replays_epochs():
    counter = TargetEpochCounter()
    seen = [counter.update("t", metrics(LONG_BEST, e)) for e in (1, 4, 5, 6, 7, 5, 6)]  # retry replays 5, 6
    assert seen == [None, None, 1, 2, 3, 1, 2]
    with pytest.raises(ValueError, match="'epoch'"):
        counter.update("t", {"at_target": True})


def test_make_scheduler_kinds_and_bad_input():
    assert isinstance(make_scheduler("asha", "ibp_err", "min", 9), WarmupAwareASHA)
    plain = make_scheduler("plain-asha", "ibp_err", "min", 9)
    assert type(plain) is AsyncHyperBandScheduler and plain._time_attr == "training_iteration"
    assert make_scheduler("none", "ibp_err", "min", 9) is None
    with pytest.raises(ConfigError, match="'hyperband' is not one of asha, plain-asha, none"):
        make_scheduler("hyperband", "ibp_err", "min", 9)
    with pytest.raises(ConfigError, match="mode"):
        make_scheduler("asha", "ibp_err", "minimize", 9)
    with pytest.raises(ConfigError, match="max_epochs_at_target"):
        make_scheduler("asha", "ibp_err", "min", 0)
    with pytest.raises(ConfigError, match="reduction_factor"):
        make_scheduler("asha", "ibp_err", "min", 9, reduction_factor=1)


def test_warmup_aware_asha_in_a_real_tuner_keeps_long_ramps_that_plain_asha_kills(local_ray, tmp_path):
    space = {"case": tune.grid_search([GOOD, BAD, LONG_BEST])}  # run in this order, one at a time
    warm = run(tmp_path, "warm", space, make_scheduler("asha", "ibp_err", "min", EPOCHS))
    plain = run(tmp_path, "plain", space, make_scheduler("plain-asha", "ibp_err", "min", EPOCHS))
    assert warm.num_errors == 0 and plain.num_errors == 0
    last_epoch = lambda grid: {key(r.config["case"]): r.metrics["epoch"] for r in grid}  # noqa: E731
    assert last_epoch(warm) == {key(GOOD): EPOCHS, key(BAD): 1, key(LONG_BEST): EPOCHS}
    assert last_epoch(plain) == {key(GOOD): EPOCHS, key(BAD): 1, key(LONG_BEST): 1}


# --- searcher -------------------------------------------------------------------------------------

SPACE = {"ramp": tune.randint(1, 4), "final_err": tune.uniform(0.05, 0.9),
         "failure": tune.choice(["none", "nan", "raise"])}
GOOD_P, BAD_P = {**GOOD, "failure": "none"}, {**BAD, "failure": "none"}
NAN_P = {"ramp": 1, "final_err": 0.1, "failure": "nan"}     # best trial until its last epoch turns NaN
RAISE_P = {"ramp": 3, "final_err": 0.3, "failure": "raise"}  # raises at epoch 2, during its ramp (no rung)


def search(tmp_path, name, searcher, space, num_samples):
    return run(tmp_path, name, space, make_scheduler("asha", "ibp_err", "min", EPOCHS), searcher, num_samples)


def optuna_trial_for(study, config):
    (trial,) = [t for t in study.trials if t.params == {k: config[k] for k in t.params}]
    return trial


def expected_state(result) -> TrialState:
    """What honest bookkeeping must tell Optuna for this Ray trial."""
    if result.error is not None:
        return TrialState.FAIL
    if result.config["failure"] == "nan" and result.metrics["epoch"] == EPOCHS:
        return TrialState.FAIL
    return TrialState.PRUNED if result.metrics["epoch"] < EPOCHS else TrialState.COMPLETE


def test_stock_optuna_search_tells_early_stopped_trials_complete_and_leaves_nan_trials_running(
        local_ray, tmp_path):
    """The bugs HonestOptunaSearch guards against, shown on the stock searcher in the same setup."""
    stock = OptunaSearch(metric="ibp_err", mode="min", points_to_evaluate=[GOOD_P, BAD_P, NAN_P],
                         sampler=optuna.samplers.TPESampler(seed=0))
    results = search(tmp_path, "stock", stock, SPACE, num_samples=3)
    study = stock._ot_study  # the stock class has no public accessor
    bad = optuna_trial_for(study, BAD_P)
    assert bad.state == TrialState.COMPLETE and bad.value == pytest.approx(ibp_err(BAD, 1))  # 1 epoch of 9
    assert optuna_trial_for(study, NAN_P).state == TrialState.RUNNING  # a zombie, forever
    assert len(results) == 3


def test_honest_search_tells_pruned_fail_and_complete(local_ray, tmp_path):
    searcher = HonestOptunaSearch(metric="ibp_err", mode="min",
                                  points_to_evaluate=[GOOD_P, BAD_P, NAN_P, RAISE_P],
                                  sampler=optuna.samplers.TPESampler(n_startup_trials=2, seed=0))
    results = search(tmp_path, "honest", searcher, SPACE, num_samples=6)  # 2 trials sampled by TPE
    study = searcher.study
    assert len(results) == len(study.trials) == 6
    by_ray_id = {t.user_attrs[RAY_TRIAL_ID]: t for t in study.trials}
    for r in results:
        trial = by_ray_id[r.metrics["trial_id"]]
        assert trial.state == expected_state(r), (r.config, r.metrics.get("epoch"))
        if trial.state == TrialState.COMPLETE:
            assert trial.value == pytest.approx(r.metrics["ibp_err"])
            assert trial.last_step == EPOCHS - r.config["ramp"] + 1  # step = epochs at target
        if trial.state == TrialState.PRUNED:
            # Its last intermediate value is the result ASHA stopped it on: the budget it really had.
            assert trial.last_step == r.metrics["epoch"] - r.config["ramp"] + 1
            assert trial.value == pytest.approx(r.metrics["ibp_err"])
    for t in study.trials:  # nothing reported during a ramp: steps are counted from the first epoch at target
        assert sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))

    assert optuna_trial_for(study, GOOD_P).state == TrialState.COMPLETE
    assert optuna_trial_for(study, BAD_P).state == TrialState.PRUNED
    nan, raised = optuna_trial_for(study, NAN_P), optuna_trial_for(study, RAISE_P)
    assert nan.state == TrialState.FAIL and "ibp_err=nan" in nan.user_attrs[FAIL_REASON]
    assert raised.state == TrialState.FAIL and "raised" in raised.user_attrs[FAIL_REASON]
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]

    # Persistence: Ray's own searcher checkpoint in the experiment dir (what Tuner.restore reads) and an
    # explicit save/restore round trip both bring back the study with every trial, state and report.
    def summary(s):
        return [(t.number, t.state, t.values, t.intermediate_values, t.user_attrs, t.params) for t in s.trials]
    from_experiment = HonestOptunaSearch()
    from_experiment.restore_from_dir(results.experiment_path)
    searcher.save(str(tmp_path / "searcher.pkl"))
    from_file = HonestOptunaSearch()
    from_file.restore(str(tmp_path / "searcher.pkl"))
    for restored in (from_experiment, from_file):
        assert summary(restored.study) == summary(study)
        assert set(restored.suggest("after-restore")) == set(SPACE)  # TPE still samples from that history


def test_honest_search_multi_objective_completes_with_value_lists(local_ray, tmp_path):
    space = {"ramp": tune.randint(1, 4), "final_err": tune.uniform(0.05, 0.9)}
    searcher = HonestOptunaSearch(metric=["ibp_err", "clean_err"], mode=["min", "min"],
                                  points_to_evaluate=[GOOD, BAD],
                                  sampler=optuna.samplers.TPESampler(n_startup_trials=2, seed=0))
    results = search(tmp_path, "multi", searcher, space, num_samples=4)
    study = searcher.study
    by_ray_id = {t.user_attrs[RAY_TRIAL_ID]: t for t in study.trials}
    assert len(results) == len(by_ray_id) == 4
    for r in results:
        trial = by_ray_id[r.metrics["trial_id"]]
        if r.metrics["epoch"] < EPOCHS:
            assert trial.state == TrialState.PRUNED and trial.values is None
        else:
            assert trial.state == TrialState.COMPLETE
            assert trial.values == pytest.approx([r.metrics["ibp_err"], r.metrics["clean_err"]])
        assert trial.intermediate_values == {}  # Optuna cannot store them for several objectives
    assert optuna_trial_for(study, GOOD).state == TrialState.COMPLETE
    assert optuna_trial_for(study, BAD).state == TrialState.PRUNED
