"""Re-evaluate a saved checkpoint: clean, IBP-, CROWN-IBP-, CROWN-, α-CROWN-, BaB-verified and PGD errors on
test or validation."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import TrainConfig
from .data import load_splits, make_loader
from .evaluate import InputBox, VerifierOptions, evaluate
from .models import build_model
from .train import pick_device


def load_model(checkpoint: str | Path, device="cpu"):
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location=device, weights_only=False)
    cfg = TrainConfig.from_dict(state["config"]).resolve()
    model = build_model(cfg.model, cfg.dataset, bn=cfg.bn)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def verify_checkpoint(checkpoint, data_dir=None, split="test", eps=None, methods=("ibp", "crown-ibp", "pgd"),
                      device="cpu", verifier_options: VerifierOptions | None = None) -> dict:
    device = pick_device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, cfg = load_model(checkpoint, device)
    splits = load_splits(cfg.dataset, data_dir, cfg.data, cfg.seed)
    loader = make_loader(getattr(splits, split), cfg.eval.batch_size, shuffle=False)
    box = InputBox.for_stats(splits.mean, splits.std, device)
    e = cfg.eval
    out = evaluate(model, loader, eps if eps is not None else cfg.eps, box, splits.num_classes,
                   ("clean",) + tuple(methods), e.pgd_steps, e.pgd_restarts, e.pgd_step_size, device,
                   verifier_options)
    keys = ["n", "clean_err"] + [METRIC_NAMES[m] for m in methods]
    if "bab" in methods:
        keys += ["bab_falsified", "bab_unknown"]
    return {k: out[k] for k in keys}


METRIC_NAMES = {"ibp": "ibp_err", "crown-ibp": "crown_ibp_err", "crown": "crown_err",
                "alpha-crown": "alpha_crown_err", "bab": "bab_err", "pgd": "pgd_err"}
