"""Declarative search spaces: one YAML file says which TrainConfig knobs a search may change and how.

File format (full guide with examples: docs/search_spaces.md)::

    description: free text                      # optional
    base:                                       # a full or partial TrainConfig, nested as in to_dict()
      dataset: mnist
      epochs: 8
      data: {subset: 3000, val_size: 1000}
    params:                                     # the searched knobs, sampled in dependency order
      lr:              {type: loguniform, low: 1.0e-4, high: 3.0e-3}
      schedule.start:  {type: int, low: 1, high: 2}
      schedule.length: {type: int, low: 1, high: "epochs - schedule.start"}   # bound = expression
      schedule.kind:   {type: categorical, choices: [smoothed, linear]}
      schedule.mid:    {type: uniform, low: 0.1, high: 0.6, when: {schedule.kind: smoothed}}
      reg.lambda0:     {type: loguniform, low: 0.05, high: 2.0,
                        when: [{reg.tightness: true}, {reg.relu: true}]}      # list = any of them
      _milestone_frac: {type: uniform, low: 0.6, high: 0.9}                   # helper, not a config key
    derived:                                    # computed after sampling, in file order
      _m1: "round(_milestone_frac * epochs)"                                  # helper target
      lr_milestones: "[_m1, _m1 + 1]"
    defaults: {lr: 5.0e-4, ...}                 # optional: a known-good point, evaluated first
    starts: [{method: sabr, sabr.ratio: 0.6}]    # optional: more known-good points, as changes to defaults

- Param names are TrainConfig dotted keys (leaf fields only) or helper names `_identifier`.
- Types: `uniform` (low, high, optional step), `loguniform` (low > 0, high), `int` (low, high, optional
  `step`, optional `log: true`), `categorical` (non-empty `choices` of scalars). `low`/`high` may be
  numbers or expressions over other params and base values; an int bound expression is rounded inwards.
- `when`: a mapping `param: value` (or `param: [allowed values]`), all of which must hold, or a list of
  such mappings, any of which must hold. A param whose condition is false is not sampled; its config field
  keeps the base value. A condition on a param that is itself inactive is false.
- Expressions (`derived`, bounds) use a tiny evaluator over the parsed `ast`, never `eval`: numbers,
  names (dotted config keys such as `schedule.length`, helper names), `+ - * / // % **`, unary minus,
  comparisons, `a if cond else b`, list literals, and calls to round/int/float/min/max/abs. A name is
  looked up in: derived values computed so far, then sampled params, then the base config.
- Derived targets are TrainConfig dotted keys or `_` helpers for later derived expressions.
- YAML 1.1 reads `1e-4` as a string; this loader reads it as a float, as YAML 1.2 does.

`load_space(path)` validates everything before any trial: sections, names, distributions, conditions,
expressions, defaults, and it builds (and `resolve()`s) the TrainConfig of the defaults point, of the
low and high corners, and of every categorical choice at the low corner, so a ConfigError surfaces now.
Every problem is a one-line `SpaceError` naming the file, the param and the problem.

Ray/Optuna: pass `space.define_by_run` as OptunaSearch's define-by-run `space`. It suggests every active
param on the trial and returns None: Ray's OptunaSearch records each `trial.suggest_*` call and hands the
trial a config with exactly those values under their names (dotted names stay flat, Ray unflattens on
"/"), while a returned dict would only be merged in as extra constants. Derived values are therefore not
in the Ray config: the trainable calls `space.to_train_config(config)`, which recomputes them.
`space.start_points()` are the `points_to_evaluate` entries: the defaults point, then each start (the defaults
with the start's changes, params inactive there dropped), each holding only the params active at it.
"""
from __future__ import annotations

import ast
import heapq
import math
import operator
import re
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from trainers.config import ConfigError, TrainConfig
from trainers.errors import shown
from trainers.safe_yaml import parse_yaml, read_yaml_file
from tuner.space.fidelity import Fidelity

