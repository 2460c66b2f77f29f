"""How a trial ended: the one home of the rules, read from the facts the trainer reports.

A trial reports `epoch`, `epochs`, `at_target` and its objectives each epoch, and `diverged` / `fail_reason`
when it cannot go on (tuner/run/trial.py). From those facts alone this module decides:
- its status for readers (`certtune report`, export, W&B, the driver's log): `trial_status`;
- what Optuna is told when it ends (COMPLETE, PRUNED or FAIL): `optuna_verdict`, `settled_state`;
- its failure reason in words: `diverged_reason`, `failure_reason`;
- its epochs at target ε (the unit of the ASHA rungs and of Optuna's steps): `TargetEpochCounter`,
  `epochs_at_target`, `values_at_target`.
No Ray or Optuna import: callers map the state names onto `optuna.trial.TrialState`.
"""
from __future__ import annotations

import math
from typing import Any

from tuner.study.keys import DIVERGED, FAIL_REASON

# A trial's status, as every reader names it.
FINISHED, STOPPED, FAILED, RUNNING, PENDING = "finished", "stopped", "failed", "running", "pending"
STATUSES = (FINISHED, STOPPED, FAILED, RUNNING, PENDING)
ENDED = (FINISHED, STOPPED, FAILED)
NO_RESULT = "ended without reporting a result"
RAISED = "the trial raised an error (see error.txt in its Ray trial directory)"
# What Optuna is told (names of optuna.trial.TrialState).
COMPLETE, PRUNED, FAIL = "COMPLETE", "PRUNED", "FAIL"


# ---- the status a reader shows --------------------------------------------------------------------
def trial_status(ray_status: str | None, last: dict, objectives: list[str],
                 lost_tail: str | None = None) -> tuple[str, str | None]:
    """(status, why it failed) per the contract: finished | stopped | failed | running | pending.

    `lost_tail` names a result file whose last line a crash tore, a result no other record holds: an ended
    trial whose last readable result is short of its final epoch may have finished, so it is not called
    stopped (which would drop it from the ranking unseen); it is failed as damaged, the file named."""
    if last.get(DIVERGED):
        return FAILED, diverged_reason(last[DIVERGED])
    if last.get(FAIL_REASON):
        return FAILED, str(last[FAIL_REASON])
    if ray_status == "ERROR":
        return FAILED, None
    has_epochs = is_number(last.get("epoch")) and is_number(last.get("epochs"))
    done = has_epochs and last["epoch"] >= last["epochs"]
    if done or ray_status == "TERMINATED":
        if not last:
            return FAILED, NO_RESULT
        if not has_epochs:
            return FAILED, "last result lacks 'epoch'/'epochs'"
        bad = [o for o in objectives if not is_finite(last.get(o))]
        if bad:
            return FAILED, f"{', '.join(bad)} missing or not finite at epoch {last['epoch']}"
        if not done and lost_tail:
            return FAILED, damaged_reason(lost_tail, last["epoch"], last["epochs"])
        return (FINISHED if done else STOPPED), None
    if last or ray_status in ("RUNNING", "PAUSED"):
        return RUNNING, None
    return PENDING, None


def after_spent_budget(status: str, error: str | None, reported: bool) -> tuple[str, str | None]:
    """A trial that started just as the search's budget ran out and ended before its first epoch was
    stopped by the budget, not failed."""
    if status == FAILED and not reported and error == NO_RESULT:
        return STOPPED, None
    return status, error


def damaged_reason(result_file: str, epoch: Any, epochs: Any) -> str:
    return (f"damaged: {result_file} lost its last line (torn) and Ray's state does not hold it; the last "
            f"readable result is epoch {epoch} of {epochs}, so whether the trial finished is unknown")


def diverged_reason(reason: Any) -> str:
    return f"diverged: {reason}"


def failure_reason(diverged: str | None, error: str | None, unknown: str = "unknown") -> str:
    """A failed trial's reason in words: its divergence, else its error, else `unknown`."""
    return diverged_reason(diverged) if diverged else (error or unknown)


