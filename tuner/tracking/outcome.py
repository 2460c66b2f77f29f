"""How a trial ended, in words: for the driver's log (`TrialOutcomeLog`) and each trial's W&B summary.

A trial ends `finished` (its last epoch), `stopped` (early, by the scheduler or the trial-epoch budget) or
`failed` (diverged, a config or data error it reported, or an exception Ray gave up retrying), with the same
rule `certtune report` uses (`tuner.study.verdict.trial_status`). The trial processes' own output is forwarded to the
driver by Ray (`log_to_driver`); this callback adds one line per failed or retried trial that does not depend
on that forwarding, since a diverged trial ends normally and Ray itself prints nothing about it.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ray.tune import Callback

from tuner.results.experiment import last_line
from tuner.study.verdict import FAILED, trial_status


def ending(trial, objectives: list[str], raised: bool = False) -> tuple[str, str | None]:
    """(status, reason) of a trial Ray has ended: completed, or (`raised`) errored with no retry left."""
    if raised:
        return FAILED, error_text(trial)
    return trial_status("TERMINATED", trial.last_result or {}, objectives)


def error_text(trial) -> str:
    """The last line of the trial's error.txt (the exception), as the driver has it."""
    path = trial.error_file
    return last_line(Path(path)) if path and Path(path).is_file() else "the trial raised (no error.txt)"


class TrialOutcomeLog(Callback):
    """Prints, in the driver, why a trial failed or is retried: `certtune: trial <id> failed: <reason>`."""

    def __init__(self, objectives: list[str]):
        self.objectives = list(objectives)

    def on_trial_complete(self, iteration, trials, trial, **info):
        status, reason = ending(trial, self.objectives)
        if status == FAILED:
            say(f"trial {trial.trial_id} failed: {reason}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        say(f"trial {trial.trial_id} raised and is retried from its last checkpoint: {error_text(trial)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"trial {trial.trial_id} failed: {error_text(trial)}")


def say(line: str) -> None:
    print(f"certtune: {' '.join(line.split())}", file=sys.stderr, flush=True)
