"""Does the search pay? Search arms against the paper's defaults on real MNIST, at equal trial-epochs.

    python -m bench.search_quality run --eps 0.3 --arm tpe-asha --seeds 0 1 2    # one arm (or several)
    python -m bench.search_quality report                                       # table, plot, importances

Setting (search_spaces/mnist_small_budget.yaml): `cnn_small`, 8 epochs per trial on a 4,000-image subset of
the real MNIST training set, 1,000 held-out training images for selection (validation IBP-verified error
of the last epoch), the full 10,000-image test set only for the final figures of the selected run.

Arms. Every search starts from the paper's point (the space's defaults) and stops when its trials have
trained `--budget` epochs in all (`--max-trial-epochs`):
  random       random sampling, every trial runs its 8 epochs
  tpe          Optuna TPE, no early stopping
  tpe-asha     TPE with the warmup-aware ASHA (rungs count epochs at the target ε)
  plain-asha   TPE with Ray's stock ASHA (rungs count epochs from the start, ramp included)
Reference runs (one training run each, 8 trial-epochs): `paper` (the space's defaults: the paper's `fast`
recipe), `vanilla` (IBP, default init, no regularizers) and `crown-ibp`, both with the paper's schedule.
`paper-long` spends the search's whole budget on one run of the paper's recipe, its 70-epoch schedule scaled
to `--budget` epochs: the alternative to searching with the same compute. `search-long` spends half the
budget on a TPE + warmup-aware ASHA search and the rest on one run of the best trial's config with its
schedule scaled to the epochs left (tune short, train long).

Each (ε, arm, seed) is one entry of bench/results/search_quality.json, written as soon as it finishes, so
arms can be run one command at a time and a rerun replaces only its own entries. A seed sets the sampler's
seed and the training seed of every trial (data order, init).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

SPACE = "search_spaces/mnist_small_budget.yaml"
RESULTS = Path("bench/results/search_quality.json")
PLOT = Path("bench/results/search_quality.png")
SEARCH_ARMS = {"random": ("random", "none"), "tpe": ("tpe", "none"), "tpe-asha": ("tpe", "asha"),
               "plain-asha": ("tpe", "plain-asha")}
# The space's point sets every ingredient explicitly, so a reference method names all it changes.
PLAIN = {"init": "default", "reg.tightness": False, "reg.relu": False}
REFERENCE_ARMS = {"paper": {}, "vanilla": {"method": "vanilla", "bound": "ibp", **PLAIN},
                  "crown-ibp": {"method": "crown-ibp", "bound": "crown-ibp", **PLAIN}}
ARMS = list(REFERENCE_ARMS) + ["paper-long"] + list(SEARCH_ARMS) + ["search-long"]
BUDGETED = set(SEARCH_ARMS) | {"paper-long", "search-long"}  # arms that spend --budget trial-epochs


def paper_recipe(epochs: int) -> dict:
    """The paper's 70-epoch MNIST schedule scaled to `epochs`: ramp 20 from epoch 1, LR decays at 50 and 60."""
    scale = epochs / 70
    return {"epochs": epochs, "schedule.start": 1, "schedule.length": max(1, round(20 * scale)),
            "lr_milestones": [round(50 * scale), round(60 * scale)]}


def test_errors(checkpoint: Path, data_dir: str) -> dict:
    """Clean, IBP-verified and PGD errors on the full test set at the run's own ε."""
    from trainers.verify import verify_checkpoint

    out = verify_checkpoint(checkpoint, data_dir, split="test", methods=("ibp", "pgd"))
    return {"n": out["n"], "clean_err": out["clean_err"], "ibp_err": out["ibp_err"], "pgd_err": out["pgd_err"]}


