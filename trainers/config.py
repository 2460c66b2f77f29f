"""TrainConfig: every knob of a training run, validated in one place.

A config is a tree of plain dataclasses. `method` is a preset: fields left at None ("auto") are filled
from it by `resolve()`, so each ingredient (init, BN placement, regularizers, bound) can also be set on
its own. The resolved config is what gets written next to a run and what a search exports.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, shown
from .verifiers import CLEAN, names

METHODS = ("vanilla", "crown-ibp", "fast", "sabr", "mtl-ibp", "cc-ibp", "exp-ibp", "taps", "staps")
IBP_FAMILY = ("vanilla", "crown-ibp", "fast")  # the 2021 methods; the others are docs/methods.md's newer ones
DATASETS = ("mnist", "cifar10", "tinyimagenet")
MODELS = ("cnn7", "wrn8", "resnext", "cnn_small")
BN_PLACEMENTS = ("full", "conv", "none")
INITS = ("ibp", "default", "kaiming", "orthogonal")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("smoothed", "linear")
EVAL_METRICS = (CLEAN, *names(per_epoch=True))  # trainers/verifiers.py
TRAINING_BOUNDS = ("ibp", "crown-ibp")  # the bounds a training loss can take (`bound`), not verifiers
# Sizes past which a value is a typo or an attack, not a plan: refused before anything runs.
MAX_INT = 10**12
MAX_LIST = 1000
MAX_EPOCHS = 100_000
MAX_BATCH = 1 << 20
MAX_STEPS = 100_000


@dataclass
class ScheduleConfig:
    kind: str = "smoothed"  # smoothed (auto_LiRPA SmoothedScheduler) or linear
    # In epochs, whole or fractional (a fraction of an epoch is that fraction of its batches: trainers/schedules.py)
    start: int | float = 1  # 1-based epoch whose first batch begins the ramp (epochs before it use ε = 0)
    length: int | float = 20  # ramp length in epochs
    mid: float = 0.25  # smoothed: fraction of the ramp spent in the polynomial phase
    beta: float = 4.0  # smoothed: exponent of the polynomial phase


@dataclass
class RegConfig:
    tightness: bool | None = None  # None: on for `fast` and the newer methods (not vanilla, crown-ibp)
    relu: bool | None = None  # None: as tightness
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
class SabrConfig:
    """SABR (Müller et al., ICLR 2023), also STAPS's small box. docs/methods.md."""
    ratio: float = 0.4  # λ: the small box's radius as a fraction of the ε-box's half-width, in (0, 1]
    pgd_steps: int = 8  # PGD steps of the attack that places the small box
    pgd_step_size: float = 0.5  # per step, as a fraction of the attack's ε


@dataclass
class ExpressiveConfig:
    """MTL-IBP / CC-IBP / Exp-IBP (De Palma et al., ICLR 2024). docs/methods.md."""
    alpha: float = 0.5  # α in [0, 1]: 0 is the adversarial loss, 1 the IBP loss
    attack_eps_scale: float = 1.0  # the attack searches the box of radius attack_eps_scale·ε
    pgd_steps: int = 1
    pgd_step_size: float = 1.0  # per step, as a fraction of the attack's ε


