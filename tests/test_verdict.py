"""The verdict table (tuner/study/verdict.py) on hand-written results: a trial's status for readers, what Optuna is
told, the failure reason and the epochs at target ε. No Ray, no training: the rules alone."""
from __future__ import annotations

import math

import pytest

from tuner.study.verdict import (COMPLETE, FAIL, FAILED, FINISHED, NO_RESULT, PENDING, PRUNED, RAISED, RUNNING, STOPPED,
                           TargetEpochCounter, after_spent_budget, epochs_at_target, failure_reason, optuna_verdict,
                           settled_state, trial_status, values_at_target)

DONE = {"epoch": 4, "epochs": 4, "ibp_err": 0.3, "at_target": True}
EARLY = {"epoch": 2, "epochs": 4, "ibp_err": 0.4, "at_target": True}


@pytest.mark.parametrize("ray_status, last, expected", [
    ("TERMINATED", DONE, (FINISHED, None)),
    ("TERMINATED", EARLY, (STOPPED, None)),
    (None, DONE, (FINISHED, None)),  # the last epoch is reported: finished whatever Ray says
    ("RUNNING", EARLY, (RUNNING, None)),
    (None, EARLY, (RUNNING, None)),
    ("PAUSED", {}, (RUNNING, None)),
    ("PENDING", {}, (PENDING, None)),
    (None, {}, (PENDING, None)),
    ("TERMINATED", {}, (FAILED, NO_RESULT)),
    ("ERROR", EARLY, (FAILED, None)),
    ("TERMINATED", {**DONE, "diverged": "loss is nan"}, (FAILED, "diverged: loss is nan")),
    ("TERMINATED", {"fail_reason": "bad config"}, (FAILED, "bad config")),
    ("TERMINATED", {"ibp_err": 0.3}, (FAILED, "last result lacks 'epoch'/'epochs'")),
    ("TERMINATED", {**DONE, "ibp_err": math.nan}, (FAILED, "ibp_err missing or not finite at epoch 4")),
    ("TERMINATED", {**DONE, "ibp_err": "0.3"}, (FAILED, "ibp_err missing or not finite at epoch 4")),
])
def test_trial_status(ray_status, last, expected):
    assert trial_status(ray_status, last, ["ibp_err"]) == expected


@pytest.mark.parametrize("ray_status, last, expected", [
    ("TERMINATED", EARLY, FAILED),  # may have finished: damaged, not stopped
    ("TERMINATED", DONE, FINISHED),  # the final epoch is readable: what was torn does not matter
    ("RUNNING", EARLY, RUNNING),  # still open: a resume trains on
    (None, EARLY, RUNNING),
    ("ERROR", EARLY, FAILED),
])
def test_a_lost_tail_never_demotes_an_ended_trial_to_stopped(ray_status, last, expected):
    status, reason = trial_status(ray_status, last, ["ibp_err"], lost_tail="t/result.json")
    assert status == expected
    if ray_status == "TERMINATED" and status == FAILED:
        assert reason.startswith("damaged: t/result.json lost its last line (torn)") and "epoch 2 of 4" in reason


@pytest.mark.parametrize("result, raised, expected", [
    (DONE, False, (COMPLETE, [0.3], None)),
    (EARLY, False, (PRUNED, None, None)),
    (None, False, (PRUNED, None, None)),  # removed before its first report
    (DONE, True, (FAIL, None, RAISED)),
    ({**DONE, "ibp_err": math.inf}, False, (FAIL, None, "not finite at epoch 4: ibp_err=inf")),
    ({**DONE, "ibp_err": math.nan, "fail_reason": "diverged: bounds"}, False, (FAIL, None, "diverged: bounds")),
    ({"ibp_err": 0.3}, False, (FAIL, None, "last result lacks 'epoch'/'epochs', so a finished trial cannot be "
                                           "told from an early-stopped one")),
])
def test_optuna_verdict(result, raised, expected):
    assert optuna_verdict(result, raised, ["ibp_err"]) == expected


def test_optuna_verdict_with_two_objectives_names_each_bad_value():
    assert optuna_verdict({**DONE, "clean_err": 0.1}, False, ["ibp_err", "clean_err"]) == (COMPLETE, [0.3, 0.1], None)
    state, _, reason = optuna_verdict({**DONE, "clean_err": None}, False, ["ibp_err", "clean_err"])
    assert state == FAIL and reason == "not finite at epoch 4: clean_err=None"


def test_the_reader_status_and_optuna_agree_on_an_ended_trial():
    for last in (DONE, EARLY, {**DONE, "ibp_err": math.nan}):
        status, _ = trial_status("TERMINATED", last, ["ibp_err"])
        assert settled_state(status) == optuna_verdict(last, False, ["ibp_err"])[0]


def test_failure_reason_and_the_spent_budget():
    assert failure_reason("loss is nan", "ignored") == "diverged: loss is nan"
    assert failure_reason(None, "no data") == "no data"
    assert failure_reason(None, None) == "unknown" and failure_reason(None, None, "") == ""
    assert after_spent_budget(FAILED, NO_RESULT, reported=False) == (STOPPED, None)
    assert after_spent_budget(FAILED, NO_RESULT, reported=True) == (FAILED, NO_RESULT)
    assert after_spent_budget(FAILED, "boom", reported=False) == (FAILED, "boom")


def test_epochs_at_target_counted_from_epoch_numbers():
    counter = TargetEpochCounter()
    assert counter.update("t", {"epoch": 1, "at_target": False}) is None
    assert [counter.update("t", {"epoch": e, "at_target": True}) for e in (3, 4, 5)] == [1, 2, 3]
    assert counter.update("t", {"epoch": 4, "at_target": True}) == 2  # a retried trial replays epoch 4
    counter.forget("t")
    assert counter.update("t", {"epoch": 5, "at_target": True}) == 1
    with pytest.raises(ValueError, match="'epoch'"):
        counter.update("u", {"at_target": True})
    assert epochs_at_target(10, 3) == 8
    history = [{"ibp_err": 0.9, "at_target": False}, {"ibp_err": 0.5, "at_target": True}, {"ibp_err": 0.4, "at_target": True}]
    assert values_at_target(history, "ibp_err") == [0.5, 0.4]