def run_reference(arm: str, eps: float, seed: int, budget: int, data_dir: str, work: Path) -> dict:
    from trainers.train import Trainer
    from tuner.space.search_space import load_space

    space = load_space(SPACE)
    changes = paper_recipe(budget) if arm == "paper-long" else REFERENCE_ARMS[arm]
    cfg = space.to_train_config(space.default_point()).with_overrides({"eps": eps, "seed": seed, **changes})
    start = time.perf_counter()
    trainer = Trainer(cfg, data_dir, work / f"{arm}-eps{eps}-s{seed}")
    assert (trainer.cfg.bound, trainer.cfg.init, trainer.cfg.reg.relu) == (
        ("ibp", "ibp", True) if arm.startswith("paper") else (cfg.bound, "default", False)), trainer.cfg
    history = []
    trainer.fit(on_epoch=lambda m, run: history.append(m))
    wall = time.perf_counter() - start
    return {"val_ibp_err": history[-1]["ibp_err"], "trial_epochs": cfg.epochs, "wall_s": round(wall, 1),
            "trials": 1, "test": test_errors(trainer.out_dir / "last.pt", data_dir),
            "curve": [[cfg.epochs, history[-1]["ibp_err"]]], "config": cfg.to_dict()}


def best_so_far(search) -> list[list[float]]:
    """[[trial-epochs spent, best final validation ibp_err among trials finished by then], ...].

    Every reported epoch of every trial, in time order, adds one trial-epoch; a trial that finishes all its
    epochs can become the best (early-stopped trials never can, as in `certtune export`)."""
    events = []
    for t in search.trials:
        for i, row in enumerate(t.history):
            last = t.status == "finished" and i == len(t.history) - 1
            events.append((row.get("timestamp", 0), row.get("time_total_s", 0), last, row.get("ibp_err")))
    events.sort(key=lambda e: (e[0], e[1]))
    curve, best = [], None
    for spent, (_, _, last, value) in enumerate(events, start=1):
        if last and value is not None and (best is None or value < best):
            best = value
            curve.append([spent, best])
    if curve:
        curve.append([len(events), best])
    return curve


def run_search_arm(arm: str, eps: float, seed: int, budget: int, data_dir: str, storage: Path,
                   name: str | None = None) -> dict:
    from tuner.results.plots import param_importances
    from tuner.results.experiment import load_search
    from tuner.run.driver import prepare_search, run_search

    sampler, scheduler = SEARCH_ARMS[arm]
    name = name or f"{arm}-eps{eps}-b{budget}-s{seed}"
    record, store = prepare_search(SPACE, {"eps": eps, "seed": seed}, name, 10_000, 2, "cpu=1", scheduler,
                                   "ibp_err", str(storage), None, None, data_dir, seed, sampler, budget)
    start = time.perf_counter()
    run_search(record, store)
    wall = time.perf_counter() - start
    search = load_search(name, store)
    finished = search.ranked("finished")
    if not finished:
        raise SystemExit(f"{name}: no trial finished within {budget} trial-epochs; raise --budget")
    best = finished[0]
    checkpoints = sorted((Path(store) / name / f"trial_{best.trial_id}").glob("checkpoint_*"))
    try:
        importances = param_importances(search, record.build_space(), finished) if len(finished) >= 4 else {}
    except Exception as e:  # noqa: BLE001 - importances are a side figure; keep the arm's result
        importances = {"error": str(e).splitlines()[0]}
    return {"val_ibp_err": best.value("ibp_err"), "trial_epochs": search.trial_epochs(),
            "wall_s": round(wall, 1), "trials": len(search.trials), "counts": search.counts(),
            "test": test_errors(checkpoints[-1] / "last.pt", data_dir), "curve": best_so_far(search),
            "best_params": best.params, "importances": importances,
            "finished": [{"params": t.params, "val_ibp_err": t.value("ibp_err")} for t in finished]}


def run_search_then_long(eps: float, seed: int, budget: int, data_dir: str, work: Path) -> dict:
    """Half the budget on a TPE + warmup-aware ASHA search of 8-epoch trials, the rest on one run of the best
    trial's config scaled to the epochs left: tune short, then train long."""
    from trainers.train import Trainer
    from tuner.space.search_space import load_space

    found = run_search_arm("tpe-asha", eps, seed, budget // 2, data_dir, work / "searches",
                           name=f"search-long-eps{eps}-b{budget}-s{seed}")
    space = load_space(SPACE)
    best = space.to_train_config(found["best_params"]).with_overrides({"eps": eps, "seed": seed})
    cfg = best.scaled_to(budget - found["trial_epochs"])
    start = time.perf_counter()
    trainer = Trainer(cfg, data_dir, work / "runs" / f"search-long-eps{eps}-b{budget}-s{seed}")
    history = []
    trainer.fit(on_epoch=lambda m, run: history.append(m))
    total = found["trial_epochs"] + cfg.epochs
    return {**found, "val_ibp_err": history[-1]["ibp_err"], "search_val_ibp_err": found["val_ibp_err"],
            "search_test": found["test"], "trial_epochs": total, "trials": found["trials"] + 1,
            "wall_s": round(found["wall_s"] + time.perf_counter() - start, 1),
            "test": test_errors(trainer.out_dir / "last.pt", data_dir),
            "curve": found["curve"] + [[total, history[-1]["ibp_err"]]], "config": cfg.to_dict()}


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"entries": []}


