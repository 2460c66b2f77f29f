"""Constraints on a search's metrics (`certtune search --constraint 'clean_err<=0.35'`, repeatable).

A constraint is `METRIC<=BOUND` or `METRIC>=BOUND` on a metric every trial reports (its final result, on the
validation split). Optuna's convention for how far a trial is from satisfying one: the violation, a float that
is <= 0 when the constraint holds,

    METRIC <= BOUND:  METRIC - BOUND            METRIC >= BOUND:  BOUND - METRIC

and +inf when the metric is missing or not finite. The searcher sets the violations of a finished or pruned
trial on its Optuna trial (`Trial.set_constraint(str(constraint), violation)`), which Optuna 5's TPE reads
to prefer feasible trials (the per-trial form that replaced TPE's `constraints_func`). Export and report
apply the same rule to each trial's last result (`satisfied`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from trainers.verifiers import per_epoch_metrics
from tuner.space.record import SearchError

# Metrics a trial reports in every result (the trainer's validation metrics and its training seconds).
# crown_ibp_err and pgd_err are there only when eval.metrics measures them (checked by tuner/run/driver.py).
METRICS = (*per_epoch_metrics(), "train_seconds", "loss", "relu_active",
           "relu_inactive", "relu_unstable", "bound_tightness", "best_ibp_err")
SYNTAX = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*(\S+)\s*")


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str  # "<=" or ">="
    bound: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"

    def violation(self, result: dict[str, Any]) -> float:
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return math.inf
        return float(value) - self.bound if self.op == "<=" else self.bound - float(value)


def parse_constraint(text: Any) -> Constraint:
    """`clean_err<=0.35` → Constraint; SearchError (one line) for bad syntax, an unknown metric or a bad bound."""
    match = SYNTAX.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise SearchError(f"--constraint: expected METRIC<=BOUND or METRIC>=BOUND (e.g. clean_err<=0.35), "
                          f"got {str(text)[:80]!r}")
    metric, op, bound = match.groups()
    if metric not in METRICS:
        raise SearchError(f"--constraint {text.strip()[:80]}: unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    try:
        number = float(bound)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise SearchError(f"--constraint {text.strip()[:80]}: the bound must be a finite number, got {bound[:40]!r}")
    return Constraint(metric, op, number)


def parse_constraints(texts: list[str] | None) -> list[Constraint]:
    constraints = [parse_constraint(t) for t in texts or []]
    if len(set(constraints)) != len(constraints):
        raise SearchError(f"--constraint: a constraint is repeated in {[str(c) for c in constraints]}")
    return constraints


def violations(constraints: list[Constraint], result: dict[str, Any]) -> list[float]:
    return [c.violation(result) for c in constraints]


def satisfied(constraints: list[Constraint], result: dict[str, Any]) -> bool:
    """True when every constraint holds on `result` (a trial's last result); True when there are none."""
    return all(v <= 0 for v in violations(constraints, result))

