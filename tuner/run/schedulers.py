"""Early stopping for certified training: ASHA whose rungs count progress at the target ε.

While ε ramps up, the verified error at the target ε mostly says how far the ramp has got, not how good
the trial is, so trials with different ramp lengths cannot be compared there. `WarmupAwareASHA` therefore
measures progress only at target ε and never judges (or stops) a trial during its ramp: in epochs at target
(`rungs="epochs"`), or in seconds trained at target (`rungs="seconds"`, the trainer's `target_seconds`), so
that methods whose epochs cost up to 10x more meet at their rungs after equal compute, not equal epochs.
The rule and a worked example: docs/early_stopping.md.
"""
from __future__ import annotations

import json
import math
import time

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from trainers.config import ConfigError
from tuner.run.trial_share import TrialShare
from tuner.space.record import first_line, write_text_on
from tuner.study.keys import CONFIG_OF, STOP_REASON_FILE
from tuner.study.verdict import TargetEpochCounter, is_finite_float

EPOCHS_AT_TARGET = "epochs_at_target"
SECONDS_AT_TARGET = "seconds_at_target"
SCHEDULER_KINDS = ("asha", "plain-asha", "none")
RUNG_UNITS = ("epochs", "seconds")
# Rungs in seconds reach this many times the first trial's whole time at target, so a trial whose epochs cost
# that much more is still compared at its rungs.
SECONDS_SPAN = 100


