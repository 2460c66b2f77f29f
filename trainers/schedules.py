"""ε, learning-rate and λ schedules (docs/method.md §3, §1c). Steps are global batch indices s = 0, 1, …; batch s
trains at ε(s) with the learning rate lr(s).

A config gives its schedule in epochs (`schedule.start`, `schedule.length`, `lr_milestones`), whole or
fractional: a fractional epoch is that fraction of the epoch's batches, so a run compressed to fewer epochs
(tuner/space/fidelity.py) keeps every phase at the same fraction of its steps. `StepPlan` turns the epochs into
steps once; the trainer, the search and the tests read the plan, so they agree on where each phase falls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class EpsSchedule:
    eps_target: float
    s0: int  # last step at ε = 0: (start − 1)·L
    s1: int  # first step at ε_target: (start + length − 1)·L
    kind: str = "smoothed"
    mid: float = 0.25
    beta: float = 4.0

    @classmethod
    def from_config(cls, schedule_cfg, eps_target: float, batches_per_epoch: int) -> "EpsSchedule":
        s0 = epoch_to_step(schedule_cfg.start - 1, batches_per_epoch)
        s1 = epoch_to_step(schedule_cfg.start + schedule_cfg.length - 1, batches_per_epoch)
        return cls(eps_target, s0, s1, schedule_cfg.kind, schedule_cfg.mid, schedule_cfg.beta)

    def __call__(self, step: int) -> float:
        if step >= self.s1:
            return self.eps_target
        if step <= self.s0:
            return 0.0
        if self.kind == "linear":
            return self.eps_target * (step - self.s0) / (self.s1 - self.s0)
        return self._smoothed(step)

    def _smoothed(self, step: int) -> float:
        # Polynomial a·(s − s0)^β up to s_mid, then linear to ε_target at s1; a makes the slope continuous.
        s_mid = self.s0 + math.floor(self.mid * (self.s1 - self.s0))
        if s_mid == self.s0:  # ramp too short for a polynomial phase
            return self.eps_target * (step - self.s0) / (self.s1 - self.s0)
        t = (s_mid - self.s0) ** (self.beta - 1)
        a = self.eps_target / ((self.s1 - s_mid) * self.beta * t + (s_mid - self.s0) * t)
        if step < s_mid:
            return a * (step - self.s0) ** self.beta
        eps_mid = a * (s_mid - self.s0) ** self.beta
        return eps_mid + (self.eps_target - eps_mid) * (step - s_mid) / (self.s1 - s_mid)


def reg_weight(eps: float, eps_target: float, lambda0: float, decay: bool = True) -> float:
    """λ = λ0·(1 − ε/ε_target): the regularizers fade out as the scheduled ε reaches the target."""
    return lambda0 * (1.0 - eps / eps_target) if decay else lambda0


def epoch_to_step(epochs: float, batches_per_epoch: int) -> int:
    """The first step after `epochs` (whole or fractional) epochs; halves round up."""
    return math.floor(epochs * batches_per_epoch + 0.5)


@dataclass(frozen=True)
class StepPlan:
    """Where a run's phases fall, in steps. ε is 0 up to `ramp_start`, ramps, and is at its target from
    `ramp_end` on; the warmup regularizers run on steps before `ramp_end`; the learning rate is multiplied by
    `lr_decay` from each step in `lr_decays` on (a milestone past the run never fires)."""
    batches_per_epoch: int
    epochs: int
    ramp_start: int
    ramp_end: int
    lr_decays: tuple[int, ...]

    @classmethod
    def of(cls, cfg, batches_per_epoch: int) -> "StepPlan":
        s = cfg.schedule
        return cls(batches_per_epoch, cfg.epochs, epoch_to_step(s.start - 1, batches_per_epoch),
                   epoch_to_step(s.start + s.length - 1, batches_per_epoch),
                   tuple(sorted(epoch_to_step(m, batches_per_epoch) for m in cfg.lr_milestones)))

    @property
    def total(self) -> int:
        return self.epochs * self.batches_per_epoch

    @property
    def reg_end(self) -> int:
        """The regularizers run on steps < reg_end: until the ramp ends."""
        return self.ramp_end

    @property
    def first_target_epoch(self) -> int:
        """The first (1-based) epoch all of whose batches train at the target ε."""
        return -(-self.ramp_end // self.batches_per_epoch) + 1

    def lr_factor(self, step: int, decay: float) -> float:
        """lr(step) / lr: one factor of `decay` per milestone reached (a repeated milestone counts twice)."""
        return decay ** sum(step >= d for d in self.lr_decays)


def last_reg_epoch(schedule_cfg) -> int:
    """The last epoch in which the regularizers run (they stop when the ramp ends): start + length − 1 for a
    whole-epoch schedule. Where the batches per epoch are known, StepPlan.reg_end is exact."""
    return math.ceil(schedule_cfg.start + schedule_cfg.length - 1)


def first_target_epoch(schedule_cfg) -> int:
    """The first epoch all of whose batches train at the target ε: start + length for a whole-epoch schedule.
    For a fractional one this is an upper bound (StepPlan.first_target_epoch, which knows the batches per
    epoch, may be one earlier when the ramp's end rounds down to an epoch boundary)."""
    return math.ceil(schedule_cfg.start + schedule_cfg.length - 1) + 1
