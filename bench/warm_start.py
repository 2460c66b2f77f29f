"""Does a warm start pay? A search warm-started from an earlier one against a cold one, same new trial-epochs.

    python -m bench.warm_start --seeds 0 1 2                                   # the full setting
    python -m bench.warm_start --seeds 0 --source-budget 50 --budget 20 epochs=5 data.subset=1000 \\
        data.val_size=300                                                       # small (what was run here)

Setting: search_spaces/mnist_small_budget.yaml on real MNIST (KEY=VALUE overrides of its base shrink it),
Optuna TPE, no early stopping. Per seed:
  source  a TPE search of `--source-budget` trial-epochs (sampler seed 1000 + seed): the earlier search;
  warm    `--warm-start source`, then `--budget` new trial-epochs (its study starts with source's finished
          and pruned trials, so TPE models from its first new trial once source has >= 10 of them);
  cold    a TPE search of `--budget` trial-epochs from nothing.
Warm and cold use the same sampler seed and training seed and both evaluate the space's defaults first.
Only their own new trials count for them (what the warm search itself trained): best validation IBP-verified
error of a finished trial against trial-epochs spent (`curve`), and at the end.
Prints one JSON object (also written to --out when given).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.search_quality import best_so_far

SPACE = "search_spaces/mnist_small_budget.yaml"


def run_arm(name: str, overrides: dict, seed: int, sampler_seed: int, budget: int, data_dir: str, storage: str,
            warm_start: str | None = None) -> dict:
    from tuner.results.experiment import load_search
    from tuner.run.driver import prepare_search, run_search

    record, store = prepare_search(SPACE, {**overrides, "seed": seed}, name, 10_000, 2, "cpu=1", "none", "ibp_err",
                                   storage, None, None, data_dir, sampler_seed, "tpe", budget, warm_start=warm_start)
    start = time.perf_counter()
    run_search(record, store)
    wall = time.perf_counter() - start
    search = load_search(name, store)
    best = search.best()
    return {"name": name, "trial_epochs": search.trial_epochs(), "trials": len(search.trials),
            "counts": search.counts(), "wall_s": round(wall, 1),
            "best_val_ibp_err": best.value("ibp_err") if best else None, "curve": best_so_far(search)}


def main(argv=None) -> dict:
    from trainers.config import parse_overrides
    from tuner.run.driver import connect_ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the space's base config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--source-budget", type=int, default=96, help="trial-epochs of the earlier search (96)")
    parser.add_argument("--budget", type=int, default=48, help="new trial-epochs of warm and cold (48)")
    parser.add_argument("--data-dir", default=os.environ.get("CERTTUNE_DATA", "../shared/data"))
    parser.add_argument("--work", default=None, help="where the searches go (default: a new temporary folder)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    storage = str(Path(args.work or tempfile.mkdtemp(prefix="warm_start_")).resolve())
    connect_ray(None)
    runs = []
    for seed in args.seeds:
        source = run_arm(f"source-s{seed}", overrides, seed, 1000 + seed, args.source_budget, args.data_dir, storage)
        warm = run_arm(f"warm-s{seed}", overrides, seed, seed, args.budget, args.data_dir, storage,
                       warm_start=f"source-s{seed}")
        cold = run_arm(f"cold-s{seed}", overrides, seed, seed, args.budget, args.data_dir, storage)
        runs.append({"seed": seed, "source": source, "warm": warm, "cold": cold})
    result = {"space": SPACE, "overrides": overrides, "source_budget": args.source_budget, "budget": args.budget,
              "seeds": args.seeds, "runs": runs,
              "warm_minus_cold": [r["warm"]["best_val_ibp_err"] - r["cold"]["best_val_ibp_err"]
                                  for r in runs if r["warm"]["best_val_ibp_err"] is not None
                                  and r["cold"]["best_val_ibp_err"] is not None]}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
