"""A trial's share of a seconds budget (tuner/run/trial_share.py): a trial that cannot reach its next judgment
(next rung or its end) within `--max-trial-share` of the budget is stopped now, its ramp included.

The rule by hand on Ray's own Trial objects (as tests/test_rungs_seconds.py), then through a real local Ray search
whose trainable reports exact seconds, so the cap's arithmetic is checked end to end on the real record,
scheduler, searcher and budget."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from raycluster import own_ray

from trainers.config import ConfigError
from tuner.run.schedulers import EPOCHS_AT_TARGET, SECONDS_AT_TARGET, WarmupAwareASHA, make_scheduler
from tuner.space.record import SearchError
from tuner.study.keys import STOP_REASON_FILE

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def result(epoch: int, per_epoch: float, first_target: int, epochs: int = 12, err: float = 0.3) -> dict:
    at_target = epoch >= first_target
    return {"epoch": epoch, "epochs": epochs, "at_target": at_target, "first_target_epoch": first_target,
            "ibp_err": err if at_target else 0.99, "train_seconds": per_epoch * epoch,
            "target_seconds": per_epoch * max(0, epoch - first_target + 1), "training_iteration": epoch}


def scheduler(cap: float, **kwargs) -> WarmupAwareASHA:
    kwargs = {"rungs": "seconds", "grace_seconds": 10.0, **kwargs}
    return WarmupAwareASHA(metric="ibp_err", mode="min", max_epochs_at_target=30, reduction_factor=3,
                           trial_seconds_cap=cap, **kwargs)


def added(sched: WarmupAwareASHA) -> Trial:
    trial = Trial("t", stub=True)
    sched.on_trial_add(None, trial)
    return trial


def test_a_long_costly_ramp_is_stopped_after_its_first_epoch():
    sched = scheduler(cap=100.0)
    trial = added(sched)
    # 30 s an epoch, first epoch at target 9: its first rung (10 s at target) is 7 more ramp epochs and one at
    # target away: 30 + 8 * 30 = 270 s > 100, so it stops now, having spent 30 s, not at the cap
    assert sched.on_trial_result(None, trial, result(1, 30.0, first_target=9)) == STOP
    assert sched.share.stopped == {trial.trial_id}


def test_a_trial_that_finishes_within_its_share_is_never_stopped_by_it():
    sched = scheduler(cap=65.0)
    trial = added(sched)
    # 5 s an epoch, 12 epochs: 60 s in all. From epoch 8 (30 s at target) the next rung (90 s at target) lies past
    # the cap, but the trial's end does not: it goes on
    assert [sched.on_trial_result(None, trial, result(e, 5.0, first_target=3)) for e in range(1, 12)] == [CONTINUE] * 11
    assert sched.share.stopped == set()


def test_a_trial_goes_on_while_its_next_rung_fits_and_stops_at_the_cap():
    sched = scheduler(cap=100.0)
    trial = added(sched)  # 10 s an epoch, 30 epochs (300 s), at target from epoch 2; rungs 10, 30, 90, 270 s
    decisions = [sched.on_trial_result(None, trial, result(e, 10.0, first_target=2, epochs=30)) for e in range(1, 11)]
    # up to epoch 9 the next rung is within 100 s (epoch 9: 90 s, at target 80 s: the 90-s rung one epoch on);
    # at epoch 10 (100 s, 90 s at target, the rung just passed) the next rung, 270 s at target, and the end are
    # both past the cap
    assert decisions == [CONTINUE] * 9 + [STOP]
    assert sched.rungs[:4] == [10.0, 30.0, 90.0, 270.0]


def test_the_next_judgment_counts_the_ramp_and_rungs_in_epochs_or_seconds():
    # the results as the scheduler judges them: at target they carry its progress (epochs or seconds at target)
    seconds = scheduler(cap=1e9)
    assert seconds.epochs_to_next_rung(result(1, 4.0, first_target=5), 4.0) == 3 + 3  # 3 ramp epochs, 10 s / 4 s
    at_target = {**result(6, 4.0, first_target=5), SECONDS_AT_TARGET: 8.0}
    assert seconds.epochs_to_next_rung(at_target, 4.0) == 1  # 8 s at target, the 10-s rung
    unplaced = scheduler(cap=1e9, grace_seconds=None)  # rungs placed by the first epoch at target: that is the next
    assert unplaced.rungs == [] and unplaced.epochs_to_next_rung(result(1, 4.0, first_target=5), 4.0) == 4
    epochs = scheduler(cap=1e9, rungs="epochs", grace_seconds=None)  # rungs 1, 3, 9, 27 epochs at target
    assert epochs.epochs_to_next_rung(result(1, 4.0, first_target=5), 4.0) == 3 + 1
    at_target = {**result(6, 4.0, first_target=5), EPOCHS_AT_TARGET: 2}
    assert epochs.epochs_to_next_rung(at_target, 4.0) == 1  # 2 at target, the 3-epoch rung
    past_the_last = {**result(40, 4.0, first_target=5, epochs=50), EPOCHS_AT_TARGET: 36}
    assert epochs.epochs_to_next_rung(past_the_last, 4.0) is None


def test_the_last_epochs_cost_predicts_the_next():
    sched = scheduler(cap=100.0)
    trial = added(sched)
    # epoch 1 took 10 s, epoch 2 took 40 s (a costlier phase): 50 + 40 * 2 (ramp epoch 3, rung at epoch 4) = 130
    assert sched.on_trial_result(None, trial, {**result(1, 10.0, first_target=4)}) == CONTINUE
    assert sched.on_trial_result(None, trial, {**result(2, 10.0, first_target=4), "train_seconds": 50.0}) == STOP


def test_results_without_the_facts_are_not_capped():
    sched = scheduler(cap=1.0)
    trial = added(sched)
    bare = {k: v for k, v in result(1, 30.0, first_target=9).items() if k != "first_target_epoch"}
    assert sched.on_trial_result(None, trial, bare) == CONTINUE


def test_the_cap_goes_only_with_the_warmup_aware_scheduler():
    with pytest.raises(ConfigError, match="--max-trial-share: only the warmup-aware"):
        make_scheduler("none", "ibp_err", "min", 10, trial_seconds_cap=5.0)
    with pytest.raises(ConfigError, match="--max-trial-share: only the warmup-aware"):
        make_scheduler("plain-asha", "ibp_err", "min", 10, trial_seconds_cap=5.0)
    assert make_scheduler("asha", "ibp_err", "min", 10, trial_seconds_cap=5.0).share.cap_seconds == 5.0


# ---- through a real search --------------------------------------------------------------------------------
EPOCHS, FIRST_TARGET = 6, 3
SECONDS_PER_EPOCH = {128: 0.5, 64: 2.0}  # the cheap defaults point, the costly seed point
SPACE = {"base": {"dataset": "mnist", "model": "cnn_small", "method": "fast", "eps": 0.1, "epochs": EPOCHS,
                  "batch_size": 128, "lr": 1e-3, "lr_milestones": [5], "schedule": {"start": 1, "length": 2},
                  "data": {"subset": 300, "val_size": 100}, "eval": {"metrics": ["clean", "ibp"], "batch_size": 100}},
         "params": {"batch_size": {"type": "categorical", "choices": [64, 128]}},
         "defaults": {"batch_size": 128}, "seeds": [{"batch_size": 64}]}


def make_timed_trainable():
    """Reports what the trainer reports, with exact seconds per epoch by batch size (and sleeps a little)."""
    def timed_trial(config: dict) -> None:
        import time

        from ray import tune

        per_epoch = SECONDS_PER_EPOCH[config["batch_size"]]
        for epoch in range(1, EPOCHS + 1):
            time.sleep(0.02)
            at_target = epoch >= FIRST_TARGET
            tune.report({"epoch": epoch, "epochs": EPOCHS, "eps": 0.1, "eps_target": 0.1, "at_target": at_target,
                         "first_target_epoch": FIRST_TARGET, "ibp_err": 0.3 if per_epoch < 1 else 0.2,
                         "clean_err": 0.05, "train_seconds": per_epoch * epoch,
                         "target_seconds": per_epoch * max(0, epoch - FIRST_TARGET + 1)})
    return timed_trial


@pytest.fixture(scope="module")
def local_ray():
    with own_ray():
        yield


def run(tmp_path, data_dir, name: str, **kwargs):
    from tuner.results.experiment import load_search
    from tuner.run.driver import build_tuner, prepare_search

    storage = str(tmp_path / "results")
    record, storage = prepare_search(SPACE, {}, name, 2, 1, "cpu=1", "asha", "ibp_err", storage, None, None,
                                     str(data_dir), 0, max_trial_seconds=12, rungs="seconds", grace_seconds=0.5,
                                     **kwargs)
    build_tuner(record, storage, trainable=make_timed_trainable()).fit()
    return record, load_search(name, storage)


def test_a_real_search_stops_the_costly_trial_at_its_share(local_ray, tmp_path, data_dir):
    record, search = run(tmp_path, data_dir, "share")
    assert record.max_trial_share == pytest.approx(1 / 3) and record.trial_seconds_cap() == pytest.approx(4.0)
    by_batch = {t.params["batch_size"]: t for t in search.trials}
    # the cheap point finishes (3 s of a 4-s share); the costly one (2 s an epoch) would reach its first rung at
    # 2 + 2 + 2 = 6 s > 4 s, so it stops after its first epoch
    assert by_batch[128].status == "finished" and by_batch[128].seconds_run == pytest.approx(3.0)
    assert by_batch[64].status == "stopped" and by_batch[64].epochs_run == 1
    assert search.largest_trial_share() == pytest.approx(3.0 / 12)
    assert "(largest trial 25% of it, cap 33%)" in search.budget_text()
    # the rule that stopped it is told apart from a rung or the budget, in the report and in trials.csv
    marker = search.path / by_batch[64].dirname / STOP_REASON_FILE
    assert json.loads(marker.read_text())["by"] == "share" and by_batch[64].stop_marker == "share"
    assert search.stop_rule(by_batch[64]) == "share" and search.stop_rule(by_batch[128]) is None
    from tuner.results.report import format_report
    row = next(line for line in format_report(search).splitlines() if line.split()[1:2] == [by_batch[64].trial_id])
    assert "stopped (share)" in row


def test_with_the_whole_budget_as_its_share_the_costly_trial_goes_on(local_ray, tmp_path, data_dir):
    record, search = run(tmp_path, data_dir, "whole", max_trial_share="1")
    assert record.trial_seconds_cap() == pytest.approx(12.0)
    costly = next(t for t in search.trials if t.params["batch_size"] == 64)
    assert costly.epochs_run >= 3  # past its ramp: the stop above was the cap's


@pytest.mark.parametrize("kwargs, message", [
    ({"max_trial_share": "0"}, "--max-trial-share: must be a fraction in (0, 1]"),
    ({"max_trial_share": "1.5"}, "--max-trial-share: must be a fraction in (0, 1]"),
    ({"max_trial_share": "nan"}, "--max-trial-share: must be a fraction in (0, 1]"),
    ({"max_trial_share": "half"}, "--max-trial-share: must be a fraction in (0, 1]"),
    ({"max_trial_share": "0.5", "max_trial_seconds": None}, "--max-trial-share: goes with --max-trial-seconds"),
    ({"max_trial_share": "0.5", "scheduler": "none"}, "--max-trial-share: only the warmup-aware"),
])
def test_bad_shares_are_one_line_before_anything_runs(tmp_path, data_dir, kwargs, message):
    from tuner.run.driver import prepare_search

    kwargs = {"max_trial_seconds": 12, "scheduler": "asha", **kwargs}
    scheduler = kwargs.pop("scheduler")
    with pytest.raises(SearchError) as e:
        prepare_search(SPACE, {}, "bad", 2, 1, "cpu=1", scheduler, "ibp_err", str(tmp_path / "r"), None, None,
                       str(data_dir), 0, **kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "r" / "bad").exists()


def test_the_default_share_and_its_weighting(tmp_path, data_dir):
    from tuner.run.driver import prepare_search

    names = iter(range(100))

    def record(**kwargs):
        resources, scheduler = kwargs.pop("resources", "cpu=1"), kwargs.pop("scheduler", "asha")
        return prepare_search(SPACE, {}, f"s{next(names)}", 2, 1, resources, scheduler, "ibp_err",
                              str(tmp_path / "r"), None, None, str(data_dir), 0, **kwargs)[0]

    assert record(max_trial_seconds=60).max_trial_share == pytest.approx(1 / 3)
    unbudgeted = record()
    assert unbudgeted.max_trial_share is None and unbudgeted.trial_seconds_cap() is None  # no seconds budget
    assert record(max_trial_seconds=60, scheduler="none").max_trial_share is None
    # 60 CPU-seconds on cpu=2 trials: a third is 20 CPU-seconds, 10 s of a trial's own training
    assert record(max_trial_seconds=60, resources="cpu=2").trial_seconds_cap() == pytest.approx(10.0)


def test_a_stop_is_recorded_in_the_trials_directory_and_a_failed_write_costs_only_the_label(tmp_path, capsys):
    import pyarrow.fs

    from tuner.run.schedulers import record_stop

    def trial_in(path):
        storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(path))
        return SimpleNamespace(trial_id="t1", storage=storage)

    record_stop(trial_in(tmp_path / "trial_t1"), "rung", {"epoch": 4})
    note = json.loads((tmp_path / "trial_t1" / STOP_REASON_FILE).read_text())
    assert note["by"] == "rung" and note["epoch"] == 4
    (tmp_path / "a_file").write_text("")
    record_stop(trial_in(tmp_path / "a_file" / "trial_t1"), "share", {"epoch": 1})  # its folder cannot be made
    assert "could not record why trial t1 stopped (share)" in capsys.readouterr().out
    record_stop(added(scheduler(cap=10.0)), "share", {})  # a stub trial has no storage: nothing written, no error
    record_stop(trial_in(tmp_path / "trial_t2"), "rung", {"epoch": 12, "epochs": 12})  # its last epoch: not stopped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "trial_t1"]
    broken = SimpleNamespace(trial_id="t3", storage=SimpleNamespace(storage_filesystem=None, trial_fs_path="x"))
    record_stop(broken, "rung", {"epoch": 1})  # whatever the storage raises, the search goes on
    assert "could not record why trial t3 stopped (rung)" in capsys.readouterr().out


def test_a_non_finite_value_at_target_stops_the_trial_with_rungs_in_seconds_too():
    sched = scheduler(cap=1000.0)
    trial = added(sched)
    assert sched.on_trial_result(None, trial, result(1, 5.0, first_target=2, err=float("nan"))) == CONTINUE  # ramp
    assert sched.on_trial_result(None, trial, result(2, 5.0, first_target=2, err=float("nan"))) == STOP


def test_a_scheduler_pickled_before_the_cap_restores_without_one():
    import pickle

    sched = scheduler(cap=1.0)
    state = sched.__dict__.copy()
    del state["share"]  # as Ray pickled WarmupAwareASHA before trial shares
    old = WarmupAwareASHA.__new__(WarmupAwareASHA)
    old.__dict__.update(state)
    restored = pickle.loads(pickle.dumps(old))
    trial = added(restored)
    assert restored.share is None
    assert restored.on_trial_result(None, trial, result(1, 30.0, first_target=9)) == CONTINUE


def test_a_scheduler_with_a_cap_pickles_with_its_state_and_still_stops():
    import pickle

    sched = scheduler(cap=100.0)
    trial = added(sched)
    assert sched.on_trial_result(None, trial, result(1, 10.0, first_target=4)) == CONTINUE
    restored = pickle.loads(pickle.dumps(sched))
    assert restored.share.cap_seconds == 100.0
    # the restored one remembers epoch 1 (10 s): epoch 2 at 40 s more is priced at 40 s an epoch, as above
    assert restored.on_trial_result(None, trial, {**result(2, 10.0, first_target=4), "train_seconds": 50.0}) == STOP


def test_re_evaluations_are_never_capped():
    from tuner.study.keys import CONFIG_OF

    sched = scheduler(cap=1.0)
    rerun = Trial("t", config={CONFIG_OF: "abc"}, stub=True)
    sched.on_trial_add(None, rerun)
    assert sched.on_trial_result(None, rerun, result(1, 30.0, first_target=9)) == CONTINUE


def test_epochs_at_target_follow_the_trainers_first_target_epoch_after_a_resume():
    from tuner.study.verdict import TargetEpochCounter

    counter = TargetEpochCounter()
    # a trial resumed at epoch 12 (at target from epoch 3): its first result seen is epoch 12, 10 epochs at target
    assert counter.update("t", {"epoch": 12, "at_target": True, "first_target_epoch": 3}) == 10
    assert counter.update("u", {"epoch": 12, "at_target": True}) == 1  # without the fact: counted from here