@dataclass
class TapsConfig:
    """TAPS / STAPS (Mao et al., NeurIPS 2023). docs/methods.md."""
    head_relus: int = 1  # ReLU layers in the classifier head; the model splits after the ReLU before them
    gradient_scale: float = 4.0  # w: the TAPS factor's gradient is multiplied by w (L = L_TAPS·L_IBP)
    soft_threshold: float = 0.5  # c in (0, 0.5]: the gradient connector's linear zone, a fraction of the box
    pgd_steps: int = 8  # steps of the search for the worst point in the latent box, per class
    pgd_step_size: float = 0.4  # per step, as a fraction of the latent box's half-width


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
    lr_milestones: list[int | float] = field(default_factory=lambda: [50, 60])  # epochs after which lr *= lr_decay
    lr_decay: float = 0.2
    grad_clip: float = 10.0  # max total grad norm; 0 = off
    grad_accum: int = 1
    train_eps_mul: float = 1.0  # the training ε is the scheduled ε times this
    init: str | None = None  # None: `default` for vanilla and crown-ibp, `ibp` otherwise
    bn: str = "full"  # BN after every conv and hidden linear (full), convs only, or none
    bound: str | None = None  # training bound: None → crown-ibp for method crown-ibp, else ibp
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sabr: SabrConfig = field(default_factory=SabrConfig)  # method sabr, staps
    expressive: ExpressiveConfig = field(default_factory=ExpressiveConfig)  # mtl-ibp, cc-ibp, exp-ibp
    taps: TapsConfig = field(default_factory=TapsConfig)  # taps, staps

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        cfg = _build(cls, raw or {}, prefix="")
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        from .safe_yaml import read_yaml_file  # here: a GPU machine with only torch builds configs from dicts

        raw = read_yaml_file(path, "config file")
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
        return cls.from_dict(raw or {})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        """Write atomically (a fresh temporary file, then rename; trainers/files.py): a crash never leaves half
        a config, and a link at `path` is never written through."""
        self.write_yaml(path)

    def write_yaml(self, path: str | Path, header: str = "") -> None:
        """As to_yaml, with `header` (comment lines) before the config."""
        import yaml

        from .files import write_atomic

        write_atomic(Path(path), header + yaml.safe_dump(self.to_dict(), sort_keys=False))

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
                                  eval=dataclasses.replace(self.eval), sabr=dataclasses.replace(self.sabr),
                                  expressive=dataclasses.replace(self.expressive),
                                  taps=dataclasses.replace(self.taps))
        # fast, and every newer method as CTBench runs it: IBP init and both warmup regularizers.
        fast = cfg.method not in ("vanilla", "crown-ibp")
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
            _choice("bound", self.bound, TRAINING_BOUNDS)
            if self.bound == "crown-ibp" and self.method not in IBP_FAMILY:
                raise ConfigError(f"bound: crown-ibp applies to methods {', '.join(IBP_FAMILY)}, "
                                  f"not {self.method} (which bounds with IBP)")
        _choice("schedule.kind", self.schedule.kind, SCHEDULES)
        for name in self.eval.metrics:
            _choice("eval.metrics", name, EVAL_METRICS)
        _positive("eps", self.eps)
        if self.eps > 1:
            raise ConfigError(f"eps: must be at most 1 (raw pixel scale), got {self.eps}")
        _positive_int("epochs", self.epochs)
        _at_most("epochs", self.epochs, MAX_EPOCHS)
        _positive_int("batch_size", self.batch_size)
        _at_most("batch_size", self.batch_size, MAX_BATCH)
        _positive("lr", self.lr)
        _positive_int("grad_accum", self.grad_accum)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"grad_accum: must divide batch_size ({self.batch_size}), got {self.grad_accum}")
        _nonneg("grad_clip", self.grad_clip)
        _nonneg("weight_decay", self.weight_decay)
        _positive("train_eps_mul", self.train_eps_mul)
        _in_open_closed("lr_decay", self.lr_decay, 0, 1)
        for m in self.lr_milestones:
            if not _is_epoch_count(m) or not (m >= 1 if isinstance(m, int) else m > 0):
                raise ConfigError(f"lr_milestones: each must be an epoch number >= 1 (or a fraction of epochs "
                                  f"> 0), got {shown(m)}")
        s = self.schedule
        for name, value in (("schedule.start", s.start), ("schedule.length", s.length)):
            if not _is_epoch_count(value):
                raise ConfigError(f"{name}: expected a number of epochs, got {shown(value)}")
        if not s.start >= 1:
            raise ConfigError(f"schedule.start: must be >= 1 (an epoch number), got {s.start}")
        _nonneg("schedule.length", s.length)
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
        _at_most("eval.batch_size", self.eval.batch_size, MAX_BATCH)
        _nonneg_int("eval.pgd_steps", self.eval.pgd_steps)
        _at_most("eval.pgd_steps", self.eval.pgd_steps, MAX_STEPS)
        _positive_int("eval.pgd_restarts", self.eval.pgd_restarts)
        _at_most("eval.pgd_restarts", self.eval.pgd_restarts, MAX_STEPS)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed: must be in [0, 2**32), got {self.seed}")
        _positive("eval.pgd_step_size", self.eval.pgd_step_size)
        self._validate_method_knobs()

    def _validate_method_knobs(self) -> None:
        _in_open_closed("sabr.ratio", self.sabr.ratio, 0, 1)
        _nonneg_int("sabr.pgd_steps", self.sabr.pgd_steps)
        _at_most("sabr.pgd_steps", self.sabr.pgd_steps, MAX_STEPS)
        _positive("sabr.pgd_step_size", self.sabr.pgd_step_size)
        if not 0 <= self.expressive.alpha <= 1:
            raise ConfigError(f"expressive.alpha: must be in [0, 1], got {self.expressive.alpha}")
        _positive("expressive.attack_eps_scale", self.expressive.attack_eps_scale)
        _nonneg_int("expressive.pgd_steps", self.expressive.pgd_steps)
        _at_most("expressive.pgd_steps", self.expressive.pgd_steps, MAX_STEPS)
        _positive("expressive.pgd_step_size", self.expressive.pgd_step_size)
        _positive_int("taps.head_relus", self.taps.head_relus)
        _nonneg("taps.gradient_scale", self.taps.gradient_scale)
        _in_open_closed("taps.soft_threshold", self.taps.soft_threshold, 0, 0.5)
        _nonneg_int("taps.pgd_steps", self.taps.pgd_steps)
        _at_most("taps.pgd_steps", self.taps.pgd_steps, MAX_STEPS)
        _positive("taps.pgd_step_size", self.taps.pgd_step_size)
        if self.method in ("taps", "staps"):
            relus = top_level_relus(self.model, self.dataset, self.bn)
            if self.taps.head_relus >= relus:
                raise ConfigError(f"taps.head_relus: model {self.model} has {relus} ReLU layers at its top level, "
                                  f"so the head can hold 1 to {relus - 1}, got {self.taps.head_relus}")


