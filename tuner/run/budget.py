"""A search's compute budgets: trial-epochs (`--max-trial-epochs N`) and device-seconds (`--max-trial-seconds S`).

One trial-epoch is one epoch of one trial, the unit ASHA saves and the unit in which search arms are
compared (bench/search_quality.py). A device-second is one second of a trial's training (its reported
`train_seconds`) times the devices it holds: its GPUs if it holds any, else its CPUs (SearchRecord.seconds_weight),
so a CROWN-IBP epoch costs what it really costs. The budget counts, per trial, the furthest epoch and the
largest `train_seconds` it has reported (tuner/results/experiment.py), and stops the whole experiment once either sum
reaches its limit: no new trial starts and the running ones stop (they end as early-stopped, so they are
never exported as best). The trial whose result spends the budget is asked to stop through Ray's normal path,
but Ray ends the experiment's running trials without telling the searcher (Ray 2.60), so those Optuna trials
may stay RUNNING in the final study: never COMPLETE, so never learnt from as finished; Ray's records and
`certtune export` show them as stopped early. A retried trial's replayed epochs are not counted twice. On
`certtune resume` the count starts from the results already in the experiment, read from its storage (a local
directory or a URI such as s3://, through pyarrow.fs), so an interrupted search does not get its budget again.
"""
from __future__ import annotations

from pathlib import Path

from ray.tune import Stopper

from tuner.results.experiment import device_seconds, furthest_epoch, read_results, spent_by_trial, trained_seconds, trial_epochs


def epochs_reported(trial_dir: Path) -> int:
    """The furthest `epoch` in a trial directory's result.json (0 if none; a torn line is skipped)."""
    return furthest_epoch(read_results(trial_dir / "result.json"))


class SearchBudget(Stopper):
    """Stops the experiment once `max_trial_epochs` trial-epochs or `max_trial_seconds` device-seconds
    (each None: no limit) are spent. `experiment` (local path or URI) holds what was spent before a resume."""

    def __init__(self, max_trial_epochs: int | None, experiment: str | Path | None = None,
                 max_trial_seconds: float | None = None, seconds_weight: float = 1.0):
        self.max_trial_epochs = max_trial_epochs
        self.max_trial_seconds = max_trial_seconds
        self.seconds_weight = seconds_weight
        self.experiment = None if experiment is None else str(experiment)
        self._spent: dict[str, tuple[int, float]] | None = None  # trial id → (epoch, seconds); read lazily

    def _counts(self) -> dict[str, tuple[int, float]]:
        if self._spent is None:
            self._spent = {} if self.experiment is None else spent_by_trial(self.experiment)
        return self._spent

    @property
    def spent(self) -> int:
        """Trial-epochs spent."""
        return trial_epochs(e for e, _ in self._counts().values())

    @property
    def spent_seconds(self) -> float:
        """Device-seconds spent."""
        return device_seconds((s for _, s in self._counts().values()), self.seconds_weight)

    def __call__(self, trial_id: str, result: dict) -> bool:
        counts = self._counts()
        epoch, seconds = counts.get(trial_id, (0, 0.0))
        counts[trial_id] = (max(epoch, furthest_epoch([result])), max(seconds, trained_seconds([result])))
        # The trial whose result spends the budget is asked to stop; stop_all then ends the experiment.
        return self.stop_all()

    def stop_all(self) -> bool:
        return ((self.max_trial_epochs is not None and self.spent >= self.max_trial_epochs)
                or (self.max_trial_seconds is not None and self.spent_seconds >= self.max_trial_seconds))

    def reserve_reached(self, reserved_trials: int, finished: list[str], running: list[str]) -> bool:
        """Whether `reserved_trials` more trials still fit once the `running` ones end: each costing what the
        `finished` ones cost on average (a re-evaluation trains its point in full, as they did). True (time to
        stop exploring) once the spent budget, the running trials' rest and the reserve reach a limit."""
        if not reserved_trials or not finished:
            return False
        counts = self._counts()
        costs = [counts.get(t, (0, 0.0)) for t in finished]
        mean_epochs = sum(e for e, _ in costs) / len(costs)
        mean_seconds = sum(s for _, s in costs) / len(costs)
        rest = [counts.get(t, (0, 0.0)) for t in running]
        epochs = self.spent + sum(max(mean_epochs - e, 0) for e, _ in rest) + reserved_trials * mean_epochs
        seconds = self.spent_seconds + self.seconds_weight * (
            sum(max(mean_seconds - s, 0.0) for _, s in rest) + reserved_trials * mean_seconds)
        return ((self.max_trial_epochs is not None and epochs >= self.max_trial_epochs)
                or (self.max_trial_seconds is not None and seconds >= self.max_trial_seconds))

    def __getstate__(self):
        # Pickled with the experiment: the counts are re-read from storage on restore, not frozen here.
        return {**self.__dict__, "_spent": None}

    def __setstate__(self, state):
        if "experiment_dir" in state:  # pickled by TrialEpochBudget (before seconds budgets)
            state = {"max_trial_epochs": state["max_trial_epochs"], "experiment": state["experiment_dir"],
                     "max_trial_seconds": None, "seconds_weight": 1.0, "_spent": None}
        self.__dict__.update(state)


TrialEpochBudget = SearchBudget  # the name experiments pickled before the seconds budget: they still restore
