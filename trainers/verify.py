"""Re-evaluate a saved checkpoint: clean, IBP-, CROWN-IBP-verified and PGD errors on test or validation."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint, load_weights
from .config import ConfigError, TrainConfig
from .data import load_splits, make_loader
from .evaluate import InputBox, evaluate
from .models import build_model
from .train import pick_device

METRIC_OF = {"ibp": "ibp_err", "crown-ibp": "crown_ibp_err", "pgd": "pgd_err"}  # method → reported key


def load_model(checkpoint: str | Path, device="cpu"):
    """The model and config saved in a checkpoint, read without running code (checkpoint.py)."""
    state = load_checkpoint(checkpoint, device)
    try:
        cfg = TrainConfig.from_dict(state["config"]).resolve()
    except ConfigError as e:
        raise CheckpointError(f"{checkpoint}: its config is not valid: {e}") from None
    model = build_model(cfg.model, cfg.dataset, bn=cfg.bn)
    load_weights(model, state["model"], checkpoint)
    return model.to(device).eval(), cfg


def verify_checkpoint(checkpoint, data_dir=None, split="test", eps=None, methods=("ibp", "crown-ibp", "pgd"),
                      device="cpu") -> dict:
    methods = check_methods(methods)
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1):
        raise ConfigError(f"--eps: must be in (0, 1], the L∞ radius on the [0, 1] pixel scale, got {eps}")
    device = pick_device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, cfg = load_model(checkpoint, device)
    splits = load_splits(cfg.dataset, data_dir, cfg.data, cfg.seed)
    loader = make_loader(getattr(splits, split), cfg.eval.batch_size, shuffle=False)
    box = InputBox.for_stats(splits.mean, splits.std, device)
    e = cfg.eval
    out = evaluate(model, loader, eps if eps is not None else cfg.eps, box, splits.num_classes,
                   ("clean",) + tuple(methods), e.pgd_steps, e.pgd_restarts, e.pgd_step_size, device)
    keys = ["n", "clean_err"] + [METRIC_OF[m] for m in methods]
    return {k: out[k] for k in keys}


def check_methods(methods) -> tuple[str, ...]:
    """The verification methods asked for: a non-empty list of known names, each once."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = tuple(dict.fromkeys(methods))
    if not methods:
        raise ConfigError(f"--methods: name at least one of {', '.join(METRIC_OF)}")
    unknown = [m for m in methods if m not in METRIC_OF]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(map(repr, unknown))}; allowed: {', '.join(METRIC_OF)}")
    return methods
