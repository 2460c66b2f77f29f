"""A trial's share of a search's seconds budget: no trial spends seconds it cannot be judged on within it.

Warmup-aware rungs judge a trial only once it trains at the target ε (tuner/run/schedulers.py), so the seconds
of its ramp are never compared: a costly method with a long ramp could take half a search's budget before its
first rung (issue 20's benchmark: one STAPS recipe took 44.8 % of it, all in its ramp). With a share cap, after
every epoch the trial's next judgment (its next rung, or its last epoch, whichever comes first) is predicted at
the cost of its last epoch; a trial that would pass the cap before it is stopped now, not at the cap. So an
expensive recipe is dropped after its first epoch when its ramp alone exceeds its share, and a trial that can
finish within its share is never stopped by it. Rules and numbers: docs/early_stopping.md.

The facts come from the trainer's result: `epoch`, `epochs`, `train_seconds` (all epochs so far, ramp
included) and `first_target_epoch`; a result without them is not capped (nothing to predict from).
"""
from __future__ import annotations

from typing import Callable

from tuner.study.verdict import is_finite_float

# A trial's share of the budget unless --max-trial-share says otherwise: a third. The search's ASHA keeps one trial in
# three at each rung (reduction factor 3), and no single trial, the winner included, should cost more than a third.
DEFAULT_TRIAL_SHARE = 1 / 3
NEEDED = ("epoch", "epochs", "train_seconds", "first_target_epoch")


class TrialShare:
    """Predicts, result by result, whether a trial can reach its next judgment within `cap_seconds` of training.
    Only data is kept (it is pickled with the scheduler); the scheduler's rungs come in with each call."""

    def __init__(self, cap_seconds: float):
        self.cap_seconds = cap_seconds
        self._last: dict[str, tuple[int, float]] = {}  # trial id -> (epoch, train_seconds) of its previous result
        self.stopped: set[str] = set()

    def exceeded(self, trial_id: str, result: dict, epochs_to_rung: Callable[[dict, float], int | None]) -> bool:
        """True when the trial's next judgment lies past the cap (the trial is then recorded as stopped here).
        `epochs_to_rung(result, epoch_seconds)` (the scheduler's) gives the epochs from this result to the trial's
        next rung, ramp included, or None when no rung is ahead."""
        if not all(is_finite_float(result.get(k)) for k in NEEDED):
            return False
        epoch, seconds = int(result["epoch"]), float(result["train_seconds"])
        per_epoch = self._epoch_seconds(trial_id, epoch, seconds)
        left = int(result["epochs"]) - epoch
        if left <= 0 or per_epoch <= 0:
            return False  # its last epoch: nothing more to spend
        to_rung = epochs_to_rung(result, per_epoch)
        epochs_to_judgment = left if to_rung is None else min(left, to_rung)
        if seconds + epochs_to_judgment * per_epoch <= self.cap_seconds:
            return False
        self.stopped.add(trial_id)
        return True

    def _epoch_seconds(self, trial_id: str, epoch: int, seconds: float) -> float:
        """The last epoch's seconds (the next one's best guess: a ramp epoch may cost more or less than one at
        target); the mean over its epochs when the previous result is not the epoch before (first, replayed)."""
        previous = self._last.get(trial_id)
        self._last[trial_id] = (epoch, seconds)
        if previous is not None and previous[0] == epoch - 1 and seconds > previous[1]:
            return seconds - previous[1]
        return seconds / max(epoch, 1)

    def forget(self, trial_id: str) -> None:
        self._last.pop(trial_id, None)
