"""ε and λ schedules (method.md §3, §1c). Steps are global batch indices s = 0, 1, …; batch s trains at ε(s)."""
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
        s0 = (schedule_cfg.start - 1) * batches_per_epoch
        s1 = (schedule_cfg.start + schedule_cfg.length - 1) * batches_per_epoch
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


def last_reg_epoch(schedule_cfg) -> int:
    """The regularizers run in epochs 1 … start + length − 1, i.e. until the ramp ends."""
    return schedule_cfg.start + schedule_cfg.length - 1


def first_target_epoch(schedule_cfg) -> int:
    """The first epoch all of whose batches train at the target ε."""
    return schedule_cfg.start + schedule_cfg.length
