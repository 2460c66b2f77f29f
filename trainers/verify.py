"""Re-evaluate a saved checkpoint: clean, IBP-, CROWN-IBP-, CROWN-, α-CROWN-, BaB-verified and PGD errors on
test or validation."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint, load_weights
from .config import ConfigError, TrainConfig
from .data import ImageDataset, load_splits, make_loader
from .device import pick_device
from .evaluate import evaluate
from .input_box import InputBox
from .models import build_model
from .verifiers import CLEAN, VERIFIERS, VerifierOptions, default, names

METRIC_OF = {v.name: v.metric for v in VERIFIERS.values()}  # verifier → reported key (trainers/verifiers.py)


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


def verify_checkpoint(checkpoint, data_dir=None, split="test", eps=None, methods=names(per_epoch=True),
                      device="cpu", verifier_options: VerifierOptions | None = None, limit: int | None = None) -> dict:
    """The errors of `methods` on the split (its first `limit` examples when given)."""
    methods = check_methods(methods)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"--verify-n: must be an integer >= 1, got {limit!r}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1):
        raise ConfigError(f"--eps: must be in (0, 1], the L∞ radius on the [0, 1] pixel scale, got {eps}")
    device = pick_device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, cfg = load_model(checkpoint, device)
    splits = load_splits(cfg.dataset, data_dir, cfg.data, cfg.seed)
    examples = getattr(splits, split)
    if limit is not None and limit < len(examples):
        examples = ImageDataset(examples.images, examples.labels, examples.indices[:limit], examples.augment)
    loader = make_loader(examples, cfg.eval.batch_size, shuffle=False)
    box = InputBox.for_stats(splits.mean, splits.std, device)
    e = cfg.eval
    out = evaluate(model, loader, eps if eps is not None else cfg.eps, box, splits.num_classes,
                   (CLEAN,) + tuple(methods), e.pgd_steps, e.pgd_restarts, e.pgd_step_size, device,
                   verifier_options)
    keys = ["n", "clean_err"] + [METRIC_OF[m] for m in methods] + [c for m in methods for c in VERIFIERS[m].counts]
    if "verified_err" in out:  # with CROWN, α-CROWN or BaB: verified by any verifier that ran (IBP always does)
        keys.append("verified_err")
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


def verifier_options(alpha_iterations=default("alpha_iterations"), alpha_lr=default("alpha_lr"),
                     bab_time_limit=default("bab_time_limit")) -> VerifierOptions:
    """α-CROWN's and BaB's knobs, checked: a step count, a step size and a per-example time limit."""
    if isinstance(alpha_iterations, bool) or not isinstance(alpha_iterations, int) or not 0 <= alpha_iterations <= 10_000:
        raise ConfigError(f"--alpha-iterations: must be an integer in [0, 10000], got {alpha_iterations!r}")
    if not isinstance(alpha_lr, (int, float)) or not 0 < alpha_lr < math.inf:
        raise ConfigError(f"--alpha-lr: must be a finite number > 0, got {alpha_lr!r}")
    if not isinstance(bab_time_limit, (int, float)) or not 0 < bab_time_limit <= 86_400:
        raise ConfigError(f"--bab-time-limit: must be in (0, 86400] seconds, got {bab_time_limit!r}")
    return VerifierOptions(alpha_iterations, float(alpha_lr), float(bab_time_limit))