class WarmupAwareASHA(AsyncHyperBandScheduler):
    """Ray's ASHA (one bracket) with progress counted at target ε: in epochs, or in seconds.

    Rungs sit at `grace_period * reduction_factor**k` epochs at target, up to `max_epochs_at_target`.
    A trial reaching a rung is stopped if its metric is worse than the (1 - 1/rf) quantile of the values
    recorded at that rung, exactly as in ASHA. Results during the ramp carry no progress, so Ray's ASHA
    skips them: never recorded at a rung, never a stop. A non-finite metric at target stops the trial
    (it cannot be ranked and a diverged model does not recover).

    `stop_last_trials` defaults to False: the trainable owns its budget (`epochs`) and the scheduler only
    stops at rungs (and, with a trial share, a trial that cannot reach its next rung or its end within its
    share), never for having trained long enough. With True, a trial is also
    stopped once it reaches `max_epochs_at_target` (Ray's default behaviour).

    With `rungs="seconds"`, progress is a trial's seconds trained at target (`target_seconds`, reported by the
    trainer with every epoch). The rungs sit at `grace_seconds * reduction_factor**k`; without `grace_seconds`
    the first epoch at target any trial reports sets it (its seconds), which places the first rung at one
    epoch at target of the first trial (the space's defaults point, run first), and the rungs reach
    SECONDS_SPAN times that trial's whole time at target (`max_epochs_at_target` epochs of it).

    With `trial_seconds_cap` (the search's `--max-trial-share` of its seconds budget, in a trial's own training
    seconds), a trial that cannot reach its next rung or its end within the cap is stopped now
    (tuner/run/trial_share.py): its ramp, which the rungs never judge, is bounded too.
    """

    share: TrialShare | None = None  # what a scheduler pickled with an experiment before the cap restores as

    def __init__(self, metric: str | None = None, mode: str | None = None, max_epochs_at_target: int = 100,
                 grace_period: int = 1, reduction_factor: float = 3, stop_last_trials: bool = False,
                 rungs: str = "epochs", grace_seconds: float | None = None, trial_seconds_cap: float | None = None):
        check_asha_args(mode, max_epochs_at_target, grace_period, reduction_factor)
        check_rungs(rungs, grace_seconds)
        self.share = None if trial_seconds_cap is None else TrialShare(trial_seconds_cap)
        seconds = rungs == "seconds"
        super().__init__(time_attr=SECONDS_AT_TARGET if seconds else EPOCHS_AT_TARGET, metric=metric, mode=mode,
                         max_t=max_epochs_at_target, grace_period=grace_period, reduction_factor=reduction_factor,
                         brackets=1, stop_last_trials=stop_last_trials)
        self._progress = TargetEpochCounter()
        self._max_epochs_at_target = max_epochs_at_target
        self._rungs_set = not seconds  # rungs in seconds are placed by grace_seconds or the first epoch at target
        if seconds and grace_seconds is not None:
            self._place_second_rungs(grace_seconds)

    def _place_second_rungs(self, grace: float) -> None:
        from ray.tune.schedulers.async_hyperband import _Bracket

        self._max_t = grace * self._max_epochs_at_target * SECONDS_SPAN
        self._brackets = [_Bracket(grace, self._max_t, self._reduction_factor, 0,
                                   stop_last_trials=self._stop_last_trials)]
        self._trial_info = {trial_id: self._brackets[0] for trial_id in self._trial_info}
        self._rungs_set = True

    @property
    def rungs(self) -> list[float]:
        """The rung levels, lowest first (in epochs or seconds at target); [] until rungs in seconds are placed."""
        return sorted(milestone for milestone, _ in self._brackets[0]._rungs) if self._rungs_set else []

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if is_rerun(trial):
            return TrialScheduler.CONTINUE  # a re-evaluation runs its whole length: it is a seed, not a rival
        judged = self._with_progress(trial.trial_id, result)
        if self._time_attr in judged and not is_finite_float(judged.get(self._metric, 0.0)):
            self._num_stopped += 1
            return TrialScheduler.STOP
        decision = super().on_trial_result(tune_controller, trial, judged)
        if decision == TrialScheduler.STOP:  # stop_last_trials aside (off in a search), Ray's ASHA stops at a rung
            record_stop(trial, "rung", judged)  # (a rung on a trial's last epoch stops nothing: no marker then)
        elif self.share is not None and self.share.exceeded(trial.trial_id, judged, self.epochs_to_next_rung):
            self._num_stopped += 1
            record_stop(trial, "share", judged)
            return TrialScheduler.STOP
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if not is_rerun(trial):
            super().on_trial_complete(tune_controller, trial, self._with_progress(trial.trial_id, result))
        self._progress.forget(trial.trial_id)
        if self.share is not None:
            self.share.forget(trial.trial_id)

    def epochs_to_next_rung(self, judged: dict, epoch_seconds: float) -> int | None:
        """Epochs from a judged result (`_with_progress`) to the trial's next rung, its remaining ramp included (None:
        no rung ahead). Rungs in seconds not yet placed: the first epoch at target places them, so that epoch is the
        next judgment."""
        epoch, first = int(judged["epoch"]), int(judged["first_target_epoch"])
        ramp_left = max(0, first - 1 - epoch)
        if not self._rungs_set:
            return ramp_left + 1
        done = float(judged.get(self._time_attr, 0.0))  # the progress ASHA judged (absent during the ramp)
        ahead = [rung for rung in self.rungs if rung > done]
        if not ahead:
            return None
        if self._time_attr == EPOCHS_AT_TARGET:
            return ramp_left + math.ceil(ahead[0] - done)  # Ray judges at progress >= rung
        # less a hair: seconds summed epoch by epoch that land on a rung are not an epoch short of it
        return ramp_left + max(1, math.ceil((ahead[0] - done) / epoch_seconds - 1e-9))

    def _with_progress(self, trial_id: str, result: dict) -> dict:
        """A copy of `result` carrying our own `epochs_at_target` (absent during the ramp, so ASHA skips it).

        A copy, because Ray hands the same dict to the searcher and the loggers afterwards; any
        `epochs_at_target` the trainable reported itself is replaced, since the rule must not depend on it.
        """
        judged = {k: v for k, v in result.items() if k not in (EPOCHS_AT_TARGET, SECONDS_AT_TARGET)}
        progress = self._progress.update(trial_id, result)
        if progress is None:
            return judged
        if self._time_attr == EPOCHS_AT_TARGET:
            judged[EPOCHS_AT_TARGET] = progress
            return judged
        seconds = result.get("target_seconds")
        if not is_finite_float(seconds) or float(seconds) <= 0:
            return judged  # no seconds at target reported: nothing to judge on
        if not self._rungs_set:
            self._place_second_rungs(float(seconds))
        judged[SECONDS_AT_TARGET] = float(seconds)
        return judged


