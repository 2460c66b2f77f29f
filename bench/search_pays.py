"""Does the search pay? How well each fidelity ranks recipes for the target run, and searches against the
paper's recipe and random search at equal compute (issue 19 §1, §4).

    python -m bench.search_pays fidelity --eps 0.3 --worker 0 --workers 2   # and --worker 1: the runs, resumable
    python -m bench.search_pays fidelity-collect --eps 0.3                  # Spearman, pick and regret per fidelity -> JSON
    python -m bench.search_pays search --arm certtune --eps 0.3 --search-seed 0   # and --arm random; seeds 0, 1
    python -m bench.search_pays retrain --arm certtune --eps 0.3 --search-seed 0  # its recipe, 3 fresh seeds
    python -m bench.search_pays collect                                      # test figures, JSON, anytime plot

Part 2 (`search`, `retrain`, `collect`): each search arm gets the same budget, `--budget` full-data epochs
(default 140, two paper runs), counting every trial and re-evaluation: `certtune` is TPE with the warmup-aware
ASHA, `random` uniform random sampling with the same scheduler; both at the space's fidelity (or `--fidelity`),
both ending with `--reeval-top 2 --reeval-seeds 2`. The budget is the search's own `--max-trial-epochs` (the
full-data epochs in trial-epochs at the fidelity), so what early-stopped trials leave unspent buys more trials,
and the re-evaluations are kept room for inside it; `--num-samples` is four times the full-length trials the
budget holds, a bound the budget reaches first. `search` records the exported best point (the target
run), the search's anytime curve and its cost; `retrain` trains that point from scratch with seeds 1000, 1001,
1002 and certifies each run on the 10,000 test images as it ends (clean, IBP, CROWN-IBP, PGD) - the only place
the test split is read; `collect` writes bench/results/search_pays.json with the paper arms from
bench/results/shorter_warmup*.json (their provenance), and bench/results/search_pays.png: best validation score
so far against full-data epochs spent, per search. Each finished search and retrained seed is kept in
bench/results/search_pays_steps.json (`--steps`, committed), so the part continues across sessions whose run
directories are gone (bench/runs.kept_step). A search that a session's end cut off resumes from its experiment
when `search` is started again with the same settings (`certtune resume`'s path), and a retrained seed from its
last epoch.

Setting (`--space`, default): search_spaces/mnist_short_warmup.yaml (the paper's `fast` method on cnn_small; the target run is 35 epochs
on the full MNIST training split less 5,000 validation images). `--configs` points (default 12): the space's
defaults (the paper's recipe halved) and points sampled uniformly at random from the space (Optuna's
RandomSampler, seed = the point's index). Each point is trained at the target run and at every fidelity of
`--fidelities`, one `certtune train --out` directory each under `--work` (a run interrupted resumes when started
again; `--worker K --workers N` trains the points whose index is K mod N, so N processes share the work).

- `today:20000`: the fidelity searches used before issue 19: 20,000 training images at the target's batch size
  (the schedule, in epochs, then falls at other steps);
- `subset:20000`: 20,000 images, the batch scaled so each epoch keeps its steps (tuner/space/fidelity.py);
- `epochs:9`: the full data for 9 epochs, every phase compressed.

The results file is the study's durable record: run directories are scratch that a session may lose, so
`fidelity` skips the points the file already holds (for the same ε, space, fidelities and point parameters) and
`fidelity-collect` keeps them beside the points whose runs it reads now.

`fidelity-collect` reads every point whose runs have all finished, takes each run's final-epoch validation
IBP-verified error (what a search ranks by), and writes, per fidelity, the Spearman rank correlation with the
target runs, the point it ranks first with that pick's regret (its target-run error above the best target
run's: what choosing by this fidelity costs), the points used and the cost of one run in full-data epochs, to
bench/results/search_pays_fidelity.json.
The test split is not read.
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.runs import bench_parser, epoch_rows, kept_step, read_steps, recipe_of, recorded_step, save_figure

SPACE = "search_spaces/mnist_short_warmup.yaml"
FIDELITIES = "today:20000,subset:20000,epochs:9"
RESULTS = Path("bench/results/search_pays_fidelity.json")


def points(space_file: str, n: int) -> list[dict]:
    """The defaults point, then points sampled at random (the point's index seeds the sampler)."""
    import optuna

    from tuner.space.search_space import load_space

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
    from tuner.space.fidelity import Fidelity
    from tuner.space.search_space import load_space

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


def recorded_errors(args, all_points: list[dict]) -> dict[int, dict[str, float]]:
    """The per-point errors the results file already holds for this study: same ε, space and fidelities, and
    only points whose recorded parameters are the ones `points` draws now (a changed space invalidates them)."""
    if not args.out.is_file():
        return {}
    old = json.loads(args.out.read_text())
    names = {*fidelities(args), "target"}
    if old.get("eps") != args.eps or old.get("space") != args.space:
        return {}
    kept = {}
    for key, errors in old.get("val_ibp_err", {}).items():
        index = int(key)
        same_point = index < len(all_points) and old["point_params"].get(key) == json.loads(json.dumps(all_points[index]))
        if same_point and set(errors) == names:
            kept[index] = errors
    return kept


def cmd_fidelity(args) -> None:
    import torch

    from tuner import api

    torch.set_num_threads(args.threads)
    all_points = points(args.space, args.configs)
    recorded = recorded_errors(args, all_points)
    for index, point in enumerate(all_points):
        if index % args.workers != args.worker or index in recorded:
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


def first_pick(fidelity: list[float], target: list[float]) -> tuple[int, float]:
    """The point a fidelity ranks first (its index) and its regret: how much higher that point's target-run
    error is than the best target run's (0 when the fidelity picks the best point)."""
    first = min(range(len(fidelity)), key=lambda i: (fidelity[i], i))
    return first, target[first] - min(target)


def cmd_collect(args) -> None:
    from trainers.data import train_split_size

    names = fidelities(args)
    table: dict[int, dict[str, float]] = {}
    cost: dict[str, float] = {}
    all_points = points(args.space, args.configs)
    recorded = recorded_errors(args, all_points)
    for index, point in enumerate(all_points):
        configs = run_configs(args, point)
        runs = {name: finished(run_dir(args.work, args.eps, index, name)) for name in (*names, "target")}
        if all(rows is not None for rows in runs.values()):
            table[index] = {name: rows[-1]["ibp_err"] for name, rows in runs.items()}
        elif index in recorded:
            table[index] = recorded[index]
        else:
            print(f"point {index}: not every run has finished, left out", flush=True)
        target = configs["target"]
        full = train_split_size(target.dataset, args.data_dir, target.data)
        for name, cfg in configs.items():  # images trained, in epochs over the full training split
            cost[name] = cfg.epochs * (cfg.data.subset or full) / full
    used = sorted(table)
    target = [table[i]["target"] for i in used]
    result = {"eps": args.eps, "space": args.space, "points": used,
              "point_params": {i: all_points[i] for i in used}, "val_ibp_err": table,
              "target_cost_full_data_epochs": round(cost.get("target", 0.0), 2),
              "fidelities": {name: fidelity_quality([table[i][name] for i in used], target, used, cost.get(name, 0.0))
                             for name in names}}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["fidelities"], indent=1))


