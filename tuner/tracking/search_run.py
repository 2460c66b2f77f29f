"""The search-level W&B run: the trials table `certtune report` prints, and the search's counts and best trial.

Logged by the driver when a search or resume ends (tuner/run/driver.py `finish`), in the same project and group as
the trials' runs, `job_type="search"`. Its id is derived from the search name and where the experiment lives,
with `resume="allow"`: after `certtune resume` the same run gets the table again, now complete (the table is
logged at step = the trial-epochs spent, so a later, fuller table is a later step). Offline files go to
`<experiment>/wandb/` (for remote storage: written locally, then copied there).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tuner.space.record import is_uri
from tuner.results.report import ordered_trials, trial_rows
from tuner.results.experiment import Search
from tuner.tracking.trial_runs import wandb_mode
from tuner.study.verdict import failure_reason

TABLE = "trials"


def search_run_id(search: Search) -> str:
    digest = hashlib.sha1(search.location.encode()).hexdigest()[:8]
    return f"search-{search.name}-{digest}"


def trials_table(search: Search) -> tuple[list[str], list[list[str]]]:
    """The report's table (same columns, same order, every trial) plus each failed trial's reason."""
    trials = ordered_trials(search)
    header, rows = trial_rows(search, trials)
    reasons = [failure_reason(t.diverged, t.error, "") for t in trials]
    return header + ["reason"], [row + [reason] for row, reason in zip(rows, reasons)]


def search_summary(search: Search) -> dict:
    summary = {f"trials/{status}": n for status, n in search.counts().items()}
    summary["trial_epochs"] = search.trial_epochs()
    best = search.best()
    if best is not None:
        summary["best/trial_id"] = best.trial_id
        summary.update({f"best/{o}": best.value(o) for o in search.objectives})
    return summary


def log_search_run(search: Search, storage: str) -> None:
    """One W&B run for the search, holding the trials table; offline unless an API key is configured.
    A W&B failure (network, quota) is one line on stderr: the search's own results are already saved."""
    try:
        _log_search_run(search, storage)
    except Exception as e:  # noqa: BLE001 - W&B raises many kinds; none of them should hide the summary
        print(f"certtune: the W&B search run was not logged: {' '.join(str(e).split())[:300]}",
              file=sys.stderr, flush=True)


def _log_search_run(search: Search, storage: str) -> None:
    import wandb

    record = search.record
    mode = wandb_mode()
    local = tempfile.mkdtemp(prefix="certtune-wandb-") if is_uri(storage) else search.location
    header, rows = trials_table(search)
    config = {"objective": list(record.objective), "modes": list(record.modes), "scheduler": record.scheduler,
              "sampler": record.sampler, "seed": record.seed, "num_samples": record.num_samples,
              "max_trial_epochs": record.max_trial_epochs, "space": record.space_path,
              "overrides": json.loads(json.dumps(record.overrides, default=str)), "experiment": search.location}
    run = wandb.init(project=record.wandb_project, group=record.name, job_type="search",
                     name=f"{record.name} (search)", id=search_run_id(search), resume="allow", dir=local,
                     config=config, tags=["search", f"scheduler:{record.scheduler}", f"sampler:{record.sampler}"],
                     reinit="create_new", **({"mode": mode} if mode else {}))
    try:
        run.log({TABLE: wandb.Table(columns=header, data=rows)},
                step=search.trial_epochs())
        run.summary.update(search_summary(search))
    finally:
        run.finish()
        wandb.teardown()
    if is_uri(storage):
        import pyarrow.fs

        pyarrow.fs.copy_files(os.path.join(local, "wandb"), f"{search.location}/wandb",
                              source_filesystem=pyarrow.fs.LocalFileSystem())
        shutil.rmtree(local, ignore_errors=True)


def table_rows(path: Path) -> tuple[list[str], list[list]]:
    """(columns, rows) of a table file W&B wrote (`<run>/files/media/table/*.table.json`)."""
    data = json.loads(Path(path).read_text())
    return data["columns"], data["data"]
