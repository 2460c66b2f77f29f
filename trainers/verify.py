"""Re-evaluate a saved checkpoint: clean, IBP-, CROWN-IBP-, CROWN-, α-CROWN-, BaB-verified and PGD errors on
test or validation."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable

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
                      device="cpu", verifier_options: VerifierOptions | None = None, limit: int | None = None,
                      progress: Callable[[int, int, str], None] | None = None) -> dict:
    """The errors of `methods` on the split (its first `limit` examples when given). `progress(done, total,
    what runs now)` is called as examples are done (ProgressLine prints it)."""
    methods = check_methods(methods)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"--limit: must be an integer >= 1, got {limit!r}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1):
        raise ConfigError(f"--eps: must be in (0, 1], the L∞ radius on the [0, 1] pixel scale, got {eps}")
    device = pick_device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, cfg = load_model(checkpoint, device)
    splits = load_splits(cfg.dataset, data_dir, cfg.data, cfg.seed)
    examples = getattr(splits, split)
    if len(examples) == 0:  # an .npz may hold no test images; an error rate over nothing is no number
        raise ConfigError(f"--split {split}: the {cfg.dataset} data at {data_dir or 'the data dir'} has no "
                          f"{split} examples to verify")
    if limit is not None and limit < len(examples):
        examples = ImageDataset(examples.images, examples.labels, examples.indices[:limit], examples.augment)
    loader = make_loader(examples, cfg.eval.batch_size, shuffle=False)
    box = InputBox.for_stats(splits.mean, splits.std, device)
    e = cfg.eval
    total = len(examples)
    out = evaluate(model, loader, eps if eps is not None else cfg.eps, box, splits.num_classes,
                   (CLEAN,) + tuple(methods), e.pgd_steps, e.pgd_restarts, e.pgd_step_size, device,
                   verifier_options, None if progress is None else lambda done, stage: progress(done, total, stage))
    keys = ["n", "clean_err"] + [METRIC_OF[m] for m in methods] + [c for m in methods for c in VERIFIERS[m].counts]
    if "verified_err" in out:  # with CROWN, α-CROWN or BaB: verified by any verifier that ran (IBP always does)
        keys.append("verified_err")
    return {k: out[k] for k in keys}


def check_methods(methods, flag: str = "--methods") -> tuple[str, ...]:
    """The verifiers asked for: a non-empty list of known names, each once (`flag`: as the user wrote it)."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = tuple(dict.fromkeys(methods))
    if not methods:
        raise ConfigError(f"{flag}: name at least one of {', '.join(METRIC_OF)}")
    unknown = [m for m in methods if m not in METRIC_OF]
    if unknown:
        raise ConfigError(f"{flag}: unknown {', '.join(map(repr, unknown))}; allowed: {', '.join(METRIC_OF)}")
    return methods


class ProgressLine:
    """`certtune verify`'s progress on stderr (stdout stays the JSON result alone): examples done of the
    total, seconds so far and, from the rate so far, left, and what runs now; at most one line per `every_s`
    seconds (0: every call). α-CROWN and BaB over 10,000 test images take hours on a CPU."""

    def __init__(self, every_s: float = 10.0, stream=None):
        if isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or not 0 <= every_s < math.inf:
            raise ConfigError(f"--progress-every: must be a number of seconds >= 0, got {every_s!r}")
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stderr
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int, stage: str = "") -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        spent = now - self.start
        left = f", about {spent * (total - done) / done:.0f} s left" if 0 < done < total else ""
        running = f"; running {stage}" if stage else ""
        print(f"certtune verify: {done}/{total} examples done in {spent:.0f} s{left}{running}",
              file=self.stream, flush=True)


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