def fidelity_quality(errors: list[float], target: list[float], used: list[int], cost: float) -> dict:
    """How well a fidelity's final errors stand in for the target runs': Spearman's rank correlation (with 3
    points or more), the point it ranks first and that pick's regret on the target run, and its cost."""
    if not used:
        return {"spearman": None, "picks_point": None, "regret": None, "cost_full_data_epochs": round(cost, 2)}
    pick, regret = first_pick(errors, target)
    return {"spearman": spearman(errors, target) if len(used) > 2 else None, "picks_point": used[pick],
            "regret": round(regret, 4), "cost_full_data_epochs": round(cost, 2)}


# ---- part 2: the search arms at equal compute ------------------------------------------------------------
ARMS = ("certtune", "random")
RETRAIN_SEEDS = (1000, 1001, 1002)
RESULTS_ARMS = Path("bench/results/search_pays.json")
STEPS = Path("bench/results/search_pays_steps.json")
PLOT = Path("bench/results/search_pays.png")
PAPER_RESULTS = {"paper-70": Path("bench/results/shorter_warmup.json"),
                 "paper-halved": Path("bench/results/shorter_warmup_halved.json")}


def search_name(arm: str, eps: float, search_seed: int) -> str:
    return f"{arm}_eps{eps}_s{search_seed}"


