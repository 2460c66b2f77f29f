"""The verifiers, one entry each: the only place that names them, their metric keys and their knobs' defaults.

Everything that lists verifiers reads this table: evaluate (which ones run, in what order, on what), verify
(the `--verifiers` names and the keys it reports), TrainConfig (`eval.metrics`), export's re-ranking, the
search's objectives and constraints, the CLI's flags and the API's defaults. Adding a verifier is one entry
here plus its module (docs/methods.md, "Adding a verifier").

A verifier's functions are named as "module:function" and imported when first used, so the table sits below
every verifier: training imports it (for `eval.metrics`) without importing α-CROWN or BaB.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable


@dataclass(frozen=True)
class Knob:
    """A setting of one or more verifiers: the API keyword `name`, the CLI flag `--name-with-dashes`."""

    name: str
    type: type
    default: int | float
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


KNOBS = {k.name: k for k in (
    Knob("alpha_iterations", int, 20, "alpha-crown/bab: slope optimisation steps"),
    Knob("alpha_lr", float, 0.1, "alpha-crown/bab: Adam step size of the slopes"),
    Knob("bab_time_limit", float, 10.0, "bab: seconds per example"),
)}


def default(knob: str) -> int | float:
    return KNOBS[knob].default


@dataclass(frozen=True)
class Verifier:
    name: str  # as asked for: `verify --verifiers`, `eval.metrics`, `export --verify`
    metric: str  # the key of its error in every result
    bound: str  # "module:function": its bound (or, for pgd, its attack; for bab, its decision per example)
    builds_on: str | None = None  # runs only where this one did not verify (its verified set contains it)
    knobs: tuple[str, ...] = ()  # keys of KNOBS it reads
    per_epoch: bool = False  # cheap enough to measure every epoch of training (`eval.metrics`)
    step: str | None = None  # "module:function" that evaluate runs per batch (None: evaluate's own pass)
    counts: tuple[str, ...] = ()  # extra integer results it reports
    certifies: bool = True  # False for an attack: its error is an upper bound on the robust error's complement

    def function(self, which: str = "bound") -> Callable[..., Any]:
        """The verifier's bound (or per-batch step) function, imported now."""
        module, name = getattr(self, which).split(":")
        return getattr(import_module(module), name)

    def defaults(self) -> dict[str, int | float]:
        return {k: KNOBS[k].default for k in self.knobs}


VERIFIERS = {v.name: v for v in (
    Verifier("ibp", "ibp_err", "trainers.bounds:ibp_bounds", per_epoch=True),
    Verifier("crown-ibp", "crown_ibp_err", "trainers.bounds:crown_ibp_bounds", builds_on="ibp", per_epoch=True),
    Verifier("crown", "crown_err", "trainers.crown:crown_bounds", step="trainers.crown:crown_verified"),
    Verifier("alpha-crown", "alpha_crown_err", "trainers.alpha_crown:alpha_crown_bounds", builds_on="crown",
             knobs=("alpha_iterations", "alpha_lr"), step="trainers.alpha_crown:alpha_crown_verified"),
    Verifier("bab", "bab_err", "trainers.bab:bab", builds_on="alpha-crown",
             knobs=("alpha_iterations", "alpha_lr", "bab_time_limit"), step="trainers.bab:bab_verified",
             counts=("bab_falsified", "bab_unknown")),
    Verifier("pgd", "pgd_err", "trainers.attacks:pgd_attack", per_epoch=True, certifies=False),
)}
CLEAN = "clean"  # not a verifier: the error on the points themselves, measured with every one


def verifier(name: str) -> Verifier:
    """The entry for `name` (KeyError for an unknown one: callers check names with `unknown_names` first)."""
    return VERIFIERS[name]


def metric_of(name: str) -> str:
    return VERIFIERS[name].metric


def names(*, per_epoch: bool | None = None, certifies: bool | None = None, stepped: bool | None = None) -> tuple[str, ...]:
    """Verifier names in table order, filtered by what they are."""
    return tuple(v.name for v in VERIFIERS.values()
                 if (per_epoch is None or v.per_epoch == per_epoch)
                 and (certifies is None or v.certifies == certifies)
                 and (stepped is None or (v.step is not None) == stepped))


def per_epoch_metrics() -> dict[str, str]:
    """The error keys a training run can report every epoch (clean_err first), each with the `eval.metrics`
    name that measures it."""
    return {CLEAN + "_err": CLEAN} | {v.metric: v.name for v in VERIFIERS.values() if v.per_epoch}


def with_bases(asked) -> tuple[str, ...]:
    """The stepped verifiers to run for `asked`, each after the one it builds on, in table order."""
    needed = set()
    for name in asked:
        while name is not None and VERIFIERS[name].step is not None:
            needed.add(name)
            name = VERIFIERS[name].builds_on
    return tuple(n for n in VERIFIERS if n in needed)


@dataclass
class VerifierOptions:
    """The knobs of the stepped verifiers. `bab`: a complete BabConfig (trainers/bab.py) that overrides the
    α and time-limit knobs for BaB alone (tests give BaB a short time limit this way)."""

    alpha_iterations: int = default("alpha_iterations")
    alpha_lr: float = default("alpha_lr")
    bab_time_limit: float = default("bab_time_limit")
    bab: Any = None


@dataclass
class Problem:
    """One batch for the stepped verifiers: the model, the input boxes, the specification, which examples
    are misclassified (never verified) and which cheaper verifiers already proved. `shared` carries what
    one verifier computed for the one that builds on it (CROWN's intermediate bounds for α-CROWN); `counts`
    collects extra integer results (BaB's falsified and unknown)."""

    model: Any
    lower: Any
    upper: Any
    C: Any
    wrong: Any
    already: Any
    options: VerifierOptions
    shared: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    progress: Callable[[str], None] = lambda stage: None  # "which verifier runs on what", for a progress line
