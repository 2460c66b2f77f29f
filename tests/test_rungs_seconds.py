"""Rungs in seconds at the target ε (tuner/run/schedulers.py): trials of different cost per epoch meet at their rungs
after equal compute. Driven result by result on Ray's own Trial objects, as tests/test_scheduler_searcher.py does."""
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from trainers.config import ConfigError
from tuner.run.schedulers import SECONDS_AT_TARGET, WarmupAwareASHA, default_rungs, make_scheduler


def result(epoch: int, seconds_per_epoch: float, ramp: int, err: float) -> dict:
    at_target = epoch > ramp
    return {"epoch": epoch, "epochs": 30, "at_target": at_target, "ibp_err": err if at_target else 0.99,
            "target_seconds": seconds_per_epoch * max(0, epoch - ramp), "training_iteration": epoch}


def test_cheap_and_costly_trials_meet_at_equal_seconds():
    sched = WarmupAwareASHA(metric="ibp_err", mode="min", max_epochs_at_target=10, reduction_factor=3,
                            rungs="seconds")
    assert sched.rungs == []  # placed by the first epoch at target
    cheap, costly, costly_bad = (Trial("t", stub=True) for _ in range(3))
    for t in (cheap, costly, costly_bad):
        sched.on_trial_add(None, t)
    # ramp epochs carry no progress: never judged, whatever their error
    assert sched.on_trial_result(None, cheap, result(1, 1.0, ramp=2, err=0.5)) == TrialScheduler.CONTINUE
    seen = {}
    for epoch in range(3, 13):  # the cheap trial (1 s an epoch at target) runs 10 epochs at target
        r = result(epoch, 1.0, ramp=2, err=0.30)
        sched.on_trial_result(None, cheap, r)
        seen[r["target_seconds"]] = epoch
    assert sched.rungs[:3] == [1.0, 3.0, 9.0]  # its first epoch at target took 1 s
    # the costly trial (9 s an epoch at target) is judged at the 9 s rung after ONE epoch at target, against what
    # the cheap one had after nine: better there, it continues; a worse costly trial stops
    assert sched.on_trial_result(None, costly, result(3, 9.0, ramp=2, err=0.20)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, costly_bad, result(3, 9.0, ramp=2, err=0.60)) == TrialScheduler.STOP
    recorded = dict((m, r) for m, r in sched._brackets[0]._rungs)[9.0]
    assert set(recorded) == {cheap.trial_id, costly.trial_id, costly_bad.trial_id} and seen[9.0] == 11


def test_seconds_progress_is_judged_only_at_target_and_the_key_is_ours():
    sched = WarmupAwareASHA(metric="ibp_err", mode="min", max_epochs_at_target=5, rungs="seconds", grace_seconds=2.0)
    assert sched.rungs[:2] == [2.0, 6.0]
    trial = Trial("t", stub=True)
    sched.on_trial_add(None, trial)
    ramp = {**result(1, 1.0, ramp=3, err=0.9), SECONDS_AT_TARGET: 1e9}  # a trainable's own key is ignored
    assert SECONDS_AT_TARGET not in sched._with_progress(trial.trial_id, ramp)
    assert sched._with_progress(trial.trial_id, result(5, 1.5, ramp=3, err=0.4))[SECONDS_AT_TARGET] == 3.0


def test_rungs_flags_and_defaults():
    assert default_rungs(["method", "lr"]) == "seconds" and default_rungs(["lr"]) == "epochs"
    with pytest.raises(ConfigError, match="--rungs: 'minutes'"):
        make_scheduler("asha", "ibp_err", "min", 10, rungs="minutes")
    with pytest.raises(ConfigError, match="--grace-seconds: goes with --rungs seconds"):
        make_scheduler("asha", "ibp_err", "min", 10, grace_seconds=5.0)
    with pytest.raises(ConfigError, match="only the warmup-aware scheduler"):
        make_scheduler("plain-asha", "ibp_err", "min", 10, rungs="seconds")
    with pytest.raises(ConfigError, match=r"--grace-seconds: must be seconds in \(0, 1e7\]"):
        make_scheduler("asha", "ibp_err", "min", 10, rungs="seconds", grace_seconds=float("nan"))


def test_trial_cost_by_hand():
    from trainers.config import TrainConfig
    from tuner.space.costs import STEP_COST, trial_cost

    cfg = TrainConfig.from_dict({"method": "crown-ibp", "epochs": 10, "batch_size": 100, "lr_milestones": [8],
                                 "schedule": {"start": 2, "length": 3}, "data": {"subset": 1000}}).resolve()
    # 10 steps an epoch; epochs 1-4 before the target (CROWN-IBP's cost), 6 at target with IBP's
    assert trial_cost(cfg, 50_000) == pytest.approx(10 * (4 * STEP_COST["crown-ibp"] + 6 * STEP_COST["vanilla"]))


SPACE = {"base": {"dataset": "mnist", "model": "cnn_small", "method": "fast", "eps": 0.05, "epochs": 3,
                  "batch_size": 50, "lr": 1e-3, "lr_milestones": [3], "schedule": {"start": 1, "length": 1},
                  "data": {"subset": 300, "val_size": 100}, "eval": {"metrics": ["clean", "ibp"], "batch_size": 100}},
         "params": {"method": {"type": "categorical", "choices": ["fast", "staps"]}},
         "defaults": {"method": "fast"}, "seeds": [{"method": "staps"}]}


def test_a_search_over_two_methods_of_different_cost_meets_at_equal_seconds(data_dir, tmp_path, ray_shut_down_after):
    """A real search over `fast` and STAPS (about 7x the cost of a step): rungs are in seconds by default for a
    space searching `method`, the trials report their seconds at target, and a STAPS epoch costs more of them,
    so at a rung in seconds it has trained fewer epochs (the rule itself: the tests above)."""
    import certtune
    from tuner.results.experiment import load_search

    certtune.search(SPACE, name="cost", num_samples=2, max_concurrent=1, data_dir=str(data_dir),
                    storage=str(tmp_path), grace_seconds=0.01, echo=False)
    search = load_search("cost", str(tmp_path))
    assert search.record.rungs == "seconds" and search.record.grace_seconds == 0.01
    assert search.record.method_costs["staps"] > 3 * search.record.method_costs["fast"]
    per_epoch = {}
    for t in search.trials:
        at_target = [r for r in t.history if r["at_target"]]
        # Each reports its seconds at target from its first epoch there (where a rung in seconds can judge it);
        # whether the costlier one is stopped at a rung it shares depends on this machine's timing.
        assert at_target and 0.01 <= at_target[0]["target_seconds"]
        assert all(a["target_seconds"] < b["target_seconds"] for a, b in zip(at_target, at_target[1:]))
        per_epoch[t.params["method"]] = at_target[0]["target_seconds"]  # one epoch at target
    first = min(search.trials, key=lambda t: t.order)
    assert first.params["method"] == "fast" and first.status == "finished"  # alone at its rungs: never stopped
    assert per_epoch["staps"] > per_epoch["fast"]
