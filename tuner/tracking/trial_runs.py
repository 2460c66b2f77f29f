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

What a trial's run holds (`TrialWandbCallback.log_trial_start`, `TrialLoggingActor`):
- config: the trial's full resolved training config (base, sampled and derived values, as its config.yaml),
  plus `searched` (the sampled params, dotted names) and `search` (name, space, objectives, scheduler, sampler);
- `job_type="trial"`, tags (dataset, method, scheduler, sampler), `resume="allow"`: the resumed run of a
  restored trial is marked as a continuation, so `wandb sync` of both directories appends instead of
  replacing (wandb 0.31 syncs the files of one run one after the other, oldest first);
- `epoch` as the x-axis of every metric (`define_metric("*", step_metric="epoch")`);
- a summary saying how it ended (`status`: finished | stopped | failed, `reason`, `final/<objective>`), and
  exit code 1 for a failed trial, so W&B shows its run as failed;
- with `--wandb-artifacts`, a finished trial's `best.pt` as a `model` artifact (it travels in the trial's last
  checkpoint, so it reaches the driver from any node).
The search itself gets a run too (tuner/tracking/search_run.py): the trials table `certtune report` prints.

The API key is never passed as an argument (Ray would pickle it into the experiment's `tuner.pkl`); W&B and
Ray read it from `WANDB_API_KEY` or `~/.netrc` themselves.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from ray.air.integrations.wandb import WandbLoggerCallback, _QueueItem, _WandbLoggingActor

from tuner.tracking.outcome import ending
from tuner.results.experiment import is_number, parse_result_lines
from tuner.study.verdict import FAILED, FINISHED

DEFAULT_HOST = "https://api.wandb.ai"


SUMMARY, ARTIFACT = "certtune-summary", "certtune-artifact"  # our queue items, beside Ray's RESULT and END


class TrialLoggingActor(_WandbLoggingActor):
    """Ray's per-trial logging actor: `epoch` as every metric's x-axis, the ending in the summary, the model
    artifact, and returning only once W&B has written everything.

    `wandb.finish()` can return before the wandb-core service (a child process of the actor) has flushed
    the run file; Ray kills the actor, children included, as soon as `run` returns, which left offline runs
    cut short (a 7-byte file) when the cleanup came within milliseconds. `wandb.teardown()` waits for it.
    """

    def run(self):
        os.environ["WANDB_START_METHOD"] = "thread"
        run = self._wandb.init(*self.args, **self.kwargs)
        run.config.update({"trial_log_path": self._logdir}, allow_val_change=True)
        run.define_metric("epoch")
        run.define_metric("*", step_metric="epoch")
        exit_code = 0
        while True:
            kind, content = self.queue.get()
            if kind == _QueueItem.END:
                break
            if kind == SUMMARY:
                run.summary.update(content)
                exit_code = 1 if content.get("status") == FAILED else 0  # W&B shows the run as failed
            elif kind == ARTIFACT:
                path, name, metadata = content
                artifact = self._wandb.Artifact(name=name, type="model", metadata=metadata)
                artifact.add_file(path, name="best.pt")
                run.log_artifact(artifact, aliases=["best"])
            elif kind == _QueueItem.RESULT:
                log, config_update = self._handle_result(content)
                run.config.update(config_update, allow_val_change=True)
                run.log(log, step=log.get("training_iteration"))
        run.finish(exit_code=exit_code)
        self._wandb.teardown()


class TrialWandbCallback(WandbLoggerCallback):
    """Ray's callback, with each run telling its trial's whole story (module docstring), complete W&B files
    for every trial, restored trials' earlier epochs replayed, and quiet at interpreter exit."""

    _logger_actor_cls = TrialLoggingActor

    def __init__(self, record, **kwargs):
        super().__init__(project=record.wandb_project, group=record.name, log_config=False, **kwargs)
        self.record = record

    def log_trial_start(self, trial):
        fresh = trial not in self._trial_logging_futures  # a retried trial keeps its logging actor and run
        if fresh:
            self._start_logging_actor(trial, self._exclude_results + self.excludes + ["config"],
                                      **self.init_kwargs(trial))
            # A trial restored by `certtune resume` gets a new W&B run (same id): give it the epochs logged
            # before the driver died, so the new run holds the trial's whole history.
            for row in earlier_results(trial):
                self.log_trial_result(row["training_iteration"], trial, row)

    def init_kwargs(self, trial) -> dict:
        record = self.record
        config = run_config(record, dict(trial.config))
        tags = [str(config.get(k)) for k in ("dataset", "method") if config.get(k)]
        return dict(id=trial.trial_id, name=f"{record.name}/{trial.trial_id}", group=record.name,
                    project=self.project, job_type="trial", config=config, resume="allow", reinit=True,
                    allow_val_change=True,
                    tags=tags + [f"scheduler:{record.scheduler}", f"sampler:{record.sampler}"], **self.kwargs)

    def log_trial_end(self, trial, failed: bool = False):
        if trial in self._trial_queues:
            summary = ending_summary(trial, self.record.objective, failed)
            self._trial_queues[trial].put((SUMMARY, summary))
            finished = summary["status"] == FINISHED
            best = best_model(trial) if self.record.wandb_artifacts and finished else None
            if best is not None:
                params = {k: v for k, v in trial.config.items() if isinstance(v, (int, float, str, bool))}
                last = trial.last_result or {}
                self._trial_queues[trial].put((ARTIFACT, (str(best), f"{self.record.name}-{trial.trial_id}", {
                    "search": self.record.name, "trial_id": trial.trial_id, "params": params,
                    **{o: last.get(o) for o in self.record.objective}})))
        super().log_trial_end(trial, failed)

    def on_experiment_end(self, trials, **info):
        super().on_experiment_end(trials, **info)  # waits until every trial's W&B run has finished writing
        for trial in trials:
            persist_wandb_files(trial)

    def __del__(self):  # Ray's calls ray.is_initialized(), which fails once the interpreter tore Ray down
        try:
            super().__del__()
        except (AttributeError, TypeError):
            pass


def run_config(record, params: dict) -> dict:
    """A trial run's W&B config: the resolved training config the trial trains with (as its config.yaml:
    base, sampled and derived values), the sampled params as `searched`, and what the search is."""
    from tuner.space.search_space import SpaceError
    from trainers.config import ConfigError

    searched = {k: v for k, v in params.items() if k != "callbacks"}
    try:
        space = record.build_space()
        config = space.config_of(searched).to_dict()
    except (SpaceError, ConfigError):
        config = {}  # the trial reports why; its run still gets the searched values
    config["searched"] = searched
    config["search"] = {"name": record.name, "space": record.space_path, "objective": list(record.objective),
                        "scheduler": record.scheduler, "sampler": record.sampler, "seed": record.seed}
    return config


def ending_summary(trial, objectives: list[str], raised: bool) -> dict:
    """The summary keys saying how a trial ended: status, reason (if it failed), final objective values."""
    status, reason = ending(trial, objectives, raised)
    last = trial.last_result or {}
    summary = {"status": status, "reason": reason or "",
               "epochs_trained": last.get("epoch") if is_number(last.get("epoch")) else 0}
    for name in objectives:
        if is_number(last.get(name)):
            summary[f"final/{name}"] = last[name]
    return summary


def best_model(trial) -> Path | None:
    """The `best.pt` in the trial's last checkpoint, as a local file on the driver (copied out of remote
    storage into the trial's staging folder); None if there is none."""
    checkpoint = trial.checkpoint
    if checkpoint is None:
        return None
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        path = Path(checkpoint.path) / "best.pt"
        return path if path.is_file() else None
    local = Path(trial.local_path) / "best_model"
    local.mkdir(parents=True, exist_ok=True)
    try:
        pyarrow.fs.copy_files(f"{checkpoint.path}/best.pt", str(local / "best.pt"),
                              source_filesystem=checkpoint.filesystem,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
    except (OSError, FileNotFoundError):
        return None
    return local / "best.pt"


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


def wandb_callback(record):
    """The Tune callback logging every trial of the search to W&B, or None when it has no project (W&B off)."""
    if not record.wandb_project:
        return None
    mode = wandb_mode()
    kwargs = {}
    if mode is not None:
        kwargs["mode"] = mode
        # Ray's callback checks for a key in the driver unless WANDB_MODE says offline/disabled.
        os.environ["WANDB_MODE"] = mode
    return TrialWandbCallback(record, **kwargs)


def prepare_resume(project: str | None) -> None:
    """Before `Tuner.restore`: the restored callback was pickled with its mode; make the driver agree."""
    if project:
        mode = wandb_mode()
        if mode is not None:
            os.environ["WANDB_MODE"] = mode