# ---- what Optuna is told --------------------------------------------------------------------------
def optuna_verdict(result: dict | None, raised: bool, metrics: list[str]) -> tuple[str, list[float] | None, str | None]:
    """(state name, values for tell, fail reason) of a trial Ray has ended, from its last result.

    The first matching row decides:
      the trial raised                                FAIL
      no result at all                                PRUNED   (removed before it reported, e.g. experiment stopped)
      an objective is missing, NaN or inf             FAIL     (the trial's own fail_reason, else the bad values)
      last result lacks `epoch`/`epochs`              FAIL
      last result has `epoch < epochs`                PRUNED   (stopped early; Optuna keeps its last report)
      otherwise                                       COMPLETE with the final values
    """
    if raised:
        return FAIL, None, RAISED
    if not result:
        return PRUNED, None, None
    values = [result.get(m) for m in metrics]
    bad = [f"{m}={v!r}" for m, v in zip(metrics, values) if not is_finite_float(v)]
    if bad:
        reason = result.get(FAIL_REASON) or f"not finite at epoch {result.get('epoch')}: " + ", ".join(bad)
        return FAIL, None, str(reason)
    if "epoch" not in result or "epochs" not in result:
        return FAIL, None, ("last result lacks 'epoch'/'epochs', so a finished trial cannot be "
                            "told from an early-stopped one")
    if result["epoch"] < result["epochs"]:
        return PRUNED, None, None  # Optuna forbids values with PRUNED
    return COMPLETE, [float(v) for v in values], None


def settled_state(status: str) -> str:
    """What Optuna is told of a trial Ray ended without telling the searcher, from its reader's status."""
    return {FAILED: FAIL, FINISHED: COMPLETE}.get(status, PRUNED)


# ---- epochs at target ε ---------------------------------------------------------------------------
def epochs_at_target(epoch: int, first_target_epoch: int) -> int:
    """Epochs at target up to `epoch`: ε never leaves its target once reached (the schedule ramps, then holds)."""
    return epoch - first_target_epoch + 1


def values_at_target(history: list[dict], metric: str) -> list:
    """The metric at each epoch at target ε, in order: Optuna's intermediate values at steps 1, 2, ..."""
    return [r.get(metric) for r in history if r.get("at_target")]


class TargetEpochCounter:
    """Counts, per trial, the epochs reported with ε at its target (`at_target` True).

    The count up to a result is `epochs_at_target(epoch, first epoch at target)`. Computing it from epoch
    numbers, rather than counting results, keeps it right when a retried trial replays epochs it had already
    reported.
    """

    def __init__(self):
        self._first_at_target: dict[str, int] = {}

    def update(self, trial_id: str, result: dict) -> int | None:
        """Epochs at target up to and including this result; None while ε is still ramping."""
        if not result.get("at_target"):
            return None
        if "epoch" not in result:
            raise ValueError("a result with at_target=True has no 'epoch': the trainable must report "
                             "'epoch' (1-based) with every result")
        epoch = int(result["epoch"])
        # The trainer reports its first epoch at target (`first_target_epoch`); without it, the first result seen at
        # target stands in (after a resume that is the first epoch since, so the trainer's figure is preferred).
        reported = result.get("first_target_epoch")
        first = (int(reported) if is_number(reported) and 1 <= reported <= epoch
                 else min(self._first_at_target.get(trial_id, epoch), epoch))
        self._first_at_target[trial_id] = first
        return epochs_at_target(epoch, first)

    def forget(self, trial_id: str) -> None:
        self._first_at_target.pop(trial_id, None)


# ---- values -----------------------------------------------------------------------------------------
def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite(v: Any) -> bool:
    """A finite number as read from a result file (not a bool, not a string)."""
    return is_number(v) and math.isfinite(v)


def is_finite_float(value) -> bool:
    """True for a value that converts to a finite float (False for None, NaN, inf, strings): what Ray hands
    the scheduler and the searcher."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