def entry_key(e: dict) -> tuple:
    """(eps, budget, arm, seed); a reference run has no budget (it is one 8-epoch run)."""
    return e["eps"], e["budget"] if e["arm"] in BUDGETED else 0, ARMS.index(e["arm"]), e["seed"]


def save_entry(entry: dict) -> None:
    """Replace this (eps, budget, arm, seed)'s entry and write the file atomically."""
    data = load_results()
    data["entries"] = [e for e in data["entries"] if entry_key(e) != entry_key(entry)] + [entry]
    data["entries"].sort(key=entry_key)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, RESULTS)


def cmd_run(args) -> None:
    from tuner.run.driver import connect_ray

    work = Path(args.work or tempfile.mkdtemp(prefix="search_quality-"))
    for arm in args.arm:
        for seed in args.seeds:
            if arm in SEARCH_ARMS:
                connect_ray(None)
                out = run_search_arm(arm, args.eps, seed, args.budget, args.data_dir, work / "searches")
            elif arm == "search-long":
                connect_ray(None)
                out = run_search_then_long(args.eps, seed, args.budget, args.data_dir, work)
            else:
                out = run_reference(arm, args.eps, seed, args.budget, args.data_dir, work / "runs")
            budget = args.budget if arm in BUDGETED else None
            entry = {"eps": args.eps, "arm": arm, "seed": seed, "budget": budget, **out}
            save_entry(entry)
            print(json.dumps({k: entry[k] for k in ("eps", "arm", "seed", "val_ibp_err", "trial_epochs",
                                                    "wall_s", "trials", "test")}), flush=True)


# ---- report ------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def summary_rows(entries: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (ε, budget, arm), ε descending as in the docs."""
    groups: dict[tuple, list[dict]] = {}
    for e in sorted(entries, key=lambda e: (-e["eps"],) + entry_key(e)[1:]):
        groups.setdefault(entry_key(e)[:3], []).append(e)
    rows = []
    for (eps, budget, _), group in groups.items():
        row = {"eps": eps, "arm": group[0]["arm"], "budget": budget or None, "seeds": len(group)}
        for key, get in (("val_ibp_err", lambda e: e["val_ibp_err"]),
                         ("test_clean_err", lambda e: e["test"]["clean_err"]),
                         ("test_ibp_err", lambda e: e["test"]["ibp_err"]),
                         ("test_pgd_err", lambda e: e["test"]["pgd_err"]),
                         ("trial_epochs", lambda e: e["trial_epochs"]), ("wall_s", lambda e: e["wall_s"]),
                         ("trials", lambda e: e["trials"])):
            row[key] = mean_std([float(get(e)) for e in group])
        rows.append(row)
    return rows


def pooled_importances(entries: list[dict], eps: float) -> dict[str, float]:
    """Optuna importances over every finished trial of every search arm and seed at this ε."""
    from tuner.results.plots import param_importances
    from tuner.results.experiment import Search, TrialResult
    from tuner.space.search_space import load_space

    # The same point can be trained by two arms (TPE's first 10 points are its seeded random draws, the
    # paper's point starts every search): each distinct (point, result) counts once.
    unique = {json.dumps([t["params"], t["val_ibp_err"]], sort_keys=True): t
              for e in entries if e["eps"] == eps and e["arm"] in SEARCH_ARMS for t in e["finished"]}
    trials = [TrialResult(trial_id=str(i), status="finished", params=t["params"],
                          history=[{"ibp_err": t["val_ibp_err"]}]) for i, t in enumerate(unique.values())]
    if len(trials) < 4:
        return {}
    record = SimpleNamespace(objective=["ibp_err"], modes=["min"])  # all the importances read of a record
    search = Search(name="pooled", path=Path("."), record=record, trials=trials)
    return param_importances(search, load_space(SPACE), trials)


