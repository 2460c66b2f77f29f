"""Fidelities: the cheap trial is the target run compressed, not its first part or another run.

A search selects a recipe for its *target run*: the space's base config (its `epochs`, on its training set,
the full one unless `data.subset` says otherwise). A trial at a lower fidelity trains a cheaper run whose
schedule has the target run's shape in optimizer steps: the ε warmup's end, the ramp's end, every LR
milestone and the regularizer window fall at the same fraction of the run's steps (within one step:
trainers/schedules.py StepPlan). Budgeted training (Li, Yumer, Ramanan, ICLR 2020) compresses the whole
schedule into the budget; a truncated run would be judged before its LR decays (short-horizon bias, Wu et
al., ICLR 2018). docs/decisions.md ("Fidelities") says why these two.

- `target`: the target run itself.
- `epochs:E`: E epochs on the target's data, every phase scaled by E / target epochs (fractional epochs).
  Fewer steps, each as costly: a trial costs E / target epochs of a target run.
- `subset:N`: N training images, the batch scaled by N / the target's training images, so an epoch has the
  same number of steps (up to rounding) and the schedule, still in epochs, falls at the same steps. The
  same steps, each cheaper: a trial costs about N / the target's training images of a target run.

`trial_config` is the one place that maps a fidelity and a target config to a trial's config; export writes
the target config (the space's point), never a trial's.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainers.config import ConfigError, TrainConfig

KINDS = ("target", "epochs", "subset")


@dataclass(frozen=True)
class Fidelity:
    kind: str = "target"
    size: int = 0  # epochs (kind epochs) or training images (kind subset); 0 for the target

    @classmethod
    def parse(cls, text, where: str = "--fidelity") -> "Fidelity":
        """`target`, `epochs:E` or `subset:N` (E, N whole numbers >= 1)."""
        if not isinstance(text, str):
            raise ConfigError(f"{where}: expected target, epochs:E or subset:N, got {str(text)[:60]!r}")
        kind, sep, size = text.strip().partition(":")
        if kind == "target" and not sep:
            return cls()
        if kind not in KINDS[1:] or not sep or not size.strip().isdigit() or len(size.strip()) > 9:
            raise ConfigError(f"{where}: expected target, epochs:E or subset:N (E, N whole numbers), "
                              f"got {text[:60]!r}")
        if int(size) < 1:
            raise ConfigError(f"{where}: {kind} must be >= 1, got {text[:60]!r}")
        return cls(kind, int(size))

    def __str__(self) -> str:
        return self.kind if self.kind == "target" else f"{self.kind}:{self.size}"

    def check(self, target: TrainConfig, where: str = "--fidelity") -> None:
        """The fidelity is cheaper than the target run (checkable without the data)."""
        if self.kind == "epochs" and self.size >= target.epochs:
            raise ConfigError(f"{where}: {self} is not fewer than the target run's {target.epochs} epochs; "
                              f"use target")
        if self.kind == "subset" and target.data.subset and self.size >= target.data.subset:
            raise ConfigError(f"{where}: {self} is not fewer than the target run's {target.data.subset} "
                              f"training images (data.subset); use target")

    def trial_config(self, target: TrainConfig, train_images: int | None = None) -> TrainConfig:
        """The config a trial at this fidelity trains for `target`. `train_images`: the size of the training split
        with no subset (needed by `subset`, which scales the batch by the target's share of it)."""
        if self.kind == "target":
            return target
        self.check(target)
        if self.kind == "epochs":
            return compressed(target, self.size)
        if not train_images:
            raise ConfigError(f"fidelity {self}: needs the size of the training split")
        target_images = target.data.subset or train_images
        if self.size >= target_images:
            raise ConfigError(f"fidelity {self}: not fewer than the target run's {target_images} training images")
        accum = target.grad_accum
        batch = max(2, round(target.batch_size * self.size / target_images / accum)) * accum
        return target.with_overrides({"data.subset": self.size, "batch_size": batch}).resolve()

    def cost(self, target: TrainConfig, train_images: int | None = None) -> float:
        """A trial's cost as a fraction of the target run's (images processed, the measure of compute across
        fidelities of one recipe)."""
        if self.kind == "epochs":
            return self.size / target.epochs
        if self.kind == "subset" and train_images:
            return self.size / (target.data.subset or train_images)
        return 1.0


def compressed(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """`cfg` over `epochs` epochs with every phase at the same fraction of the run: the ε warmup and ramp, the LR
    milestones (fractional epochs are fractions of an epoch's steps)."""
    f = epochs / cfg.epochs
    s = cfg.schedule
    return cfg.with_overrides({"epochs": epochs, "schedule.start": _epochs(1 + (s.start - 1) * f),
                               "schedule.length": _epochs(s.length * f),
                               "lr_milestones": [_epochs(m * f) for m in cfg.lr_milestones]}).resolve()


def _epochs(x: float) -> int | float:
    """A whole number of epochs as an int, else the fraction (to 1e-9: configs stay readable)."""
    x = round(x, 9)
    return int(x) if float(x).is_integer() else x