SECTIONS = ("description", "base", "params", "derived", "defaults", "starts", "fidelity")
RENAMED = {"seeds": "starts"}  # former section names, still read (load_space notes the new name on stderr)
TYPES = ("uniform", "loguniform", "int", "categorical")
PARAM_KEYS = {
    "uniform": ("type", "low", "high", "step", "when"),
    "loguniform": ("type", "low", "high", "when"),
    "int": ("type", "low", "high", "step", "log", "when"),
    "categorical": ("type", "choices", "when"),
}
FUNCTIONS = {"round": round, "int": int, "float": float, "min": min, "max": max, "abs": abs}
HELPER = re.compile(r"_[A-Za-z0-9_]*[A-Za-z0-9]$")
SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"  # the shipped spaces, beside tuner/


class SpaceError(ConfigError):
    """A search space that cannot be used. One line: the file, the param, the problem."""

    def __init__(self, source: str, where: str, problem: str):
        self.source, self.where, self.problem = source, where, problem
        text = " ".join(f"{source}: {where}: {problem}".split())
        super().__init__(text if len(text) <= 500 else text[:497] + "...")  # one line, even for hostile names

    def __reduce__(self):  # Ray ships exceptions between processes
        return SpaceError, (self.source, self.where, self.problem)


# ---- safe expressions -------------------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}
MAX_EXPONENT = 64  # keeps `**` from building astronomically large numbers
MAX_INT_BITS = 256  # and products of such numbers
MAX_LIST_ITEMS = 1000  # `[x] * n` and list concatenation
MAX_EXPR_CHARS = 2000
MAX_EXPR_DEPTH = 50  # `-` * 1999 + `1` would otherwise exhaust Python's stack in the checker
MAX_PARAMS = 200  # searched params (and derived keys) per space: the config has about 80 knobs
MAX_CHOICES = 1000  # choices of one categorical, like any other list


class ExprError(ValueError):
    pass


def _dotted(node: ast.AST) -> str | None:
    """`schedule.length` parses as Attribute(Name('schedule'), 'length'); give back the dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


@dataclass
class Expr:
    """A checked arithmetic expression. `names` are the dotted names it reads."""

    text: str
    tree: ast.Expression
    names: set[str]

    @classmethod
    def parse(cls, text: str) -> "Expr":
        if len(text) > MAX_EXPR_CHARS:
            raise ExprError(f"expression of {len(text)} characters is too long (at most {MAX_EXPR_CHARS})")
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except (SyntaxError, RecursionError, MemoryError, ValueError) as e:
            raise ExprError(f"cannot parse {shown(text)}: {getattr(e, 'msg', None) or type(e).__name__}") from None
        if _depth(tree.body) > MAX_EXPR_DEPTH:  # the checker and the interpreter recurse
            raise ExprError(f"{shown(text)} is nested deeper than {MAX_EXPR_DEPTH} levels")
        names: set[str] = set()
        _check(tree.body, names)
        return cls(text, tree, names)

    def evaluate(self, env: dict[str, Any]) -> Any:
        try:
            return _eval(self.tree.body, env)
        except ExprError:
            raise
        except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
            raise ExprError(f"{shown(self.text)}: {e}") from None


def _depth(root: ast.AST) -> int:
    """The depth of an expression tree, without recursion."""
    deepest, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _check(node: ast.AST, names: set[str]) -> None:
    """Reject every construct outside the small arithmetic language, and collect the names read."""
    if isinstance(node, ast.Constant):
        if not isinstance(node.value, (int, float)):  # bool is an int
            raise ExprError(f"only numbers are allowed as constants, got {shown(node.value)}")
    elif isinstance(node, (ast.Name, ast.Attribute)):
        name = _dotted(node)
        if name is None or not isinstance(node.ctx, ast.Load):
            raise ExprError(f"'{ast.unparse(node)}' is not a name or dotted config key")
        names.add(name)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        _check(node.left, names), _check(node.right, names)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand, names)
    elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        for sub in [node.left, *node.comparators]:
            _check(sub, names)
    elif isinstance(node, ast.IfExp):
        _check(node.test, names), _check(node.body, names), _check(node.orelse, names)
    elif isinstance(node, ast.List):
        for sub in node.elts:
            _check(sub, names)
    elif isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS) or node.keywords:
            raise ExprError(f"call '{ast.unparse(node)}' not allowed; functions: {', '.join(FUNCTIONS)}"
                            " with positional arguments")
        for sub in node.args:
            if isinstance(sub, ast.Starred):
                raise ExprError(f"'*' arguments are not allowed in '{ast.unparse(node)}'")
            _check(sub, names)
    else:
        raise ExprError(f"'{ast.unparse(node)}' is not allowed (numbers, names, + - * / // % **, "
                        "comparisons, a if c else b, lists, round/int/float/min/max/abs)")


def _eval(node: ast.AST, env: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Name, ast.Attribute)):
        name = _dotted(node)
        if name not in env:
            raise ExprError(f"unknown name '{name}'")
        return env[name]
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, env), _eval(node.right, env)
        if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise ExprError(f"exponent {right} too large (at most {MAX_EXPONENT})")
        _check_list_size(node.op, left, right)
        return _bounded(_BINOPS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp):
        return _bounded(_UNARY[type(node.op)](_eval(node.operand, env)))
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env)
        for op, sub in zip(node.ops, node.comparators):
            right = _eval(sub, env)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body, env) if _eval(node.test, env) else _eval(node.orelse, env)
    if isinstance(node, ast.List):
        return [_eval(sub, env) for sub in node.elts]
    if isinstance(node, ast.Call):
        return _bounded(FUNCTIONS[node.func.id](*[_eval(sub, env) for sub in node.args]))
    raise ExprError(f"'{ast.unparse(node)}' is not allowed")  # unreachable after _check


def _check_list_size(op: ast.operator, left: Any, right: Any) -> None:
    """`[1] * 10**12` would build the list before anything could look at it: check its size first."""
    if isinstance(op, ast.Mult) and isinstance(left, list) != isinstance(right, list):
        items, times = (left, right) if isinstance(left, list) else (right, left)
        size = len(items) * times if isinstance(times, int) else 0
    elif isinstance(op, ast.Add) and isinstance(left, list) and isinstance(right, list):
        size = len(left) + len(right)
    else:
        return
    if size > MAX_LIST_ITEMS:
        raise ExprError(f"a list of {size} items is too long (at most {MAX_LIST_ITEMS})")


def _bounded(value: Any) -> Any:
    """Numbers stay small enough to compute with: no huge ints, no inf/NaN."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise ExprError(f"number too large ({value.bit_length()} bits; at most {MAX_INT_BITS})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ExprError(f"result is {value}, not a finite number")
    return value


