"""Does the search pay? Part 1: how well each fidelity ranks recipes for the target run (issue 19 §1).

    python -m bench.search_pays fidelity --eps 0.3 --worker 0 --workers 2   # and --worker 1: the runs, resumable
    python -m bench.search_pays fidelity-collect --eps 0.3                  # Spearman per fidelity -> JSON

Setting (`--space`, default): search_spaces/mnist_short_warmup.yaml (the paper's `fast` method on cnn_small; the target run is 35 epochs
on the full MNIST training split less 5,000 validation images). `--configs` points (default 12): the space's
defaults (the paper's recipe halved) and points sampled uniformly at random from the space (Optuna's
RandomSampler, seed = the point's index). Each point is trained at the target run and at every fidelity of
`--fidelities`, one `certtune train --out` directory each under `--work` (a run interrupted resumes when started
again; `--worker K --workers N` trains the points whose index is K mod N, so N processes share the work).

- `today:20000`: the fidelity searches used before issue 19: 20,000 training images at the target's batch size
  (the schedule, in epochs, then falls at other steps);
- `subset:20000`: 20,000 images, the batch scaled so each epoch keeps its steps (tuner/fidelity.py);
- `epochs:9`: the full data for 9 epochs, every phase compressed.

`fidelity-collect` reads every point whose runs have all finished, takes each run's final-epoch validation
IBP-verified error (what a search ranks by), and writes, per fidelity, the Spearman rank correlation with the
target runs, the points used and the cost of one run in full-data epochs, to bench/results/search_pays_fidelity.json.
The test split is not read.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench.runs import epoch_rows

SPACE = "search_spaces/mnist_short_warmup.yaml"
FIDELITIES = "today:20000,subset:20000,epochs:9"
RESULTS = Path("bench/results/search_pays_fidelity.json")


def points(space_file: str, n: int) -> list[dict]:
    """The defaults point, then points sampled at random (the point's index seeds the sampler)."""
    import optuna

    from tuner.spaces import load_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(space_file)
    out = [space.default_point()]
    for i in range(1, n):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=i))
        out.append(space.suggest(study.ask()))
    return out


def fidelities(args) -> list[str]:
    return [f.strip() for f in args.fidelities.split(",") if f.strip()]


def run_configs(args, point: dict) -> dict:
    """{"target": TrainConfig, fidelity name: TrainConfig} for one point."""
    from trainers.config import parse_overrides
    from trainers.data import train_split_size
    from tuner.fidelity import Fidelity
    from tuner.spaces import load_space

    target = load_space(args.space).to_train_config(point).with_overrides(
        {"eps": args.eps, **parse_overrides(args.overrides)}).resolve()
    images = train_split_size(target.dataset, args.data_dir, target.data)
    configs = {"target": target}
    for name in fidelities(args):
        kind, _, size = name.partition(":")
        configs[name] = (target.with_overrides({"data.subset": int(size)}).resolve() if kind == "today"
                         else Fidelity.parse(name).trial_config(target, images))
    return configs


def run_dir(work: Path, eps: float, index: int, name: str) -> Path:
    return work / f"fidelity_eps{eps}" / f"p{index:02d}_{name.replace(':', '')}"


def finished(run: Path) -> list[dict] | None:
    rows = epoch_rows(run) if (run / "last.pt").is_file() else []
    return rows if rows and rows[-1]["epoch"] == rows[-1]["epochs"] else None


def cmd_fidelity(args) -> None:
    import torch

    from tuner import api

    torch.set_num_threads(args.threads)
    for index, point in enumerate(points(args.space, args.configs)):
        if index % args.workers != args.worker:
            continue
        configs = run_configs(args, point)
        for name in (*fidelities(args), "target"):  # the cheap runs first: they are the ones a search makes
            out = run_dir(args.work, args.eps, index, name)
            if finished(out):
                continue
            print(json.dumps({"point": index, "run": name, "out": str(out)}), flush=True)
            api.train(configs[name], data_dir=args.data_dir, out=out)


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation: Pearson's on the ranks (ties share their mean rank)."""
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else None  # a constant ranking: no correlation to speak of


def cmd_collect(args) -> None:
    from trainers.data import train_split_size

    names = fidelities(args)
    table: dict[int, dict[str, float]] = {}
    cost: dict[str, float] = {}
    all_points = points(args.space, args.configs)
    for index, point in enumerate(all_points):
        configs = run_configs(args, point)
        runs = {name: finished(run_dir(args.work, args.eps, index, name)) for name in (*names, "target")}
        if any(rows is None for rows in runs.values()):
            print(f"point {index}: not every run has finished, left out", flush=True)
            continue
        table[index] = {name: rows[-1]["ibp_err"] for name, rows in runs.items()}
        target = configs["target"]
        full = train_split_size(target.dataset, args.data_dir, target.data)
        for name, cfg in configs.items():  # images trained, in epochs over the full training split
            cost[name] = cfg.epochs * (cfg.data.subset or full) / full
    used = sorted(table)
    target = [table[i]["target"] for i in used]
    result = {"eps": args.eps, "space": args.space, "points": used,
              "point_params": {i: all_points[i] for i in used}, "val_ibp_err": table,
              "target_cost_full_data_epochs": round(cost.get("target", 0.0), 2),
              "fidelities": {name: {"spearman": spearman([table[i][name] for i in used], target)
                                    if len(used) > 2 else None,
                                    "cost_full_data_epochs": round(cost.get(name, 0.0), 2)} for name in names}}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["fidelities"], indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--work", type=Path, default=Path("bench_runs/search_pays"))
    common.add_argument("--data-dir", default=os.environ.get("CERTTUNE_DATA", "../shared/data"))
    common.add_argument("--eps", type=float, required=True)
    common.add_argument("--configs", type=int, default=12, help="points: the defaults, then random ones")
    common.add_argument("--space", default=SPACE)
    common.add_argument("--fidelities", default=FIDELITIES,
                        help="comma list of today:N (N images at the target's batch), subset:N, epochs:E")
    common.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="after the point's config (tests shrink runs)")
    f = sub.add_parser("fidelity", parents=[common])
    f.add_argument("--worker", type=int, default=0)
    f.add_argument("--workers", type=int, default=1)
    f.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    c = sub.add_parser("fidelity-collect", parents=[common])
    c.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    {"fidelity": cmd_fidelity, "fidelity-collect": cmd_collect}[args.cmd](args)


if __name__ == "__main__":
    main()