def top_level_relus(model: str, dataset: str, bn: str) -> int:
    """How many nn.ReLU modules the model's top-level nn.Sequential holds (TAPS splits after one of them).
    The model is built on the meta device: no weights are allocated."""
    import torch
    from torch import nn

    from .models import build_model
    with torch.device("meta"):
        return sum(isinstance(m, nn.ReLU) for m in build_model(model, dataset, bn))


# ---- helpers ----------------------------------------------------------------------------------
def _build(cls, raw: dict[str, Any], prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {shown(raw)}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            name = key if isinstance(key, str) and len(key) <= 80 else shown(key)
            raise ConfigError(f"unknown config key '{prefix}{name}'; allowed: {', '.join(sorted(known))}")
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
            raise ConfigError(f"{name}: expected a list, got {shown(value)}")
        if len(value) > MAX_LIST:
            raise ConfigError(f"{name}: at most {MAX_LIST} entries, got {len(value)}")
        return list(value)
    t = str(type_name)
    if t == "int | float":  # epochs, whole or fractional: kept as given (range checks: validate)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name}: expected a number, got {shown(value)}")
        if abs(value) > MAX_INT:
            raise ConfigError(f"{name}: {shown(value)} is out of range (at most {MAX_INT:.0e} in size)")
        return value
    if t.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {shown(value)}")
        return value
    if t.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {shown(value)}")
        if abs(value) > MAX_INT:
            raise ConfigError(f"{name}: {shown(value)} is out of range (at most {MAX_INT:.0e} in size)")
        return value
    if t.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {shown(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{name}: must be a finite number, got {value}")
        return float(value)
    if t.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {shown(value)}")
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
    """`KEY=VALUE` strings from the command line; values are parsed as YAML by the config reader (so 0.1,
    1e-3, true, [50,60])."""
    from .safe_yaml import MAX_OVERRIDE_CHARS, parse_yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected KEY=VALUE")
        key, text = item.split("=", 1)
        if len(item) > MAX_OVERRIDE_CHARS:
            raise ConfigError(f"override {shown(item)}: {len(item)} characters; at most {MAX_OVERRIDE_CHARS}")
        out[key.strip()] = parse_yaml(text, f"override {shown(item)}") if text.strip() else None
    return out


def _is_epoch_count(value) -> bool:
    """A whole or fractional number of epochs: an int, or a finite float (not a bool)."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and math.isfinite(value))


def _choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name}: unknown value {shown(value)}; allowed: {', '.join(allowed)}")


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


def _at_most(name, value, high):
    if value > high:
        raise ConfigError(f"{name}: at most {high}, got {value}")


def _in_open_closed(name, value, low, high):
    if not low < value <= high:
        raise ConfigError(f"{name}: must be in ({low}, {high}], got {value}")
