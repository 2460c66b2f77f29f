"""TrainConfig: every knob of a training run, validated in one place.

A config is a tree of plain dataclasses. `method` is a preset: fields left at None ("auto") are filled
from it by `resolve()`, so each ingredient (init, BN placement, regularizers, bound) can also be set on
its own. The resolved config is what gets written next to a run and what a search exports.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

METHODS = ("vanilla", "crown-ibp", "fast")
DATASETS = ("mnist", "cifar10", "tinyimagenet")
MODELS = ("cnn7", "wrn8", "resnext", "cnn_small")
BN_PLACEMENTS = ("full", "conv", "none")
INITS = ("ibp", "default", "kaiming", "orthogonal")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("smoothed", "linear")
EVAL_METRICS = ("clean", "ibp", "crown-ibp", "pgd")


class ConfigError(ValueError):
    """A config that cannot run. The message names the field and what is allowed."""


@dataclass
class ScheduleConfig:
    kind: str = "smoothed"  # smoothed (auto_LiRPA SmoothedScheduler) or linear
    start: int = 1  # 1-based epoch whose first batch begins the ramp (epochs before it use ε = 0)
    length: int = 20  # ramp length in epochs
    mid: float = 0.25  # smoothed: fraction of the ramp spent in the polynomial phase
    beta: float = 4.0  # smoothed: exponent of the polynomial phase


@dataclass
class RegConfig:
    tightness: bool | None = None  # None: on for method `fast`
    relu: bool | None = None  # None: on for method `fast`
    std: bool = False  # L_std, in the camera-ready code only
    lambda0: float = 0.5
    tau: float = 0.5
    decay: bool = True  # λ = λ0·(1 − ε/ε_target); False keeps λ0
    min_eps: float = 1e-6  # ε used for the regularizers while the scheduled ε is 0


@dataclass
class DataConfig:
    subset: int = 0  # training examples used after the validation split is carved out; 0 = all
    val_size: int = 1000  # held out from the training set, seeded
    augment: bool = True  # CIFAR/TinyImageNet flip + crop; MNIST never augments
    npz: str | None = None  # .npz of uint8 images/labels, relative to --data-dir unless absolute
    test_subset: int = 0  # test examples used by `verify`; 0 = all


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: ["clean", "ibp"])  # per-epoch, on validation
    batch_size: int = 256
    pgd_steps: int = 20
    pgd_restarts: int = 1
    pgd_step_size: float = 0.25  # fraction of ε per step (scaled so steps cover the ball)


@dataclass
class TrainConfig:
    # Defaults are the paper's MNIST setting (ε = 0.4, CNN-7, 70 epochs = 0 + 20 ramp + 50, milestones 50, 60).
    dataset: str = "mnist"
    model: str = "cnn7"
    method: str = "fast"
    eps: float = 0.4  # target ε, raw pixel scale in [0, 1]
    epochs: int = 70
    batch_size: int = 256
    lr: float = 5e-4
    seed: int = 100
    optimizer: str = "adam"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    lr_milestones: list[int] = field(default_factory=lambda: [50, 60])  # epochs after which lr *= lr_decay
    lr_decay: float = 0.2
    grad_clip: float = 10.0  # max total grad norm; 0 = off
    grad_accum: int = 1
    train_eps_mul: float = 1.0  # the training ε is the scheduled ε times this
    init: str | None = None  # None: `ibp` for fast, `default` otherwise
    bn: str = "full"  # BN after every conv and hidden linear (full), convs only, or none
    bound: str | None = None  # training bound: None → crown-ibp for method crown-ibp, else ibp
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        cfg = _build(cls, raw or {}, prefix="")
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        import yaml  # here, not at the top: a GPU machine with only torch can build configs from dicts

        raw = yaml.safe_load(path.read_text())
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
        return cls.from_dict(raw or {})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def with_overrides(self, overrides: dict[str, Any]) -> "TrainConfig":
        """Apply dotted `key: value` overrides (e.g. {"schedule.length": 10}) and re-validate."""
        raw = self.to_dict()
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        return TrainConfig.from_dict(raw)

    def scaled_to(self, epochs: int) -> "TrainConfig":
        """The same recipe over `epochs`: the ε=0 warmup, the ramp and the LR milestones keep their fractions
        of the run (tune on short runs, then train the winner long)."""
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs: must be an integer >= 1, got {epochs!r}")
        f = epochs / self.epochs
        return self.with_overrides({"epochs": epochs, "schedule.start": 1 + round((self.schedule.start - 1) * f),
                                    "schedule.length": max(1, round(self.schedule.length * f)),
                                    "lr_milestones": [round(m * f) for m in self.lr_milestones]})

    # ---- method presets -----------------------------------------------------------------------
    def resolve(self) -> "TrainConfig":
        """Fill the None ('auto') fields from `method` and validate. Idempotent."""
        cfg = dataclasses.replace(self, schedule=dataclasses.replace(self.schedule),
                                  reg=dataclasses.replace(self.reg), data=dataclasses.replace(self.data),
                                  eval=dataclasses.replace(self.eval))
        fast = cfg.method == "fast"
        if cfg.init is None:
            cfg.init = "ibp" if fast else "default"
        if cfg.bound is None:
            cfg.bound = "crown-ibp" if cfg.method == "crown-ibp" else "ibp"
        if cfg.reg.tightness is None:
            cfg.reg.tightness = fast
        if cfg.reg.relu is None:
            cfg.reg.relu = fast
        cfg.validate()
        return cfg

    @property
    def uses_reg(self) -> bool:
        return bool(self.reg.tightness or self.reg.relu or self.reg.std) and self.reg.lambda0 > 0

    def validate(self) -> None:
        _choice("dataset", self.dataset, DATASETS)
        _choice("model", self.model, MODELS)
        _choice("method", self.method, METHODS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("bn", self.bn, BN_PLACEMENTS)
        if self.init is not None:
            _choice("init", self.init, INITS)
        if self.bound is not None:
            _choice("bound", self.bound, ("ibp", "crown-ibp"))
        _choice("schedule.kind", self.schedule.kind, SCHEDULES)
        for name in self.eval.metrics:
            _choice("eval.metrics", name, EVAL_METRICS)
        _positive("eps", self.eps)
        if self.eps > 1:
            raise ConfigError(f"eps: must be at most 1 (raw pixel scale), got {self.eps}")
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _positive("lr", self.lr)
        _positive_int("grad_accum", self.grad_accum)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"grad_accum: must divide batch_size ({self.batch_size}), got {self.grad_accum}")
        _nonneg("grad_clip", self.grad_clip)
        _nonneg("weight_decay", self.weight_decay)
        _positive("train_eps_mul", self.train_eps_mul)
        _in_open_closed("lr_decay", self.lr_decay, 0, 1)
        for m in self.lr_milestones:
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ConfigError(f"lr_milestones: each must be an epoch number >= 1, got {m!r}")
        s = self.schedule
        _positive_int("schedule.start", s.start)
        _nonneg_int("schedule.length", s.length)
        if s.start + s.length - 1 > self.epochs:
            raise ConfigError(
                f"schedule.length: the ramp (start {s.start} + length {s.length} - 1 = epoch "
                f"{s.start + s.length - 1}) must end by the last epoch ({self.epochs})")
        _in_open_closed("schedule.mid", s.mid, 0, 1)
        if s.mid == 1:
            raise ConfigError("schedule.mid: must be in (0, 1), got 1")
        _positive("schedule.beta", s.beta)
        if s.beta < 1:
            raise ConfigError(f"schedule.beta: must be >= 1, got {s.beta}")
        _nonneg("reg.lambda0", self.reg.lambda0)
        _positive("reg.tau", self.reg.tau)
        _positive("reg.min_eps", self.reg.min_eps)
        _nonneg_int("data.subset", self.data.subset)
        _positive_int("data.val_size", self.data.val_size)
        _nonneg_int("data.test_subset", self.data.test_subset)
        _positive_int("eval.batch_size", self.eval.batch_size)
        _nonneg_int("eval.pgd_steps", self.eval.pgd_steps)
        _positive_int("eval.pgd_restarts", self.eval.pgd_restarts)
        _positive("eval.pgd_step_size", self.eval.pgd_step_size)


# ---- helpers ----------------------------------------------------------------------------------
def _build(cls, raw: dict[str, Any], prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}'; allowed: {', '.join(sorted(known))}")
        f = known[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if is_dataclass(default):
            kwargs[key] = _build(type(default), value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, default, f.type)
    return cls(**kwargs)


def _coerce(name: str, value: Any, default: Any, type_name: str) -> Any:
    """Check a scalar against its field's declared type; YAML ints are accepted where floats are."""
    optional = "None" in str(type_name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must not be null")
    if isinstance(default, list) or str(type_name).startswith("list"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return list(value)
    t = str(type_name)
    if t.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if t.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if t.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if t.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown config key '{key}'")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key '{key}'")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings from the command line; values are parsed as YAML (so 0.1, true, [50,60])."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected KEY=VALUE")
        key, text = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(text) if text.strip() else None
    return out


def _choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name}: unknown value {value!r}; allowed: {', '.join(allowed)}")


def _positive(name, value):
    if not value > 0:
        raise ConfigError(f"{name}: must be > 0, got {value}")


def _nonneg(name, value):
    if not value >= 0:
        raise ConfigError(f"{name}: must be >= 0, got {value}")


def _positive_int(name, value):
    if not value >= 1:
        raise ConfigError(f"{name}: must be an integer >= 1, got {value}")


def _nonneg_int(name, value):
    if not value >= 0:
        raise ConfigError(f"{name}: must be an integer >= 0, got {value}")


def _in_open_closed(name, value, low, high):
    if not low < value <= high:
        raise ConfigError(f"{name}: must be in ({low}, {high}], got {value}")
