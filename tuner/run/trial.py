"""One search trial: the sampled params → a TrainConfig → the same `Trainer.fit` as `certtune train`.

Ray calls the trainable with the trial's config (exactly the sampled params, dotted names). The trial
- rebuilds the search space from the search record (space file contents + the search's base overrides) and
  turns the point into a TrainConfig with `space.to_train_config`, as `certtune export` does;
- trains in a node-local run directory and reports every epoch's metrics, with a checkpoint at the last
  epoch and every `checkpoint_every_s` seconds before it (CheckpointClock). A checkpoint holds the trainer's
  own `last.pt`, `metrics.jsonl`, `config.yaml` and `best.pt` (once written; `export --verify` and W&B
  artifacts take it from the last checkpoint), so Ray can copy it to the storage;
- on a restart (a retry after a failure, a lost node, or `certtune resume`) copies `last.pt` from
  `tune.get_checkpoint()` into a clean run directory, and `Trainer.fit()` resumes from it exactly;
- ends a diverged run (DivergedError: loss or bounds NaN/inf) with a last result carrying `diverged` (the
  reason) and NaN objectives, then returns: divergence is deterministic, so it is not retried, and the
  searcher records FAIL with that reason. A sampled point the config rejects, and a ConfigError or DataError
  of the trainer (data missing on this node, a subset larger than the data), end the same way at once
  (`fail_reason` = "invalid config: ..." / "data: ..."): they would fail the same on every retry.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from ray import tune

from trainers.config import ConfigError, TrainConfig
from trainers.data import DataError, train_split_size
from trainers.schedules import first_target_epoch
from trainers.train import DivergedError, Trainer
from tuner.space.fidelity import Fidelity
from tuner.study.keys import DIVERGED, FAIL_REASON, SEED_OFFSET
from tuner.space.search_space import SearchSpace, SpaceError
from tuner.study.verdict import diverged_reason

# best.pt rides along once the trainer has written it: a restarted trial must get it back, or its final
# checkpoint would lack it (the trainer rewrites best.pt only when a later epoch beats the restored best).
CHECKPOINT_FILES = ("last.pt", "metrics.jsonl", "config.yaml", "best.pt")


def make_trainable(record) -> Callable[[dict], None]:
    """The Ray function trainable of a search, closed over its SearchRecord (see tuner/run/driver.py)."""

    def certtune_trial(config: dict) -> None:
        run_trial(config, record)

    return certtune_trial


# Ray logs every persisted checkpoint at INFO in the trial process; forwarded to the driver's log
# (log_to_driver), that is one line per trial and epoch. Restores and errors are still logged.
QUIET_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage")


def run_trial(config: dict, record) -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    space = record.build_space()
    try:
        cfg, full_data_share = trial_config(space, record, config)
    except (SpaceError, ConfigError, DataError) as e:
        # A sampled combination the config rejects fails the same way on every retry: end it now.
        kind = "data" if isinstance(e, DataError) else "invalid config"
        tune.report(failed_result(f"{kind}: {e}", record.objective))
        return
    cpus, gpus = record.resources_per_trial["cpu"], record.resources_per_trial.get("gpu", 0)
    torch.set_num_threads(max(1, int(cpus)))  # as many threads as the CPUs Ray reserved, not the node's
    out_dir = run_dir()
    epochs_done = restore_run(tune.get_checkpoint(), out_dir)
    try:
        trainer = Trainer(cfg, record.data_dir, out_dir, device="cuda" if gpus > 0 else "cpu")
    except (DataError, ConfigError) as e:
        # No data on this node, a subset larger than the data, a bad device: the same on every retry.
        tune.report(failed_result(f"{'data' if isinstance(e, DataError) else 'invalid config'}: {e}",
                                  record.objective))
        return

    clock = CheckpointClock(record.checkpoint_every_s)

    def report_epoch(metrics: dict, run: Path) -> None:
        nonlocal epochs_done
        epochs_done = metrics["epoch"]
        metrics = {**metrics, "full_data_epochs": metrics["epoch"] * full_data_share}
        if not clock.due(metrics["epochs"] - metrics["epoch"]):
            tune.report(metrics)
            return
        # The last epoch's checkpoint carries best.pt: `export --verify` certifies it (tuner/results/rerank.py) and
        # W&B logs it as an artifact (tuner/tracking/trial_runs.py).
        report_with_checkpoint(metrics, run)

    try:
        trainer.fit(on_epoch=report_epoch)
    except DivergedError as e:
        tune.report(diverged_result(cfg, epochs_done + 1, str(e), record.objective, trainer.train_seconds))


def trial_config(space: SearchSpace, record, config: dict) -> tuple[TrainConfig, float]:
    """What a trial trains, and what one of its epochs costs in epochs over the full training split.

    The target run is the space's point (seed + the re-evaluation's offset: tuner/study/reeval.py); the trial trains
    it at the search's fidelity (tuner/space/fidelity.py), the one mapping from a fidelity to a config."""
    target = space.config_of(config)
    offset = config.get(SEED_OFFSET) or 0
    if offset:
        target = target.with_overrides({"seed": (target.seed + int(offset)) % 2**32}).resolve()
    fidelity = Fidelity.parse(record.fidelity)
    if fidelity.kind != "subset" and not target.data.subset:
        return fidelity.trial_config(target), 1.0  # the full split: nothing to count
    images = full_train_images(target.dataset, record.data_dir, target.data.npz, target.data.val_size)
    cfg = fidelity.trial_config(target, images)
    return cfg, (cfg.data.subset or images) / images