# ---- params -----------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    """Equality that keeps true/false apart from 1/0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Param:
    """One searched knob. `low`/`high` are numbers or Exprs; `when` is a list of mappings (any holds)
    from param name to its allowed values (all hold); empty = always sampled."""

    name: str
    type: str
    low: float | int | Expr | None = None
    high: float | int | Expr | None = None
    step: float | int | None = None
    log: bool = False
    choices: list[Any] | None = None
    when: list[dict[str, list[Any]]] = field(default_factory=list)

    @property
    def conditional(self) -> bool:
        return bool(self.when)

    @property
    def depends_on(self) -> set[str]:
        deps = {name for cond in self.when for name in cond}
        for bound in (self.low, self.high):
            if isinstance(bound, Expr):
                deps |= bound.names
        return deps

    def is_active(self, values: dict[str, Any]) -> bool:
        """`values` holds the params sampled so far; an absent (inactive) one fails its condition."""
        if not self.when:
            return True
        return any(all(name in values and any(_same(values[name], a) for a in allowed)
                       for name, allowed in cond.items()) for cond in self.when)

    def bounds(self, env: dict[str, Any]) -> tuple[Any, Any]:
        """Numeric bounds at this point (expressions evaluated); raises ExprError when empty."""
        low, high = (b.evaluate(env) if isinstance(b, Expr) else b for b in (self.low, self.high))
        for side, v in (("low", low), ("high", high)):
            if not _is_number(v):
                raise ExprError(f"{side} must be a number, got {shown(v)}")
            if not math.isfinite(v):
                raise ExprError(f"{side} must be a finite number, got {v}")
        if self.type == "int":
            low, high = math.ceil(low - 1e-9), math.floor(high + 1e-9)
            high = low + (high - low) // (self.step or 1) * (self.step or 1)
        elif self.step:
            high = low + math.floor((high - low) / self.step + 1e-9) * self.step
        if low > high:
            raise ExprError(f"low {low} > high {high}")
        if self.type == "loguniform" and low <= 0:
            raise ExprError(f"low must be > 0 for loguniform, got {low}")
        if self.type == "int" and self.log and low < 1:
            raise ExprError(f"low must be >= 1 for a log int, got {low}")
        return low, high

    def suggest(self, trial: Any, env: dict[str, Any]) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        low, high = self.bounds(env)
        if self.type == "int":
            return trial.suggest_int(self.name, low, high, step=self.step or 1, log=self.log)
        if self.type == "loguniform":
            return trial.suggest_float(self.name, low, high, log=True)
        return trial.suggest_float(self.name, low, high, step=self.step)

    def problem(self, value: Any, env: dict[str, Any]) -> str | None:
        """Why `value` is not in this param's domain at this point, or None when it is."""
        if self.type == "categorical":
            return None if any(_same(value, c) for c in self.choices) else \
                f"{shown(value)} is not one of the choices {self.choices}"
        if not _is_number(value) or (self.type == "int" and not isinstance(value, int)):
            return f"expected {'an integer' if self.type == 'int' else 'a number'}, got {shown(value)}"
        low, high = self.bounds(env)
        if not low <= value <= high:
            return f"{shown(value)} is outside [{low}, {high}]"
        if self.type == "int" and (value - low) % (self.step or 1):
            return f"{shown(value)} is not on the grid low {low} + k * step {self.step}"
        return None