def record_stop(trial, reason: str, result: dict) -> None:
    """Leave STOP_REASON_FILE in the trial's directory, so report and export say which rule stopped it (a trial the
    search's budget ended has none). Written through Ray's own storage of the trial, which Ray rebases when a
    search resumes where its experiment is now; a failure to write costs the label, never the search."""
    storage = getattr(trial, "storage", None)
    epoch, epochs = result.get("epoch"), result.get("epochs")
    if storage is None or (is_finite_float(epoch) and is_finite_float(epochs) and epoch >= epochs):
        return  # a stub trial (a scheduler driven by hand); or its last epoch, where a stop stops nothing
    note = json.dumps({"by": reason, "epoch": epoch, "at": time.time()}) + "\n"
    try:
        write_text_on(storage.storage_filesystem, f"{storage.trial_fs_path}/{STOP_REASON_FILE}", note)
    except Exception as e:  # noqa: BLE001 -- a full disk, a lost bucket, Arrow's own errors: the search goes on
        print(f"certtune: could not record why trial {trial.trial_id} stopped ({reason}): {first_line(e)}; "
              f"report will call it stopped by the budget", flush=True)


def make_scheduler(kind: str, metric: str, mode: str, max_epochs_at_target: int, grace_period: int = 1,
                   reduction_factor: float = 3, stop_last_trials: bool = False, rungs: str = "epochs",
                   grace_seconds: float | None = None, trial_seconds_cap: float | None = None) -> TrialScheduler | None:
    """The early-stopping scheduler for a search.

    kind: "asha" (warmup-aware, the default choice), "plain-asha" (Ray's stock ASHA over
    training_iteration, for comparison benchmarks: rungs at the same numbers but counted in epochs since
    the start, ramp included) or "none" (every trial runs its full budget). `trial_seconds_cap`: the most
    training seconds one trial may take (warmup-aware ASHA only; tuner/run/trial_share.py).
    """
    if kind not in SCHEDULER_KINDS:
        raise ConfigError(f"scheduler: {kind!r} is not one of {', '.join(SCHEDULER_KINDS)}")
    if trial_seconds_cap is not None and kind != "asha":
        raise ConfigError("--max-trial-share: only the warmup-aware scheduler (--scheduler asha) caps a trial's share")
    if kind == "none":
        return None
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"scheduler metric: expected a reported metric name such as 'ibp_err', got {metric!r}")
    check_asha_args(mode, max_epochs_at_target, grace_period, reduction_factor)
    if kind == "asha":
        return WarmupAwareASHA(metric=metric, mode=mode, max_epochs_at_target=max_epochs_at_target,
                               grace_period=grace_period, reduction_factor=reduction_factor,
                               stop_last_trials=stop_last_trials, rungs=rungs, grace_seconds=grace_seconds,
                               trial_seconds_cap=trial_seconds_cap)
    if rungs != "epochs":
        raise ConfigError("--rungs seconds: only the warmup-aware scheduler (--scheduler asha) has rungs in seconds")
    return AsyncHyperBandScheduler(time_attr="training_iteration", metric=metric, mode=mode,
                                   max_t=max_epochs_at_target, grace_period=grace_period,
                                   reduction_factor=reduction_factor, brackets=1,
                                   stop_last_trials=stop_last_trials)


def check_rungs(rungs: str, grace_seconds: float | None) -> None:
    if rungs not in RUNG_UNITS:
        raise ConfigError(f"--rungs: {str(rungs)[:40]!r} is not one of {', '.join(RUNG_UNITS)}")
    if grace_seconds is not None and not (is_finite_float(grace_seconds) and 0 < float(grace_seconds) <= 10**7):
        raise ConfigError(f"--grace-seconds: must be seconds in (0, 1e7], got {str(grace_seconds)[:40]!r}")
    if grace_seconds is not None and rungs != "seconds":
        raise ConfigError("--grace-seconds: goes with --rungs seconds")


def default_rungs(searched: list[str]) -> str:
    """Seconds where trials differ in cost per epoch by design (the space searches `method`), epochs elsewhere."""
    return "seconds" if "method" in searched else "epochs"


def is_rerun(trial) -> bool:
    """A re-evaluation trial (tuner/study/reeval.py): its config names the trial whose point it trains again."""
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
