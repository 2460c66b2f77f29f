"""The training loop: certified training per docs/method.md §2, one checkpoint per epoch, exact resume.

    Trainer(cfg, data_dir, out_dir).fit(on_epoch=callback)

Each step: the loss of the configured method at the scheduled ε (trainers/methods.py: one function per
method; the loop does not know which runs), plus λ·regularizers during warmup; clean CE while ε = 0.
"""
from __future__ import annotations

import errno
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .checkpoint import CheckpointError, WriteError, load_weights, save_checkpoint
from .config import TrainConfig
from .data import load_splits, make_loader
from .device import pick_device
from .evaluate import evaluate
from .files import open_append, write_atomic
from .init import apply_init
from .input_box import InputBox
from .methods import certified_loss, robust_ce  # noqa: F401 (robust_ce: re-exported for callers of this module)
from .models import build_model
from .run_dir import RunDir
from .schedules import EpsSchedule, StepPlan


class DivergedError(RuntimeError):
    """The loss or the bounds became NaN/inf; the run cannot continue."""


# The metrics that measure time, not the run: a resumed or repeated run differs only in these.
TIMING_METRICS = ("time_epoch_s", "samples_per_s", "train_seconds", "target_seconds")


class Trainer:
    def __init__(self, cfg: TrainConfig, data_dir=None, out_dir=None, device: str | None = "cpu",
                 progress: bool = False):
        self.cfg = cfg.resolve()
        self.device = pick_device(device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        # Certificates need full fp32 matmuls: TF32 would round the bounds.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

        torch.manual_seed(self.cfg.seed)
        self.splits = load_splits(self.cfg.dataset, data_dir, self.cfg.data, self.cfg.seed)
        self.box = InputBox.for_stats(self.splits.mean, self.splits.std, self.device)
        self.num_classes = self.splits.num_classes
        self.model = build_model(self.cfg.model, self.cfg.dataset, bn=self.cfg.bn)
        apply_init(self.model, self.cfg.init)
        self.model.to(self.device)
        self.train_loader = make_loader(self.splits.train, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed)
        self.val_loader = make_loader(self.splits.val, self.cfg.eval.batch_size, shuffle=False)
        self.optimizer = self._make_optimizer()
        # Every phase in steps (schedules.py): ε, the learning rate and the regularizer window are functions of
        # the global step alone, so a resumed run needs no scheduler state.
        self.plan = StepPlan.of(self.cfg, len(self.train_loader))
        self.eps_schedule = EpsSchedule.from_config(self.cfg.schedule, self.cfg.eps, len(self.train_loader))
        self.epoch = 0  # epochs completed
        self.step = 0  # global batch index
        self.best_ibp_err = math.inf
        self.train_seconds = 0.0  # wall time of all epochs so far (training and validation), kept on resume
        self.target_seconds = 0.0  # the part of it spent in epochs at the target ε (rungs in seconds)

    def _make_optimizer(self):
        params = self.model.parameters()
        if self.cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)

    # ---- one step ------------------------------------------------------------------------------
    def loss_terms(self, x01: Tensor, y: Tensor, eps_sched: float, reg_on: bool) -> dict[str, Tensor]:
        return certified_loss(self.model, self.box, self.cfg, self.num_classes, x01, y, eps_sched, reg_on)

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * self.plan.lr_factor(step, self.cfg.lr_decay)

    def train_step(self, x01: Tensor, y: Tensor) -> dict[str, float]:
        cfg = self.cfg
        eps_sched = self.eps_schedule(self.step)
        reg_on = cfg.uses_reg and self.step < self.plan.reg_end
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "loss_robust": 0.0, "loss_reg": 0.0}
        for xs, ys in zip(x01.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)):
            terms = self.loss_terms(xs, ys, eps_sched, reg_on)
            if not torch.isfinite(terms["loss"]):
                raise DivergedError(f"loss became {terms['loss'].item()} at epoch {self.epoch + 1}, "
                                    f"step {self.step}, eps {eps_sched:.6g}")
            (terms["loss"] / cfg.grad_accum).backward()
            for k in totals:
                totals[k] += float(terms[k].detach()) / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return totals | {"eps": eps_sched}

    # ---- one epoch ------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        epoch = self.epoch + 1
        self.model.train()
        # The shuffle order depends only on (seed, epoch), so a resumed run sees the same batches.
        self.train_loader.generator.manual_seed(self.cfg.seed * 100_003 + epoch)
        sums, n, eps = {"loss": 0.0, "loss_robust": 0.0, "loss_reg": 0.0}, 0, 0.0
        batches = self.train_loader
        if self.progress:
            from tqdm import tqdm
            batches = tqdm(batches, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False)
        start = time.perf_counter()
        for x01, y in batches:
            out = self.train_step(x01.to(self.device, non_blocking=True), y.to(self.device))
            for k in sums:
                sums[k] += out[k] * len(y)
            n += len(y)
            eps = out["eps"]
        elapsed = time.perf_counter() - start
        self.epoch = epoch
        return {k: v / n for k, v in sums.items()} | {"eps": eps, "time_epoch_s": elapsed,
                                                     "samples_per_s": n / elapsed}

    def validate(self) -> dict[str, float]:
        e = self.cfg.eval
        metrics = evaluate(self.model, self.val_loader, self.cfg.eps, self.box, self.num_classes,
                           e.metrics, e.pgd_steps, e.pgd_restarts, e.pgd_step_size, self.device)
        metrics.pop("n")
        return metrics

    # ---- the run --------------------------------------------------------------------------------
    def fit(self, on_epoch: Callable[[dict, Path | None], None] | None = None, restart: bool = False) -> dict:
        """Train to the last epoch, resuming from `out_dir/last.pt` when it holds this config's run
        (`restart`: set an old run aside and start over). See run_dir.py for what a start checks."""
        if self.out_dir is None:
            return self._fit(on_epoch)
        with RunDir.open(self.out_dir, self.cfg.to_dict(), restart, self.device) as run:
            if run.resume_state is not None:
                self.load_state(run.resume_state, run.path / "last.pt")
            with _disk_errors_as_one_line(self.out_dir):
                self.cfg.to_yaml(self.out_dir / "config.yaml")  # only now: every check above has passed
                return self._fit(on_epoch)

    def _fit(self, on_epoch) -> dict:
        metrics = {}
        while self.epoch < self.cfg.epochs:
            start = time.perf_counter()
            train = self.train_epoch()
            val = self.validate()
            epoch_seconds = time.perf_counter() - start
            at_target = self.epoch >= self.plan.first_target_epoch
            self.train_seconds += epoch_seconds
            self.target_seconds += epoch_seconds if at_target else 0.0
            first_step = (self.epoch - 1) * self.plan.batches_per_epoch
            # lr: the rate the next epoch starts with (as a per-epoch LR scheduler would show it).
            metrics = {"epoch": self.epoch, "epochs": self.cfg.epochs, "eps": train["eps"],
                       "eps_target": self.cfg.eps, "at_target": at_target, "lr": self.lr_at(self.step),
                       "batches_per_epoch": self.plan.batches_per_epoch,
                       "first_target_epoch": self.plan.first_target_epoch,
                       "reg_on": self.cfg.uses_reg and first_step < self.plan.reg_end,
                       "train_seconds": self.train_seconds, "target_seconds": self.target_seconds} | train | val
            self._check_finite(metrics)
            improved = at_target and metrics["ibp_err"] < self.best_ibp_err
            if improved:
                self.best_ibp_err = metrics["ibp_err"]
            metrics["best_ibp_err"] = self.best_ibp_err if math.isfinite(self.best_ibp_err) else None
            if self.out_dir is not None:
                self._write_epoch(metrics, improved)
            if on_epoch is not None:
                on_epoch(metrics, self.out_dir)
        return metrics

    def _check_finite(self, metrics: dict) -> None:
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise DivergedError(f"non-finite {', '.join(bad)} at epoch {metrics['epoch']}")

    def _write_epoch(self, metrics: dict, improved: bool) -> None:
        with open_append(self.out_dir / "metrics.jsonl") as f:  # never through a link (trainers/files.py)
            f.write(json.dumps(metrics) + "\n")
        state = self.state_dict()
        save_checkpoint(state, self.out_dir / "last.pt")
        if improved:
            save_checkpoint(state, self.out_dir / "best.pt")

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"config": self.cfg.to_dict(), "epoch": self.epoch, "step": self.step,
                "best_ibp_err": self.best_ibp_err, "train_seconds": self.train_seconds,
                "target_seconds": self.target_seconds, "model": self.model.state_dict(),
                # The learning rate is a function of the step (StepPlan); the key stays for the checkpoint format.
                "optimizer": self.optimizer.state_dict(), "lr_scheduler": {"last_step": self.step},
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "num_classes": self.num_classes, "mean": self.splits.mean, "std": self.splits.std}

    def load_state(self, state: dict, path: Path) -> None:
        """Continue from a checkpoint's state (read safely by checkpoint.load_checkpoint; same config)."""
        load_weights(self.model, state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.epoch, self.step = int(state["epoch"]), int(state["step"])
            self.best_ibp_err, self.train_seconds = float(state["best_ibp_err"]), float(state["train_seconds"])
            self.target_seconds = float(state.get("target_seconds", 0.0))  # absent in checkpoints before it
            torch.set_rng_state(state["rng_cpu"])
            if state.get("rng_cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng_cuda"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{path}: its training state is not certtune's: {' '.join(str(e).split())[:200]}"
                                  ) from None
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop metric lines of epochs after the checkpoint (written just before a crash), and a torn last line."""
        path = self.out_dir / "metrics.jsonl"
        if path.exists():
            lines = [line for line in path.read_text(errors="replace").splitlines() if _epoch_of(line) <= self.epoch]
            write_atomic(path, "".join(line + "\n" for line in lines))


DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


@contextmanager
def _disk_errors_as_one_line(out_dir: Path):
    """A full disk (or quota, or read-only file system) while writing the run is one line naming --out."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise WriteError(f"--out {out_dir}: cannot write {e.filename or 'the run'}: {e.strerror}") from None


def _epoch_of(line: str) -> float:
    """The epoch of a metrics line; a torn or foreign line counts as after every checkpoint (dropped)."""
    try:
        epoch = json.loads(line)["epoch"]
        return epoch if isinstance(epoch, int) else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf
