"""Verification throughput: images per second of each verifier on a trained checkpoint, real test images.

    python -m bench.verify_throughput CHECKPOINT [--data-dir D] [--n 100] [--eps E] [--bab-time-limit 2]

Each verifier runs on its own over the same first `n` test images (one batch; BaB one image at a time),
so the figures are comparable: ibp, crown-ibp, crown, alpha-crown (20 iterations), bab, and a 20-step PGD.
Prints one JSON object: per verifier, seconds, images/s and how many images it verified (PGD: broke).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from trainers.alpha_crown import alpha_crown_bounds
from trainers.attacks import pgd_attack
from trainers.bab import VERIFIED, BabConfig, bab
from trainers.bounds import crown_ibp_bounds, ibp_bounds, margin_spec
from trainers.crown import crown_bounds
from trainers.data import load_splits
from trainers.device import pick_device
from trainers.input_box import InputBox
from trainers.verify import load_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--eps", type=float, default=None, help="default: the checkpoint's target eps")
    parser.add_argument("--bab-time-limit", type=float, default=2.0)
    args = parser.parse_args(argv)
    pick_device("cpu")
    model, cfg = load_model(args.checkpoint)
    splits = load_splits(cfg.dataset, args.data_dir, cfg.data, cfg.seed)
    x01, y = splits.test.__getitems__(list(range(args.n)))
    eps = args.eps if args.eps is not None else cfg.eps
    x, lower, upper = InputBox.for_stats(splits.mean, splits.std, "cpu").box(x01, eps)
    C = margin_spec(y, splits.num_classes)
    with torch.no_grad():
        right = model(x).argmax(1) == y

    def lower_bound(fn):
        return lambda: ((fn(model, lower, upper, C)[0] > 0).all(1) & right).sum().item()

    def run_bab():
        statuses, _ = bab(model, lower, upper, C, BabConfig(time_limit=args.bab_time_limit))
        return sum(s == VERIFIED and r for s, r in zip(statuses, right.tolist()))

    verifiers = {"ibp": lower_bound(ibp_bounds), "crown-ibp": lower_bound(crown_ibp_bounds),
                 "crown": lower_bound(crown_bounds), "alpha-crown": lower_bound(alpha_crown_bounds),
                 "bab": run_bab, "pgd": lambda: pgd_attack(model, x, y, lower, upper, 20).sum().item()}
    rows = []
    for name, run in verifiers.items():
        start = time.perf_counter()
        with torch.no_grad():
            count = run()
        seconds = time.perf_counter() - start
        rows.append({"verifier": name, "seconds": round(seconds, 3), "images_per_s": round(args.n / seconds, 2),
                     "broken" if name == "pgd" else "verified": count})
    print(json.dumps({"checkpoint": str(args.checkpoint), "model": cfg.model, "eps": eps, "n": args.n,
                      "clean_correct": int(right.sum()), "bab_time_limit_s": args.bab_time_limit,
                      "threads": torch.get_num_threads(), "results": rows}))


if __name__ == "__main__":
    main()