def trial_epoch_budget(args) -> int:
    """`--budget` full-data epochs in the trial-epochs the search's --max-trial-epochs counts (at its fidelity)."""
    epochs, full_data_epochs = trial_shape(args)
    return int(args.budget * epochs / full_data_epochs + 1e-9)


def trial_cost(args) -> float:
    """Full-data epochs of one trial at the search's fidelity, at most (the defaults point: every point of the
    space has the same epochs and training images)."""
    return trial_shape(args)[1]


def trial_shape(args) -> tuple[int, float]:
    """(epochs, full-data epochs) of a full-length trial at the search's fidelity (the defaults point)."""
    from trainers.config import parse_overrides
    from trainers.data import train_split_size
    from tuner.space.fidelity import Fidelity
    from tuner.space.search_space import load_space

    space = load_space(args.space)
    fidelity = Fidelity.parse(args.fidelity) if args.fidelity else space.fidelity
    target = space.to_train_config(space.default_point()).with_overrides(
        {"eps": args.eps, **parse_overrides(args.overrides)}).resolve()
    full = train_split_size(target.dataset, args.data_dir, target.data)
    cfg = fidelity.trial_config(target, full)
    return cfg.epochs, cfg.epochs * (cfg.data.subset or full) / full


def search_step_name(arm: str, eps: float, search_seed: int) -> str:
    return f"{search_name(arm, eps, search_seed)} search"


def check_same_search(storage: str, name: str, **wanted) -> None:
    """A search left in the work folder is resumed only if it is this step's search; one started with other
    settings (an earlier version of the benchmark) is not silently continued as this one."""
    from tuner.space.record import read_record

    record = read_record(storage, name)
    differs = {k: (getattr(record, k), v) for k, v in wanted.items() if getattr(record, k) != v}
    if differs:
        raise SystemExit(f"{name}: the search in {storage} was started with other settings "
                         f"({', '.join(f'{k} {a} here, {b} now' for k, (a, b) in differs.items())}): "
                         f"move it aside to search afresh")


def run_search(args, trials: int, budget_epochs: int) -> dict:
    """One arm's search, exported: its best point (the target run's config), its anytime curve and its cost."""
    from trainers.config import parse_overrides
    from trainers.safe_yaml import read_yaml_file
    from tuner import api
    from tuner.results.experiment import load_search
    from tuner.run.driver import experiment_exists

    name, storage = search_name(args.arm, args.eps, args.search_seed), str((args.work / "searches").resolve())
    # what makes this search this step's: checked against a search an earlier session left, passed to a new one
    settings = {"num_samples": trials, "max_trial_epochs": budget_epochs, "seed": args.search_seed,
                "sampler": "random" if args.arm == "random" else "tpe", "reeval_top": args.reeval_top,
                "reeval_seeds": args.reeval_seeds}
    if experiment_exists(storage, name):  # an earlier session's search, cut off: it goes on as it was
        check_same_search(storage, name, **settings)
        api.resume(name, storage=storage)
    else:
        api.search(args.space, {"eps": args.eps, **parse_overrides(args.overrides)}, name=name,
                   max_concurrent=args.concurrent, resources_per_trial=f"cpu={args.cpus_per_trial}", scheduler="asha",
                   storage=storage, data_dir=args.data_dir, fidelity=args.fidelity, **settings)
    out = args.work / "exports" / name
    api.export(name, storage=storage, out=out)
    search = load_search(name, storage)
    curve, spent = search_curve(search)
    return {"config": read_yaml_file(out / "best.yaml"), "best_point": search.best().trial_id if search.best() else None,
            "trials": len(search.trials), "curve": curve, "cost_full_data_epochs": round(spent, 2)}


