"""The paper's recipe at full length against a searched recipe at half the epochs, on the full real MNIST.

    python -m bench.shorter_warmup paper    --eps 0.4 --seed 0      # the paper arm: 70 epochs (one run)
    python -m bench.shorter_warmup search   --eps 0.4               # the search (cheap fidelity)
    python -m bench.shorter_warmup searched --eps 0.4 --seed 0      # its best recipe, 35 epochs (one run)
    python -m bench.shorter_warmup collect                          # test figures, JSON, plot, table

Setting: `cnn_small`, the full MNIST training set less 5,000 validation images (55,000 / 5,000), the full
10,000-image test set for the figures (read only by `collect`, through `certtune verify`).

- paper: configs/mnist_eps0.4_cnn7.yaml (Shi et al. 2021: `fast`, 70 epochs = 0 + 20 ramp + 50, Adam 5e-4,
  batch 256, LR ×0.2 after epochs 50 and 60, grad clip 10, IBP init, full BN, both warmup regularizers) with
  `model=cnn_small`, the only change (the issue's model; nothing in the recipe depends on CNN-7).
- search: `certtune search search_spaces/mnist_short_warmup.yaml` (`--space`): the paper's method as published,
  tuning what a half budget changes (ramp length and shape, LR and its decay point, batch, clipping, training
  radius, regularizer weight), the paper's recipe halved first; each trial runs `--trial-epochs` (default 35,
  the final length, so nothing is rescaled) on a `--subset`-image subset of the training split (default
  20,000), selected on the 5,000 validation images, TPE with warmup-aware ASHA, `--trials` trials.
  `--defaults K=V` (repeated) changes the space's defaults point, the first trial (bench/spaces.py).
  The first attempt, `--space search_spaces/mnist_small_budget.yaml --trial-epochs 10 --subset 10000`,
  searched the method's parts too at 10-epoch trials; docs/benchmarks.md says why it fell short.
- searched: the search's best trial (`certtune export --epochs 35`: warmup, ramp and milestones keep their
  fractions) trained on the full training split for 35 epochs.
Runs go to `--work` (default bench_runs/shorter_warmup/), one directory per arm, ε and seed; a run that is
interrupted resumes from its last.pt when started again. `collect` verifies every finished run's last.pt on the
test set (clean, IBP, CROWN-IBP, PGD-20) and writes bench/results/shorter_warmup.json (one entry per arm, ε and
seed), bench/results/shorter_warmup.png and a markdown table on stdout.
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.runs import epoch_rows, fingerprint, bench_parser, save_figure

PAPER_CONFIG = "configs/mnist_eps0.4_cnn7.yaml"
SPACE = "search_spaces/mnist_short_warmup.yaml"
TRAIN_SIZE, VAL_SIZE = 55_000, 5_000
RESULTS = Path("bench/results/shorter_warmup.json")
PLOT = Path("bench/results/shorter_warmup.png")


def run_dir(work: Path, arm: str, eps: float, seed: int) -> Path:
    return work / f"{arm}_eps{eps}_seed{seed}"


def search_name(eps: float) -> str:
    return f"search_eps{eps}"


def train(config, overrides: dict, out: Path, data_dir: str) -> None:
    from tuner import api

    def show(metrics, _):
        keys = ("epoch", "eps", "clean_err", "ibp_err", "time_epoch_s")
        print(json.dumps({k: metrics[k] for k in keys if k in metrics}), flush=True)

    api.train(config, overrides, data_dir=data_dir, out=out, on_epoch=show)


def extra(args) -> dict:
    """KEY=VALUE overrides given after the fixed ones (tests shrink the runs with them)."""
    from trainers.config import parse_overrides

    return parse_overrides(args.overrides)


def cmd_paper(args) -> None:
    overrides = {"model": "cnn_small", "eps": args.eps, "seed": args.seed, "data.val_size": VAL_SIZE, **extra(args)}
    train(PAPER_CONFIG, overrides, run_dir(args.work, "paper", args.eps, args.seed), args.data_dir)


def cmd_search(args) -> None:
    from tuner import api

    overrides = {"eps": args.eps, "epochs": args.trial_epochs, "data.subset": args.subset,
                 "data.val_size": VAL_SIZE, "eval.metrics": ["clean", "ibp"], **extra(args)}
    from bench.spaces import space_with_defaults

    space = space_with_defaults(args.space, args.defaults, args.work / f"{Path(args.space).stem}_eps{args.eps}.yaml",
                                overrides)
    api.search(space, overrides, name=search_name(args.eps), num_samples=args.trials, max_concurrent=args.concurrent,
               resources_per_trial=f"cpu={args.cpus_per_trial}", scheduler="asha", storage=str(args.work.resolve()),
               data_dir=args.data_dir, seed=args.seed, fidelity="target")  # trials train the base as given (subset)


def searched_config(work: Path, eps: float, epochs: int) -> Path:
    from tuner import api

    out = work / f"export_eps{eps}"
    api.export(search_name(eps), storage=str(work.resolve()), out=out, epochs=epochs)
    return out / f"best_{epochs}ep.yaml"


def cmd_searched(args) -> None:
    config = searched_config(args.work, args.eps, args.epochs)
    overrides = {"seed": args.seed, "data.subset": 0, "data.val_size": VAL_SIZE,  # the full training split
                 **extra(args)}
    train(config, overrides, run_dir(args.work, "searched", args.eps, args.seed), args.data_dir)


def finished(run: Path) -> list[dict] | None:
    """The run's per-epoch metrics if it ran all its epochs, else None."""
    rows = epoch_rows(run) if (run / "last.pt").is_file() else []
    return rows if rows and rows[-1]["epoch"] == rows[-1]["epochs"] else None


