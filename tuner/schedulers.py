"""Early stopping for certified training: ASHA whose rungs count epochs at the target ε.

While ε ramps up, the verified error at the target ε mostly says how far the ramp has got, not how good
the trial is, so trials with different ramp lengths cannot be compared there. `WarmupAwareASHA` therefore
measures progress in epochs at target ε and never judges (or stops) a trial during its ramp.
The rule and a worked example: docs/early_stopping.md.
"""
from __future__ import annotations

import math

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from trainers.config import ConfigError
from tuner.keys import CONFIG_OF

EPOCHS_AT_TARGET = "epochs_at_target"
SCHEDULER_KINDS = ("asha", "plain-asha", "none")


class TargetEpochCounter:
    """Counts, per trial, the epochs reported with ε at its target (`at_target` True).

    ε never leaves its target once reached (the schedule ramps, then holds), so the count up to a result
    is `epoch - first_epoch_at_target + 1`. Computing it from epoch numbers, rather than counting
    results, keeps it right when a retried trial replays epochs it had already reported.
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
        first = min(self._first_at_target.get(trial_id, epoch), epoch)
        self._first_at_target[trial_id] = first
        return epoch - first + 1

    def forget(self, trial_id: str) -> None:
        self._first_at_target.pop(trial_id, None)


class WarmupAwareASHA(AsyncHyperBandScheduler):
    """Ray's ASHA (one bracket) with progress counted in epochs at target ε.

    Rungs sit at `grace_period * reduction_factor**k` epochs at target, up to `max_epochs_at_target`.
    A trial reaching a rung is stopped if its metric is worse than the (1 - 1/rf) quantile of the values
    recorded at that rung, exactly as in ASHA. Results during the ramp carry no progress, so Ray's ASHA
    skips them: never recorded at a rung, never a stop. A non-finite metric at target stops the trial
    (it cannot be ranked and a diverged model does not recover).

    `stop_last_trials` defaults to False: the trainable owns its budget (`epochs`) and the scheduler only
    stops at rungs, so "stopped by the scheduler" always means "lost at a rung". With True, a trial is also
    stopped once it reaches `max_epochs_at_target` (Ray's default behaviour).
    """

    def __init__(self, metric: str | None = None, mode: str | None = None, max_epochs_at_target: int = 100,
                 grace_period: int = 1, reduction_factor: float = 3, stop_last_trials: bool = False):
        check_asha_args(mode, max_epochs_at_target, grace_period, reduction_factor)
        super().__init__(time_attr=EPOCHS_AT_TARGET, metric=metric, mode=mode, max_t=max_epochs_at_target,
                         grace_period=grace_period, reduction_factor=reduction_factor, brackets=1,
                         stop_last_trials=stop_last_trials)
        self._progress = TargetEpochCounter()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if is_rerun(trial):
            return TrialScheduler.CONTINUE  # a re-evaluation runs its whole length: it is a seed, not a rival
        judged = self._with_progress(trial.trial_id, result)
        if EPOCHS_AT_TARGET in judged and not is_finite(judged.get(self._metric, 0.0)):
            self._num_stopped += 1
            return TrialScheduler.STOP
        return super().on_trial_result(tune_controller, trial, judged)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if not is_rerun(trial):
            super().on_trial_complete(tune_controller, trial, self._with_progress(trial.trial_id, result))
        self._progress.forget(trial.trial_id)

    def _with_progress(self, trial_id: str, result: dict) -> dict:
        """A copy of `result` carrying our own `epochs_at_target` (absent during the ramp, so ASHA skips it).

        A copy, because Ray hands the same dict to the searcher and the loggers afterwards; any
        `epochs_at_target` the trainable reported itself is replaced, since the rule must not depend on it.
        """
        judged = {k: v for k, v in result.items() if k != EPOCHS_AT_TARGET}
        progress = self._progress.update(trial_id, result)
        if progress is not None:
            judged[EPOCHS_AT_TARGET] = progress
        return judged


def make_scheduler(kind: str, metric: str, mode: str, max_epochs_at_target: int, grace_period: int = 1,
                   reduction_factor: float = 3, stop_last_trials: bool = False) -> TrialScheduler | None:
    """The early-stopping scheduler for a search.

    kind: "asha" (warmup-aware, the default choice), "plain-asha" (Ray's stock ASHA over
    training_iteration, for comparison benchmarks: rungs at the same numbers but counted in epochs since
    the start, ramp included) or "none" (every trial runs its full budget).
    """
    if kind not in SCHEDULER_KINDS:
        raise ConfigError(f"scheduler: {kind!r} is not one of {', '.join(SCHEDULER_KINDS)}")
    if kind == "none":
        return None
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"scheduler metric: expected a reported metric name such as 'ibp_err', got {metric!r}")
    check_asha_args(mode, max_epochs_at_target, grace_period, reduction_factor)
    if kind == "asha":
        return WarmupAwareASHA(metric=metric, mode=mode, max_epochs_at_target=max_epochs_at_target,
                               grace_period=grace_period, reduction_factor=reduction_factor,
                               stop_last_trials=stop_last_trials)
    return AsyncHyperBandScheduler(time_attr="training_iteration", metric=metric, mode=mode,
                                   max_t=max_epochs_at_target, grace_period=grace_period,
                                   reduction_factor=reduction_factor, brackets=1,
                                   stop_last_trials=stop_last_trials)


def is_rerun(trial) -> bool:
    """A re-evaluation trial (tuner/reeval.py): its config names the trial whose point it trains again."""
    return CONFIG_OF in (getattr(trial, "config", None) or {})


def check_asha_args(mode: str | None, max_t: int, grace_period: int, reduction_factor: float) -> None:
    """Ray only asserts these; say which argument is wrong and what is allowed."""
    if mode is not None and mode not in ("min", "max"):
        raise ConfigError(f"scheduler mode: must be 'min' or 'max', got {mode!r}")
    if not isinstance(grace_period, int) or grace_period < 1:
        raise ConfigError(f"scheduler grace_period: must be an integer >= 1, got {grace_period!r}")
    if not isinstance(max_t, int) or max_t < grace_period:
        raise ConfigError(f"scheduler max_epochs_at_target: must be an integer >= grace_period "
                          f"({grace_period}), got {max_t!r}")
    if not isinstance(reduction_factor, (int, float)) or reduction_factor <= 1:
        raise ConfigError(f"scheduler reduction_factor: must be > 1, got {reduction_factor!r}")


def is_finite(value) -> bool:
    """True for a value that converts to a finite float (False for None, NaN, inf, strings)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
