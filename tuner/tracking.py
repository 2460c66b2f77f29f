"""W&B for a search: one W&B run per trial, grouped by the search name; offline unless an API key is configured.

We use Ray's `WandbLoggerCallback` (driver side) rather than `setup_wandb` inside the trainable:
- Grouping: the callback sets `group` itself; we pass the search name explicitly.
- Trial restarts: when a trial fails and Ray retries it from its checkpoint, Ray calls `on_trial_recover`,
  not `on_trial_error`, so the callback keeps the trial's logging actor and its W&B run open and the retried
  epochs go to the same run (a replayed step, `step = training_iteration`, is dropped by W&B as
  non-increasing; resume is exact, so the values would be equal anyway).
- Multi-node: the logging actor is pinned to the driver's node, so losing a worker node loses no W&B run,
  and the offline files land in the trial's directory under the experiment (`<trial dir>/wandb/`).
- Trials stay free of W&B: a trial process never starts a W&B service.
After `certtune resume` the callback starts a fresh logging actor per unfinished trial: that trial gets a
second offline run directory with the same run id, into which its earlier epochs are replayed first, so the
newest directory holds the trial's whole history (the older one may be cut short by the killed driver).

The API key is never passed as an argument (Ray would pickle it into the experiment's `tuner.pkl`); W&B and
Ray read it from `WANDB_API_KEY` or `~/.netrc` themselves.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

from tuner.results import parse_result_lines

DEFAULT_HOST = "https://api.wandb.ai"


class FlushingLoggingActor(_WandbLoggingActor):
    """Ray's per-trial logging actor, returning only once W&B has written everything.

    `wandb.finish()` can return before the wandb-core service (a child process of the actor) has flushed
    the run file; Ray kills the actor, children included, as soon as `run` returns, which left offline runs
    cut short (a 7-byte file) when the cleanup came within milliseconds. `wandb.teardown()` waits for it.
    """

    def run(self):
        super().run()
        self._wandb.teardown()


class TrialWandbCallback(WandbLoggerCallback):
    """Ray's callback, with complete W&B files for every trial, restored trials' earlier epochs replayed,
    and quiet at interpreter exit."""

    _logger_actor_cls = FlushingLoggingActor

    def log_trial_start(self, trial):
        fresh = trial not in self._trial_logging_futures  # a retried trial keeps its logging actor and run
        super().log_trial_start(trial)
        if fresh:
            # A trial restored by `certtune resume` gets a new W&B run (same id): give it the epochs logged
            # before the driver died, so the new run holds the trial's whole history.
            for row in earlier_results(trial):
                self.log_trial_result(row["training_iteration"], trial, row)

    def on_experiment_end(self, trials, **info):
        super().on_experiment_end(trials, **info)  # waits until every trial's W&B run has finished writing
        for trial in trials:
            persist_wandb_files(trial)

    def __del__(self):  # Ray's calls ray.is_initialized(), which fails once the interpreter tore Ray down
        try:
            super().__del__()
        except (AttributeError, TypeError):
            pass


def earlier_results(trial) -> list[dict]:
    """The results a restored trial reported before the restore (up to its restored last result), from
    its result.json in the storage; [] for a new trial."""
    last = (trial.run_metadata.last_result or {}).get("training_iteration")
    if not last:
        return []
    try:
        with trial.storage.storage_filesystem.open_input_stream(f"{trial.path}/result.json") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    rows: dict[int, dict] = {}
    for row in parse_result_lines(text):  # a line cut by the crash is skipped
        step = row.get("training_iteration")
        if isinstance(step, int) and step <= last:
            rows[step] = row  # a replayed epoch: the latest report wins
    return [rows[step] for step in sorted(rows)]


def persist_wandb_files(trial) -> None:
    """Copy a trial's W&B directory from the driver's staging folder to the storage again.

    The W&B actors write into the trial's staging folder on the driver, which Ray syncs to the storage. Ray's
    final sync runs before the callbacks' `on_experiment_end`, where the runs of the last trials are still
    being finished, so without this copy their offline files in the storage would stay cut short.
    """
    import pyarrow.fs

    source = Path(trial.local_path) / "wandb"
    if source.is_dir():
        pyarrow.fs.copy_files(str(source), f"{trial.path}/wandb", source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=trial.storage.storage_filesystem)


def wandb_host() -> str:
    """The W&B server whose credentials count (`WANDB_BASE_URL` for a self-hosted server)."""
    return urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST).hostname or "api.wandb.ai"


def api_key_configured() -> bool:
    """True if W&B could log in online: `WANDB_API_KEY` is set or ~/.netrc (or $NETRC) has the host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(wandb_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str | None:
    """The mode to force: "offline" when no key is configured ("disabled" if the user asked for that);
    None lets W&B follow its own settings (online, or WANDB_MODE)."""
    if os.environ.get("WANDB_MODE") == "disabled":
        return "disabled"
    return None if api_key_configured() else "offline"


def wandb_callback(project: str | None, group: str):
    """The Tune callback logging every trial to W&B, or None when no project is given (W&B off)."""
    if not project:
        return None
    mode = wandb_mode()
    kwargs = {}
    if mode is not None:
        kwargs["mode"] = mode
        # Ray's callback checks for a key in the driver unless WANDB_MODE says offline/disabled.
        os.environ["WANDB_MODE"] = mode
    return TrialWandbCallback(project=project, group=group, log_config=False, **kwargs)


def prepare_resume(project: str | None) -> None:
    """Before `Tuner.restore`: the restored callback was pickled with its mode; make the driver agree."""
    if project:
        mode = wandb_mode()
        if mode is not None:
            os.environ["WANDB_MODE"] = mode