def search_cost(work: Path, eps: float) -> dict | None:
    from tuner.results.experiment import load_search

    try:
        search = load_search(search_name(eps), str(work.resolve()))
    except ValueError:
        return None
    subset = search.record.overrides.get("data.subset", TRAIN_SIZE)
    epochs = search.trial_epochs()
    return {"search_trial_epochs": epochs, "search_subset": subset, "search_trials": len(search.trials),
            "search_counts": search.counts(), "search_full_epoch_equivalents": round(epochs * subset / TRAIN_SIZE, 2)}


def cmd_collect(args) -> None:
    from tuner import api

    old = {(e["arm"], e["eps"], e["seed"]): e for e in json.loads(args.out.read_text())} if args.out.exists() else {}
    entries = []
    for run in sorted(p for p in args.work.glob("*_eps*_seed*") if p.is_dir()):  # not the runs' logs
        arm, eps, seed = run.name.split("_eps")[0], float(run.name.split("_eps")[1].split("_seed")[0]), \
            int(run.name.split("_seed")[1])
        rows = finished(run)
        if rows is None:
            print(f"{run}: not finished, left out", flush=True)
            continue
        kept = old.get((arm, eps, seed))
        checkpoint = fingerprint(run / "last.pt")
        reuse = kept is not None and kept.get("checkpoint") == checkpoint and not args.reverify
        test = kept["test"] if reuse else api.verify(run / "last.pt", data_dir=args.data_dir,
                                                     methods="ibp,crown-ibp,pgd")
        entry = {"arm": arm, "eps": eps, "seed": seed, "epochs": rows[-1]["epochs"],
                 "test": {k: test[k] for k in ("n", "clean_err", "ibp_err", "crown_ibp_err", "pgd_err")},
                 "checkpoint": checkpoint,
                 "train_seconds": round(rows[-1].get("train_seconds", 0.0), 1),
                 "val_curve": [[r["epoch"], r.get("ibp_err")] for r in rows]}
        if arm == "searched":
            entry.update(search_cost(args.work, eps) or {})
        entries.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "val_curve"}), flush=True)
    args.out.write_text(json.dumps(entries, indent=1) + "\n")
    print(table(entries))
    plot(entries, args.plot)