@functools.lru_cache(maxsize=8)
def full_train_images(dataset: str, data_dir: str, npz: str | None, val_size: int) -> int:
    """The training split's size with no subset (read once per worker process: actors are reused)."""
    from trainers.config import DataConfig
    return train_split_size(dataset, data_dir, DataConfig(npz=npz, val_size=val_size))


class CheckpointClock:
    """When a trial saves a checkpoint: at its last epoch, and at another epoch once `every_s` seconds have
    passed since its last checkpoint (or its start), unless the last epoch's checkpoint is due within
    `every_s` anyway (at the pace of the epoch just done); every epoch when `every_s` is 0.

    A checkpoint per epoch made Ray snapshot the whole experiment after each one (CheckpointConfig's
    num_to_keep rule, tuner/run/driver.py), a cost that grows with the number of trials. Checkpoints at least
    `every_s` apart, two of them rarely within one snapshot period, keep the snapshots on Ray's own period;
    a crash loses at most about 2 × `every_s` of a running trial (docs/decisions.md)."""

    def __init__(self, every_s: float):
        self.every_s = float(every_s)
        self.last = self.previous = time.monotonic()

    def due(self, epochs_left: int) -> bool:
        now = time.monotonic()
        epoch_s, self.previous = now - self.previous, now
        if epochs_left > 0 and (now - self.last < self.every_s or epochs_left * epoch_s < self.every_s):
            return False
        self.last = now
        return True


def run_dir() -> Path:
    """Node-local: Ray's working directory of this trial (it chdirs there unless RAY_CHDIR_TO_TRIAL_DIR=0)."""
    if os.environ.get("RAY_CHDIR_TO_TRIAL_DIR") == "0":
        return Path(tempfile.gettempdir()) / "certtune_trials" / tune.get_context().get_trial_id() / "run"
    return Path.cwd() / "run"


def restore_run(checkpoint, out_dir: Path) -> int:
    """Make `out_dir` hold exactly the checkpoint's files (or nothing); the epochs it has completed.

    A file left over from an earlier attempt may be newer than what Ray recorded; the checkpoint is what
    the reported results agree with, so it always wins.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    if checkpoint is None:
        return 0
    try:
        with checkpoint.as_directory() as ckpt:
            for name in CHECKPOINT_FILES:
                if (Path(ckpt) / name).exists():
                    shutil.copy2(Path(ckpt) / name, out_dir / name)
    except OSError as e:
        # A checkpoint that cannot be read (Ray itself refuses to restore one whose directory is gone, so
        # this is a partial or unreadable copy): start over rather than fail.
        print(f"certtune: checkpoint {checkpoint.path} unreadable ({e}); the trial restarts from epoch 1",
              flush=True)
        for name in CHECKPOINT_FILES:
            (out_dir / name).unlink(missing_ok=True)
        return 0
    if not (out_dir / "last.pt").exists():
        return 0
    metrics = out_dir / "metrics.jsonl"
    return sum(1 for line in metrics.read_text().splitlines() if line) if metrics.exists() else 0


def report_with_checkpoint(metrics: dict, out_dir: Path, files: tuple[str, ...] = CHECKPOINT_FILES) -> None:
    """tune.report the epoch's metrics with a checkpoint of the run directory's resume files.

    Ray copies the checkpoint directory to the storage during report, so it is staged in a temporary
    directory (hard links where possible) and removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix=".checkpoint-", dir=out_dir.parent) as staging:
        for name in files:
            if (out_dir / name).exists():
                link_or_copy(out_dir / name, Path(staging) / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(staging))


def link_or_copy(src: Path, dst: Path) -> None:
    # metrics.jsonl is appended in place later, so only files the trainer replaces atomically are linked.
    if src.suffix == ".pt":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def failed_result(reason: str, objective: list[str]) -> dict:
    """The only result of a trial that cannot run: the reason and NaN objectives (Optuna: FAIL)."""
    return {FAIL_REASON: " ".join(reason.split()), **{m: math.nan for m in {"ibp_err", *objective}}}


def diverged_result(cfg, epoch: int, reason: str, objective: list[str], train_seconds: float) -> dict:
    """The last result of a diverged trial: the epoch it diverged in, the reason, NaN objectives."""
    result = {"epoch": epoch, "epochs": cfg.epochs, "eps_target": cfg.eps,
              "at_target": epoch >= first_target_epoch(cfg.schedule), "train_seconds": train_seconds,
              DIVERGED: reason, FAIL_REASON: diverged_reason(reason)}
    for name in {"ibp_err", *objective}:
        result[name] = math.nan
    return result