def plot(entries: list[dict], path: Path) -> None:
    """One panel per (ε, budget): each search arm's best-so-far curve per seed, the paper's point (8 epochs)
    as a dashed line and the paper's recipe run for the whole budget as a marker at the budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(e["eps"], e["budget"]) for e in entries if e["arm"] in SEARCH_ARMS}, key=lambda p: (-p[0], p[1]))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.2), squeeze=False)
    for ax, (eps, budget) in zip(axes[0], panels):
        for i, arm in enumerate(SEARCH_ARMS):
            runs = [x for x in entries if (x["eps"], x["budget"], x["arm"]) == (eps, budget, arm)]
            for j, e in enumerate(runs):
                xs, ys = zip(*e["curve"]) if e["curve"] else ([], [])
                ax.step(xs, [100 * y for y in ys], where="post", color=f"C{i}", alpha=0.75,
                        label=f"{arm} ({len(runs)} seeds)" if j == 0 else None)
        papers = [e["val_ibp_err"] for e in entries if e["eps"] == eps and e["arm"] == "paper"]
        if papers:
            ax.axhline(100 * sum(papers) / len(papers), color="k", ls="--", lw=1, label="paper's point, 8 epochs")
        long = [e["val_ibp_err"] for e in entries if (e["eps"], e["budget"], e["arm"]) == (eps, budget, "paper-long")]
        if long:
            ax.plot([budget] * len(long), [100 * v for v in long], "k*", ms=10,
                    label=f"paper's recipe, one {budget}-epoch run")
        tuned = [e["val_ibp_err"] for e in entries if (e["eps"], e["budget"], e["arm"]) == (eps, budget, "search-long")]
        if tuned:
            ax.plot([budget] * len(tuned), [100 * v for v in tuned], "mP", ms=9,
                    label="search half, then best config over the other half")
        ax.set(title=f"MNIST cnn_small, ε={eps}, budget {budget} trial-epochs", xlabel="trial-epochs spent",
               ylabel="best validation IBP-verified error (%)", xlim=(0, budget * 1.05))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    def pct(ms):
        return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}" if ms[1] > 0 else f"{100 * ms[0]:.1f}"
    lines = ["| ε | arm | budget | seeds | val IBP err % | test clean % | test IBP-verified % | test PGD % "
             "| trial-epochs | trials | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['eps']} | {r['arm']} | {r['budget'] or '–'} | {r['seeds']} | {pct(r['val_ibp_err'])} | "
                     f"{pct(r['test_clean_err'])} | {pct(r['test_ibp_err'])} | {pct(r['test_pgd_err'])} | "
                     f"{r['trial_epochs'][0]:.0f} | {r['trials'][0]:.1f} | {r['wall_s'][0]:.0f} |")
    return "\n".join(lines)


def cmd_report(args) -> None:
    entries = load_results()["entries"]
    rows = summary_rows(entries)
    importances = {str(eps): pooled_importances(entries, eps) for eps in sorted({e["eps"] for e in entries})}
    plot(entries, PLOT)
    if args.markdown:
        print(markdown(rows))
        for eps, imp in importances.items():
            print(f"\nε={eps} importances: " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()))
    print(json.dumps({"rows": rows, "importances": importances, "plot": str(PLOT)}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run arms and record them in " + str(RESULTS))
    run.add_argument("--eps", type=float, default=0.3)
    run.add_argument("--arm", nargs="+", choices=ARMS, required=True)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--budget", type=int, default=64, help="trial-epochs per search (default 64: 8 full trials)")
    run.add_argument("--data-dir", default=os.environ.get("CERTTUNE_DATA", "../shared/data"))
    run.add_argument("--work", default=None, help="where searches and runs go (default: a new temporary folder)")
    run.set_defaults(run=cmd_run)
    report = sub.add_parser("report", help="summary table, importances and plot from " + str(RESULTS))
    report.add_argument("--markdown", action="store_true", help="also print the table for docs/benchmarks.md")
    report.set_defaults(run=cmd_report)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