def cmd_search(args) -> None:
    trials, budget_epochs = 4 * int(args.budget // trial_cost(args)), trial_epoch_budget(args)
    # Searches recorded before the budget was the search's own (--num-samples = budget // a full trial's cost, so
    # early stopping's savings went unspent), before TPE's startup followed the budget, or before the room kept for
    # re-evaluation followed the points that can be raced are not this step; nor, for TPE, searches before its good
    # set held more than one trial.
    inputs = {"space": args.space, "overrides": args.overrides, "budget": args.budget, "trials": trials,
              "budget_trial_epochs": budget_epochs, "startup": "budget", "reserve": "raceable points",
              "fidelity": args.fidelity, "reeval_top": args.reeval_top, "reeval_seeds": args.reeval_seeds,
              "reeval_points": args.reeval_top + 1}
    if args.arm == "certtune":  # TPE's good set holds more than one trial in a small search (tuner/run/driver.py)
        inputs["tpe_good_set"] = "a quarter, up to 3"
    print(json.dumps({"arm": args.arm, "eps": args.eps, "search_seed": args.search_seed, "trials": trials,
                      "budget_trial_epochs": budget_epochs,
                      "trial_cost_full_data_epochs": round(trial_cost(args), 3)}), flush=True)
    step = kept_step(args.steps, search_step_name(args.arm, args.eps, args.search_seed), inputs,
                     lambda: run_search(args, trials, budget_epochs))
    print(json.dumps({k: step[k] for k in ("best_point", "trials", "cost_full_data_epochs")}), flush=True)


def retrain_dir(work: Path, arm: str, eps: float, search_seed: int, seed: int) -> Path:
    return work / "retrain" / f"{search_name(arm, eps, search_seed)}_seed{seed}"


def retrain_and_test(args, config: dict, seed: int) -> dict:
    """The search's recipe trained from scratch on a fresh seed, then certified on the 10,000 test images: the
    only place the test split is read."""
    from tuner import api

    out = retrain_dir(args.work, args.arm, args.eps, args.search_seed, seed)
    api.train(config, {"seed": seed}, data_dir=args.data_dir, out=out)
    test = api.verify(out / "last.pt", data_dir=args.data_dir, methods="ibp,crown-ibp,pgd")
    return {"epochs": finished(out)[-1]["epochs"],
            "test": {k: test[k] for k in ("clean_err", "ibp_err", "crown_ibp_err", "pgd_err")}}


def cmd_retrain(args) -> None:
    from trainers.config import TrainConfig, parse_overrides

    search = recorded_step(args.steps, search_step_name(args.arm, args.eps, args.search_seed), None)
    if search is None:
        raise SystemExit(f"{search_name(args.arm, args.eps, args.search_seed)}: run `search` first")
    config = recipe_of(TrainConfig.from_dict(search["config"]).with_overrides(parse_overrides(args.overrides)).to_dict())
    inputs = {"chosen": recipe_of(search["config"]), "overrides": args.overrides}
    for seed in args.seeds:
        step = kept_step(args.steps, f"{search_name(args.arm, args.eps, args.search_seed)} retrain seed{seed}",
                         inputs, lambda: retrain_and_test(args, config, seed))
        print(json.dumps({"seed": seed, **step["test"]}), flush=True)


def search_curve(search) -> tuple[list[list[float]], float]:
    """[[full-data epochs spent, best validation score so far], ...] in the order trials ended (a point's score
    is its mean over the seeds it has by then), and the search's whole cost in full-data epochs."""
    from tuner.study.reeval import Score

    objective = search.objectives[0]
    spent, best, curve, values = 0.0, None, [], {}
    for t in sorted(search.trials + search.superseded, key=lambda t: t.ended_at or 0):
        spent += max((r.get("full_data_epochs", 0) for r in t.history), default=0)
        if t.status == "finished" and t.value(objective) is not None:
            values.setdefault(t.config_of, []).append(t.value(objective))
            score = Score.of(values[t.config_of]).mean
            best = score if best is None else min(best, score)
        curve.append([round(spent, 3), best])
    return curve, spent


def cmd_collect_arms(args) -> None:
    entries, curves = [], {}
    for arm, path in PAPER_RESULTS.items():  # measured by bench/shorter_warmup.py: reused with their provenance
        for e in json.loads(path.read_text()) if path.exists() else []:
            if e["arm"] == "paper":
                entries.append({"arm": arm, "eps": e["eps"], "search_seed": None, "seed": e["seed"],
                                "epochs": e["epochs"], "search_cost_epochs": None,
                                "test": {k: e["test"][k] for k in ("clean_err", "ibp_err", "crown_ibp_err", "pgd_err")},
                                "source": str(path)})
    steps = read_steps(args.steps)
    for step_name, step in sorted(steps.items()):
        name, _, kind = step_name.partition(" ")
        if kind != "search":
            continue
        search = step["output"]
        curves[name] = search["curve"]
        arm, rest = name.split("_eps")
        eps, search_seed = float(rest.split("_s")[0]), int(rest.split("_s")[1])
        recipe = recipe_of(search["config"])
        for retrain_name, retrain in sorted(steps.items()):
            if not retrain_name.startswith(f"{name} retrain seed") or retrain["inputs"]["chosen"] != recipe:
                continue  # another search's, or a recipe this search no longer chose
            entries.append({"arm": arm, "eps": eps, "search_seed": search_seed,
                            "seed": int(retrain_name.rsplit("seed", 1)[1]), "epochs": retrain["output"]["epochs"],
                            "search_cost_epochs": search["cost_full_data_epochs"], "test": retrain["output"]["test"],
                            "best_point": search["best_point"]})
            print(json.dumps(entries[-1]), flush=True)
    args.out.write_text(json.dumps(entries, indent=1) + "\n")
    plot_curves(curves, entries, args.plot)


def plot_curves(curves: dict, entries: list[dict], path: Path) -> None:
    """Best validation score so far against full-data epochs, per search; the paper arms' mean test IBP error as
    horizontal lines (dashed: they had no search)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epss = sorted({e["eps"] for e in entries}) or [0.3]
    fig, axes = plt.subplots(1, len(epss), figsize=(6 * len(epss), 4.2), squeeze=False)
    for ax, eps in zip(axes[0], epss):
        for name, curve in curves.items():
            if f"_eps{eps}_" in name:
                pts = [(x, y) for x, y in curve if y is not None]
                ax.step([x for x, _ in pts], [100 * y for _, y in pts], where="post", label=name)
        for arm, style in (("paper-70", "--"), ("paper-halved", ":")):
            values = [e["test"]["ibp_err"] for e in entries if e["arm"] == arm and e["eps"] == eps]
            if values:
                ax.axhline(100 * sum(values) / len(values), ls=style, color="gray", label=f"{arm} (test, mean)")
        ax.set(title=f"MNIST eps = {eps}, cnn_small", xlabel="full-data epochs spent",
               ylabel="best IBP-verified error so far (%)")
    save_figure(fig, axes[0], path, 7)


def main(argv=None) -> None:
    parser, sub, common = bench_parser(__doc__, "bench_runs/search_pays")
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
    for p in (f, c):
        p.add_argument("--out", type=Path, default=RESULTS, help="the study's results file (points it holds are kept)")
    arms = bench_parser(__doc__, "bench_runs/search_pays")[2]
    arms.add_argument("--space", default=SPACE)
    arms.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="after the fixed ones (tests shrink runs)")
    arms.add_argument("--steps", type=Path, default=STEPS, help="the finished steps, kept across sessions")
    for name in ("search", "retrain"):
        p = sub.add_parser(name, parents=[arms])
        p.add_argument("--arm", choices=ARMS, required=True)
        p.add_argument("--eps", type=float, required=True)
        p.add_argument("--search-seed", type=int, default=0)
    s = sub.choices["search"]
    s.add_argument("--budget", type=float, default=140.0, help="full-data epochs for the whole search")
    s.add_argument("--fidelity", default=None, help="default: the space's")
    s.add_argument("--reeval-top", type=int, default=2)
    s.add_argument("--reeval-seeds", type=int, default=2)
    s.add_argument("--concurrent", type=int, default=1)
    s.add_argument("--cpus-per-trial", type=int, default=1)
    sub.choices["retrain"].add_argument("--seeds", type=int, nargs="+", default=list(RETRAIN_SEEDS))
    c = sub.add_parser("collect", parents=[arms])
    c.add_argument("--out", type=Path, default=RESULTS_ARMS)
    c.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    {"fidelity": cmd_fidelity, "fidelity-collect": cmd_collect, "search": cmd_search, "retrain": cmd_retrain,
     "collect": cmd_collect_arms}[args.cmd](args)


if __name__ == "__main__":
    main()
