"""Re-evaluation: once it matters, a point's score is its mean over seeds, not one seed's value.

One seed per point ranks points by noise when seeds differ more than points do (measured here: the same
recipe scored 0.176 and 0.218). A search with `--reeval-top K --reeval-seeds S` therefore ends by racing its
best points on more seeds, as SMAC's intensification races challengers against the incumbent on more
instances: when every other trial has ended, the K best points (feasible first, by the first objective) and
the space's defaults point (the recipe a user would run without a search; the next best point when the defaults
are among the K or did not finish) are trained again with S more
seeds each, seed offsets 1..S added to the config's seed. These runs are trials of the same experiment and
the same Optuna study, counted in --num-samples: the search plans `num_samples - reserved` trials of its own.

Every reader of a search ranks points by `Score` (tuner/results/experiment.py): the mean over a point's finished seeds
with its standard error, and a point evaluated on fewer seeds is ranked after one evaluated on more (a
challenger has to be raced as often as the incumbent before it can replace it). docs/decisions.md says why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from trainers.config import ConfigError

MAX_SEEDS = 100


@dataclass(frozen=True)
class Rerun:
    """One re-evaluation trial: `params` (an earlier trial's point) trained with seed + `seed_offset`."""
    params: dict
    of: str  # the Ray trial id that first trained the point
    seed_offset: int


@dataclass(frozen=True)
class ReevalPlan:
    top: int  # K: the best points re-evaluated
    seeds: int  # S: more seeds each
    num_samples: int  # every trial of the search, re-evaluations included
    baseline: dict | None = None  # the space's defaults point, re-evaluated as well

    @property
    def points(self) -> int:
        """The points raced: the K best and the baseline (or, when it is among them, the next best)."""
        return self.top + (self.baseline is not None)

    @property
    def reserved(self) -> int:
        """Trials kept for re-evaluation: S for each of the points raced."""
        return self.points * self.seeds

    @property
    def main_trials(self) -> int:
        return self.num_samples - self.reserved

    def reserved_for(self, candidates: int) -> int:
        """The trials the race needs when `candidates` points can be raced (the finished ones, and the running ones
        should they finish): S for each of at most K + 1 of them. Under a budget the search explores while what
        is spent, what runs and this reserve fit, so a race of fewer points does not hold back the budget of K + 1
        (with ASHA most trials stop early: issue 19's search had 1 finished point and kept 6 trials' room)."""
        return self.seeds * min(self.points, candidates)

    def reruns(self, finals: dict[str, tuple[float, bool]], params: dict[str, dict], mode: str) -> list[Rerun]:
        """The re-evaluation trials, best point first. `finals`: {Ray trial id: (final value of the first
        objective, feasible)} of the trials that finished; `params`: {Ray trial id: its point}."""
        sign = 1.0 if mode == "min" else -1.0
        ranked = sorted(finals, key=lambda t: (not finals[t][1], sign * finals[t][0]))
        chosen = ranked[:self.top]
        if self.baseline is not None:
            # The reserve holds K + 1 points' seeds: the defaults' when they are not among the K best, else (or when
            # they did not finish) the next best point's, so no reserved trial goes unused.
            base = [t for t in ranked if params.get(t) == self.baseline][:1]
            chosen += [t for t in base if t not in chosen] or ranked[self.top:self.top + 1]
        return [Rerun(dict(params[t]), t, offset) for t in chosen for offset in range(1, self.seeds + 1)]


def check_reeval(top, seeds, num_samples: int, first_points: int, has_baseline: bool) -> tuple[int, int]:
    """--reeval-top and --reeval-seeds, checked against the trials they need (one line at the first problem)."""
    values = []
    for flag, value in (("--reeval-top", top), ("--reeval-seeds", seeds)):
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{flag}: must be a whole number >= 0, got {str(value)[:40]!r}") from None
        if not 0 <= number <= MAX_SEEDS:
            raise ConfigError(f"{flag}: must be in [0, {MAX_SEEDS}], got {number}")
        values.append(number)
    top, seeds = values
    if (top == 0) != (seeds == 0):
        raise ConfigError("--reeval-top and --reeval-seeds go together: give both (e.g. --reeval-top 3 "
                          "--reeval-seeds 2) or neither")
    if top:
        plan = ReevalPlan(top, seeds, num_samples, {} if has_baseline else None)
        needed = max(top, first_points) + plan.reserved
        if num_samples < needed:
            raise ConfigError(f"--num-samples {num_samples}: too few for --reeval-top {top} --reeval-seeds {seeds}: "
                              f"{plan.reserved} trials re-evaluate, and at least {max(top, first_points)} must "
                              f"come first (the space's starting points and the {top} to re-evaluate); "
                              f"give --num-samples {needed} or more")
    return top, seeds


@dataclass(frozen=True)
class Score:
    """A point's score on one objective over its finished seeds: mean, standard error (NaN for one seed), seeds."""
    mean: float
    se: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Score":
        n = len(values)
        if n == 0:
            return cls(math.nan, math.nan, 0)
        mean = sum(values) / n
        if n == 1:
            return cls(mean, math.nan, 1)
        var = sum((v - mean) ** 2 for v in values) / (n - 1)
        return cls(mean, math.sqrt(var / n), n)

    @property
    def std(self) -> float:
        """The spread over seeds (sample standard deviation; NaN for one seed)."""
        return self.se * math.sqrt(self.n) if self.n > 1 else math.nan

    def text(self, digits: int = 4) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.se:.{digits}f} ({self.n} seeds)"


def within_one_se(a: Score, b: Score) -> bool:
    """Two scores a standard error apart or less (the larger of the two SEs): their order is not settled."""
    se = max((s.se for s in (a, b) if math.isfinite(s.se)), default=math.nan)
    return math.isfinite(se) and abs(a.mean - b.mean) <= se


def binomial_se(error_rate: float, n: int) -> float:
    """The sampling standard error of an error rate measured on n images."""
    return math.sqrt(max(error_rate * (1 - error_rate), 0.0) / n) if n > 0 else math.nan