def table(entries: list[dict]) -> str:
    import statistics

    lines = ["| ε | arm | epochs | seeds | clean | IBP-verified | CROWN-IBP-verified | PGD | search trial-epochs |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        groups.setdefault((e["eps"], e["arm"]), []).append(e)
    for (eps, arm), group in sorted(groups.items()):
        def cell(key):
            values = [100 * g["test"][key] for g in group]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.2f} ± {sd:.2f}"
        cost = group[0].get("search_trial_epochs")
        extra = (f"{cost} ({group[0]['search_full_epoch_equivalents']} full-data epochs)" if cost else "–")
        lines.append(f"| {eps} | {arm} | {group[0]['epochs']} | {len(group)} | {cell('clean_err')} | "
                     f"{cell('ibp_err')} | {cell('crown_ibp_err')} | {cell('pgd_err')} | {extra} |")
    return "\n".join(lines)


def plot(entries: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epss = sorted({e["eps"] for e in entries})
    fig, axes = plt.subplots(1, max(1, len(epss)), figsize=(6 * max(1, len(epss)), 4.2), squeeze=False)
    colors = {"paper": "tab:blue", "searched": "tab:orange"}
    for ax, eps in zip(axes[0], epss):
        for e in (e for e in entries if e["eps"] == eps):
            curve = [(x, y) for x, y in e["val_curve"] if y is not None]
            ax.plot([x for x, _ in curve], [100 * y for _, y in curve], color=colors.get(e["arm"], "gray"),
                    alpha=0.5, lw=1)
            ax.scatter([e["epochs"]], [100 * e["test"]["ibp_err"]], color=colors.get(e["arm"], "gray"),
                       edgecolor="black", zorder=3)
        for arm, color in colors.items():
            ax.plot([], [], color=color, label=f"{arm}: validation, per epoch (lines); test, final (dots)")
        ax.set(title=f"MNIST ε = {eps}, cnn_small", xlabel="epoch", ylim=(0, 50),  # ramp epochs (100 %) clipped
               ylabel="IBP-verified error at the target ε (%)")
    save_figure(fig, axes[0], path, 8)


def main(argv=None) -> None:
    parser, sub, common = bench_parser(__doc__, "bench_runs/shorter_warmup")
    for name in ("paper", "searched", "search"):
        p = sub.add_parser(name, parents=[common])
        p.add_argument("--eps", type=float, required=True)
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="after the fixed overrides")
        if name != "search":
            p.add_argument("--seed", type=int, required=True)
    sub.choices["searched"].add_argument("--epochs", type=int, default=35)
    s = sub.choices["search"]
    s.add_argument("--trials", type=int, default=16)
    s.add_argument("--space", default=SPACE, help=f"the search space file (default {SPACE})")
    s.add_argument("--trial-epochs", type=int, default=35)
    s.add_argument("--subset", type=int, default=20_000)
    s.add_argument("--concurrent", type=int, default=1)
    s.add_argument("--cpus-per-trial", type=int, default=1)
    s.add_argument("--seed", type=int, default=0, help="the sampler's seed (trials train with the space's seed)")
    s.add_argument("--defaults", action="append", default=[], metavar="K=V",
                   help="change the space's defaults point, its first trial (e.g. the paper's recipe scaled to "
                        "other --trial-epochs); repeat")
    c = sub.add_parser("collect", parents=[common])
    c.add_argument("--reverify", action="store_true", help="verify again runs already in the JSON")
    c.add_argument("--out", type=Path, default=RESULTS)
    c.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    {"paper": cmd_paper, "search": cmd_search, "searched": cmd_searched, "collect": cmd_collect}[args.cmd](args)


if __name__ == "__main__":
    main()