# ---- the space --------------------------------------------------------------------------------
def _config_leaves(cls=TrainConfig, prefix: str = "") -> dict[str, str]:
    """Every TrainConfig leaf field as dotted key -> declared type text ('int', 'bool | None', ...)."""
    out = {}
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            out.update(_config_leaves(type(default), f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = str(f.type)
    return out


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


LEAVES = _config_leaves()


def _is_helper(name: str) -> bool:
    return bool(HELPER.fullmatch(name))


class SearchSpace:
    """A validated space. Build with `load_space(path)` or `SearchSpace.from_dict(raw, name)`."""

    def __init__(self, name: str, source: str, base: dict[str, Any], params: dict[str, Param],
                 derived: dict[str, Expr], defaults: dict[str, Any] | None, description: str = "",
                 starts: list[dict[str, Any]] | None = None):
        self.name = name
        self.source = source
        self.description = description
        self.base = base
        self.params = params
        self.derived = derived
        self.defaults = defaults
        self.starts = list(starts or [])  # starting points: changes to the defaults, tried first
        self.fidelity = Fidelity()  # the trials' fidelity; `base` (with the sampled point) is the target run
        self.base_config = TrainConfig.from_dict(base)
        self.base_values = _flatten(self.base_config.to_dict())
        self.order = self._dependency_order()

    # ---- sampling ---------------------------------------------------------------------------
    def suggest(self, trial: Any) -> dict[str, Any]:
        """Suggest every active param on an Optuna trial (dependency order); the flat sampled dict."""
        sampled: dict[str, Any] = {}
        for name in self.order:
            p = self.params[name]
            if p.is_active(sampled):
                try:
                    sampled[name] = p.suggest(trial, {**self.base_values, **sampled})
                except ExprError as e:
                    raise self._error(f"param '{name}'", str(e)) from None
        return sampled

    def define_by_run(self, trial: Any) -> None:
        """OptunaSearch define-by-run `space`: Ray puts every suggested value into the trial config
        under its name, so nothing is returned (a returned dict would be merged in as constants)."""
        self.suggest(trial)
        return None

    def default_point(self) -> dict[str, Any]:
        """The `defaults` section (params active there only); {} when the file has none."""
        return dict(self.defaults or {})

    def start_points(self) -> list[dict[str, Any]]:
        """The points evaluated first: the defaults, then each start (`starts:`) applied to them ([] without defaults)."""
        if not self.defaults:
            return []
        return [self.default_point()] + [self.active_values({**self.defaults, **start}) for start in self.starts]

    def searched_names(self) -> list[str]:
        return list(self.params)

    # ---- from a point to a config -----------------------------------------------------------
    def active_values(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """The values of the params active at this point, checked against their domains; values of
        inactive params are dropped, unknown names and missing active params are errors."""
        unknown = sorted(set(sampled) - set(self.params))
        if unknown:
            raise self._error(f"param '{unknown[0]}'", f"not in this space; searched: {', '.join(self.params)}")
        kept: dict[str, Any] = {}
        for name in self.order:
            p = self.params[name]
            if not p.is_active(kept):
                continue
            if name not in sampled:
                raise self._error(f"param '{name}'", "active at this point but has no value")
            try:
                problem = p.problem(sampled[name], {**self.base_values, **kept})
            except ExprError as e:
                problem = str(e)
            if problem:
                raise self._error(f"param '{name}'", problem)
            kept[name] = sampled[name]
        return kept

    def overrides(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Dotted TrainConfig overrides of the base: active searched fields plus derived fields."""
        kept = self.active_values(sampled)
        env = {**self.base_values, **kept}
        for target, expr in self.derived.items():
            try:
                env[target] = expr.evaluate(env)
            except ExprError as e:
                raise self._error(f"derived '{target}'", str(e)) from None
        out = {k: v for k, v in kept.items() if not _is_helper(k)}
        out.update({k: env[k] for k in self.derived if not _is_helper(k)})
        return out

    def config_of(self, params: dict[str, Any]) -> TrainConfig:
        """The TrainConfig of a trial's params (its Ray config, params.json or Optuna params): the keys the
        space searches, others (re-evaluation keys, callbacks) left out. The one step "sampled params →
        TrainConfig" of the trial, W&B, the study, export and plots (the trial then applies its fidelity)."""
        return self.to_train_config({k: v for k, v in params.items() if k in self.params})

    def to_train_config(self, sampled: dict[str, Any]) -> TrainConfig:
        """Base + sampled + derived, resolved and validated; SpaceError if the combination is invalid."""
        overrides = self.overrides(sampled)
        try:
            return self.base_config.with_overrides(overrides).resolve()
        except ConfigError as e:
            raise self._error("point " + _compact(sampled), str(e)) from None

    # ---- internals --------------------------------------------------------------------------
    def _error(self, where: str, problem: str) -> SpaceError:
        return SpaceError(self.source, where, problem)

    def _dependency_order(self) -> list[str]:
        """File order, except that a param comes after those its condition and bounds read. Kahn's algorithm
        with a heap on the file position: n log n, so a large space is no slower to order than to parse."""
        names = list(self.params)
        position = {n: i for i, n in enumerate(names)}
        waiting_on = {n: len(self.params[n].depends_on & position.keys()) for n in names}
        dependents: dict[str, list[str]] = {n: [] for n in names}
        for n in names:
            for d in self.params[n].depends_on & position.keys():
                dependents[d].append(n)
        ready = [position[n] for n in names if waiting_on[n] == 0]
        heapq.heapify(ready)
        order: list[str] = []
        while ready:
            name = names[heapq.heappop(ready)]
            order.append(name)
            for n in dependents[name]:
                waiting_on[n] -= 1
                if waiting_on[n] == 0:
                    heapq.heappush(ready, position[n])
        if len(order) < len(names):
            stuck = [n for n in names if waiting_on[n] > 0]
            raise self._error(f"param '{stuck[0]}'",
                              f"circular dependency among {', '.join(stuck)} (through when/low/high)")
        return order

    def corner(self, which: str, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
        """All numeric params at their low (or high) bound, categoricals at their first (or last)
        choice, except the values in `fixed`."""
        fixed = fixed or {}
        point: dict[str, Any] = {}
        for name in self.order:
            p = self.params[name]
            if not p.is_active(point):
                continue
            if name in fixed:
                point[name] = fixed[name]
            elif p.type == "categorical":
                point[name] = p.choices[0 if which == "low" else -1]
            else:
                try:
                    point[name] = p.bounds({**self.base_values, **point})[0 if which == "low" else 1]
                except ExprError as e:
                    raise self._error(f"param '{name}'", f"at the {which} corner: {e}") from None
        return point

    @classmethod
    def from_dict(cls, raw: Any, name: str = "space", source: str | None = None) -> "SearchSpace":
        return _Builder(source or name).build(raw, name)


def _compact(point: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={shown(v)}" for k, v in point.items()) + ")"


# ---- loading and validation -------------------------------------------------------------------
def parse_space_yaml(text: str, source: str = "search space"):
    """YAML as space files are read: the one config reader (trainers/safe_yaml.py: safe loading, `1e-4` is a
    float, a duplicated key is an error). A problem is a SpaceError naming `source`."""
    try:
        return parse_yaml(text, source)
    except ConfigError as e:
        raise SpaceError(source, "file", str(e).removeprefix(f"{source}: ")) from None


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file. A bare name (`cifar10_eps8`) is looked up in search_spaces/."""
    path = Path(path)
    if not path.is_file() and path.parent == Path("."):
        shipped = SPACES_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        path = shipped if shipped.is_file() else path
    if not path.is_file():
        raise SpaceError(str(path), "file", "search space file not found")
    try:
        raw = read_yaml_file(path, "search space file")
    except ConfigError as e:
        raise SpaceError(str(path), "file", str(e).removeprefix(f"{path}: ")) from None
    space = _Builder(str(path)).build(raw, path.stem)
    for old, new in RENAMED.items():
        if old in raw:
            print(f"certtune: {path}: section '{old}:' is now '{new}:' (starting points, not random seeds); "
                  f"'{old}:' still works", file=sys.stderr)
    return space


class _Builder:
    """Turns the raw YAML mapping into a SearchSpace, raising SpaceError at the first problem."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str) -> SpaceError:
        return SpaceError(self.source, where, problem)

    def build(self, raw: Any, name: str) -> SearchSpace:
        if not isinstance(raw, dict):
            raise self.fail("file", f"expected a mapping with sections {', '.join(SECTIONS)}")
        for key in raw:
            if key not in SECTIONS and key not in RENAMED:
                raise self.fail(f"section '{key}'", f"unknown section; allowed: {', '.join(SECTIONS)}")
        base = raw.get("base") or {}
        if not isinstance(base, dict):
            raise self.fail("base", "expected a mapping of TrainConfig keys")
        try:
            TrainConfig.from_dict(base)
        except ConfigError as e:
            raise self.fail("base", str(e)) from None
        raw_params = raw.get("params")
        if not isinstance(raw_params, dict) or not raw_params:
            raise self.fail("params", "expected a non-empty mapping of searched params")
        if len(raw_params) > MAX_PARAMS:
            raise self.fail("params", f"{len(raw_params)} params; at most {MAX_PARAMS}")
        params = {str(n): self.param(str(n), spec) for n, spec in raw_params.items()}
        for p in params.values():
            self.check_references(p, params)
        derived = self.derived(raw.get("derived") or {}, params)
        defaults = raw.get("defaults")
        if defaults is not None and not isinstance(defaults, dict):
            raise self.fail("defaults", "expected a mapping param -> value")
        if "starts" in raw and "seeds" in raw:
            raise self.fail("seeds", "the former name of 'starts'; give one of the two sections")
        self.starts_section = section = "seeds" if "seeds" in raw else "starts"  # errors name the file's word
        starts = raw.get(section)
        if starts is not None and (not isinstance(starts, list) or not all(isinstance(x, dict) for x in starts)):
            raise self.fail(section, "expected a list of mappings param -> value (changes to the defaults)")
        if starts and defaults is None:
            raise self.fail(section, f"{section} are changes to the defaults point; give a defaults section")
        space = SearchSpace(name, self.source, base, params, derived, defaults,
                            str(raw.get("description") or ""), starts)
        space.fidelity = self.fidelity(raw.get("fidelity", "target"), space)
        self.check_points(space)
        return space

    def fidelity(self, text: Any, space: SearchSpace) -> Fidelity:
        """The trials' fidelity (tuner/space/fidelity.py); the base config is the target run. Whether it is cheaper
        than the target is checked where the search's fidelity is known (--fidelity may replace this one)."""
        try:
            fidelity = Fidelity.parse(text, "fidelity")
        except ConfigError as e:
            raise self.fail("fidelity", str(e).removeprefix("fidelity: ")) from None
        return fidelity

    # ---- params -----------------------------------------------------------------------------
    def param(self, name: str, spec: Any) -> Param:
        where = f"param '{name}'"
        if name not in LEAVES and not _is_helper(name):
            raise self.fail(where, "unknown name; use a TrainConfig dotted key (e.g. lr, schedule.length, "
                                   "reg.lambda0) or a helper name starting with '_'")
        if not isinstance(spec, dict) or "type" not in spec:
            raise self.fail(where, f"expected a mapping with 'type' (one of {', '.join(TYPES)})")
        kind = spec["type"]
        if kind not in TYPES:
            raise self.fail(where, f"unknown type {shown(kind)}; allowed: {', '.join(TYPES)}")
        for key in spec:
            if key not in PARAM_KEYS[kind]:
                raise self.fail(where, f"unknown key '{key}' for type {kind}; allowed: "
                                       f"{', '.join(PARAM_KEYS[kind])}")
        field_type = LEAVES.get(name, "")
        if field_type and kind != "categorical" and not field_type.startswith(("int", "float")):
            raise self.fail(where, f"field of type {field_type} can only be searched as categorical")
        if field_type.startswith("int") and kind not in ("int", "categorical"):
            raise self.fail(where, f"integer field needs type int or categorical, got {kind}")
        p = Param(name, kind, when=self.when(where, spec.get("when")))
        if kind == "categorical":
            p.choices = self.choices(where, spec.get("choices"))
            return p
        for side in ("low", "high"):
            if side not in spec:
                raise self.fail(where, f"'{side}' is required for type {kind}")
            setattr(p, side, self.bound(where, side, spec[side]))
        p.log = spec.get("log", False)
        if not isinstance(p.log, bool):
            raise self.fail(where, f"log must be true or false, got {shown(p.log)}")
        p.step = spec.get("step")
        if p.step is not None:
            if not _is_number(p.step) or not 0 < p.step < math.inf or (kind == "int" and not isinstance(p.step, int)):
                raise self.fail(where, f"step must be a positive {'integer' if kind == 'int' else 'number'}, "
                                       f"got {shown(p.step)}")
            if p.log and p.step != 1:
                raise self.fail(where, "step cannot be combined with log: true")
        if not isinstance(p.low, Expr) and not isinstance(p.high, Expr):
            try:
                p.bounds({})
            except ExprError as e:
                raise self.fail(where, str(e)) from None
        return p

    def bound(self, where: str, side: str, value: Any) -> float | int | Expr:
        if _is_number(value):
            return value
        if not isinstance(value, str):
            raise self.fail(where, f"{side} must be a number or an expression string, got {shown(value)}")
        try:
            expr = Expr.parse(value)
            return expr.evaluate({}) if not expr.names else expr  # `8/255`, `1e-4` are constants
        except ExprError as e:
            raise self.fail(where, f"{side}: {e}") from None

    def choices(self, where: str, choices: Any) -> list[Any]:
        if not isinstance(choices, list) or not choices:
            raise self.fail(where, "categorical needs a non-empty list 'choices'")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise self.fail(where, f"choice {shown(c)} is not a scalar (lists go in 'derived' instead)")
        if len(choices) > MAX_CHOICES:
            raise self.fail(where, f"{len(choices)} choices; at most {MAX_CHOICES}")
        keys = {(isinstance(c, bool), c) for c in choices}  # hashing keeps the check linear; bools apart from 0/1
        if len(keys) < len(choices):
            raise self.fail(where, f"duplicate choices in {shown(choices)}")
        return choices

    def when(self, where: str, when: Any) -> list[dict[str, list[Any]]]:
        if when is None:
            return []
        conds = when if isinstance(when, list) else [when]
        if not conds or not all(isinstance(c, dict) and c for c in conds):
            raise self.fail(where, "when must be a mapping param -> value(s), or a list of such mappings")
        return [{str(k): (v if isinstance(v, list) else [v]) for k, v in c.items()} for c in conds]

    def check_references(self, p: Param, params: dict[str, Param]) -> None:
        where = f"param '{p.name}'"
        for cond in p.when:
            for ref, allowed in cond.items():
                if ref == p.name:
                    raise self.fail(where, "when cannot name the param itself")
                if ref not in params:
                    raise self.fail(where, f"when names '{ref}', which is not in params")
                other = params[ref]
                for value in allowed:
                    ok = (any(_same(value, c) for c in other.choices) if other.type == "categorical"
                          else _is_number(value))
                    if not ok:
                        raise self.fail(where, f"when: {ref} can never be {shown(value)}")
        for side in ("low", "high"):
            bound = getattr(p, side)
            if isinstance(bound, Expr):
                self.check_names(where, f"{side} {shown(bound.text)}", bound.names, params, set())

    def check_names(self, where: str, what: str, names: set[str], params: dict[str, Param],
                    helpers: set[str]) -> None:
        """Names an expression may read: config keys, unconditional helper params, earlier helpers."""
        for ref in sorted(names):
            if ref in helpers or ref in LEAVES:
                continue
            if ref in params and not params[ref].conditional:
                continue
            if ref in params:
                raise self.fail(where, f"{what} reads '{ref}', a conditional helper that may have no value")
            raise self.fail(where, f"{what}: unknown name '{ref}'; use params, config keys or earlier "
                                   "derived helpers")

    def derived(self, raw: Any, params: dict[str, Param]) -> dict[str, Expr]:
        if not isinstance(raw, dict):
            raise self.fail("derived", "expected a mapping target -> expression string")
        if len(raw) > MAX_PARAMS:
            raise self.fail("derived", f"{len(raw)} entries; at most {MAX_PARAMS}")
        out: dict[str, Expr] = {}
        for target, text in raw.items():
            target = str(target)
            where = f"derived '{target}'"
            if target not in LEAVES and not _is_helper(target):
                raise self.fail(where, "target is not a TrainConfig dotted key (nor a '_' helper)")
            if target in params:
                raise self.fail(where, "target is also a searched param")
            if not isinstance(text, str):
                raise self.fail(where, f"expected an expression string, got {shown(text)}")
            try:
                expr = Expr.parse(text)
            except ExprError as e:
                raise self.fail(where, str(e)) from None
            self.check_names(where, repr(text), expr.names, params, {t for t in out if _is_helper(t)})
            out[target] = expr
        return out

    # ---- whole points -----------------------------------------------------------------------
    def check_points(self, space: SearchSpace) -> None:
        """Defaults, corners and each categorical choice must give a valid, resolved TrainConfig."""
        if space.defaults is not None:
            self.check_defaults(space)
            self.build_config(space, "defaults", space.defaults)
        for i, seed in enumerate(space.starts):
            where = f"{self.starts_section}[{i}]"
            unknown = sorted(set(seed) - set(space.params))
            if unknown:
                raise self.fail(f"{where} '{unknown[0]}'", "not a searched param")
            try:
                point = space.active_values({**space.defaults, **seed})
            except SpaceError as e:
                raise self.fail(f"{where}: {e.where}", e.problem) from None
            self.build_config(space, where, point)
        for p in space.params.values():  # first, so a bad choice is named as such
            for choice in p.choices or []:
                point = space.corner("low", fixed={p.name: choice})
                if p.name in point:
                    self.build_config(space, f"param '{p.name}' choice {shown(choice)} (low corner)", point)
        for which in ("low", "high"):
            self.build_config(space, f"{which} corner", space.corner(which))

    def check_defaults(self, space: SearchSpace) -> None:
        defaults = space.defaults
        for name in defaults:
            if name not in space.params:
                raise self.fail(f"defaults '{name}'", "not a searched param")
        active: dict[str, Any] = {}
        for name in space.order:
            p = space.params[name]
            if not p.is_active(active):
                if name in defaults:
                    raise self.fail(f"defaults '{name}'", "given, but the param is inactive at the defaults")
                continue
            if name not in defaults:
                raise self.fail(f"defaults '{name}'", "missing; every param active at the defaults needs a value")
            try:
                problem = p.problem(defaults[name], {**space.base_values, **active})
            except ExprError as e:
                problem = str(e)
            if problem:
                raise self.fail(f"defaults '{name}'", problem)
            active[name] = defaults[name]

    def build_config(self, space: SearchSpace, where: str, point: dict[str, Any]) -> None:
        try:
            space.to_train_config(point)
        except SpaceError as e:  # name the checked point instead of the raw values
            raise self.fail(where, e.problem if e.where.startswith("point") else f"{e.where}: {e.problem}") \
                from None
