"""A search's compute budget in trial-epochs (`certtune search --max-trial-epochs N`).

One trial-epoch is one epoch of one trial, the unit ASHA saves and the unit in which search arms are
compared (bench/search_quality.py). The budget counts, per trial, the furthest epoch it has reported, and
stops the whole experiment once the sum reaches N: no new trial starts and the running ones stop (they
end as early-stopped, so they are never exported as best). The trial whose result spends the budget is
asked to stop through Ray's normal path, but Ray ends the experiment's running trials without telling the
searcher (Ray 2.60), so those Optuna trials may stay RUNNING in the final study: never COMPLETE, so never
learnt from as finished; Ray's records and `certtune export` show them as stopped early. A retried trial's
replayed epochs are not counted twice. On `certtune resume` the count starts from the results already in the
experiment directory, so an interrupted search does not get its budget again.
"""
from __future__ import annotations

from pathlib import Path

from ray.tune import Stopper

from tuner.results import furthest_epoch, read_results, trial_epochs


def epochs_reported(trial_dir: Path) -> int:
    """The furthest `epoch` in a trial directory's result.json (0 if none; a torn line is skipped)."""
    return furthest_epoch(read_results(trial_dir / "result.json"))


class TrialEpochBudget(Stopper):
    def __init__(self, max_trial_epochs: int, experiment_dir: str | Path | None = None):
        self.max_trial_epochs = max_trial_epochs
        self.experiment_dir = None if experiment_dir is None else str(experiment_dir)
        self._furthest: dict[str, int] | None = None  # trial id → furthest epoch; read lazily (see module doc)

    def _counts(self) -> dict[str, int]:
        if self._furthest is None:
            self._furthest = {}
            if self.experiment_dir is not None and Path(self.experiment_dir).is_dir():
                for trial_dir in Path(self.experiment_dir).glob("trial_*"):
                    self._furthest[trial_dir.name.removeprefix("trial_")] = epochs_reported(trial_dir)
        return self._furthest

    @property
    def spent(self) -> int:
        return trial_epochs(self._counts().values())

    def __call__(self, trial_id: str, result: dict) -> bool:
        counts = self._counts()
        counts[trial_id] = max(counts.get(trial_id, 0), furthest_epoch([result]))
        # The trial whose result spends the budget is asked to stop; stop_all then ends the experiment.
        return self.stop_all()

    def stop_all(self) -> bool:
        return self.spent >= self.max_trial_epochs

    def __getstate__(self):
        # Pickled with the experiment: the counts are re-read from disk on restore, not frozen here.
        return {"max_trial_epochs": self.max_trial_epochs, "experiment_dir": self.experiment_dir, "_furthest": None}
