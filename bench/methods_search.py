"""Issue 20: does a search over methods pay at equal compute, judged by the certificate users quote (α-CROWN)?

    S="--defaults batch_size=64 --defaults schedule.length=5 epochs=12 data.subset=12000"
    python -m bench.methods_search baseline --eps 0.1 $S   # the nine paper points once, seed 0 (bench.methods_mnist train)
    python -m bench.methods_search search   --eps 0.1 $S   # the search arm, the baseline's seconds as its budget
    python -m bench.methods_search retrain  --eps 0.1 $S   # each arm's winner on 3 fresh seeds
    python -m bench.methods_search collect  --eps 0.1 [--test-n 10000] [--strong-n 2000] [--bab-n 200]

Two arms, each choosing a recipe on validation only, then judged on test:
- `best-single`: every method once at its paper point (the nine runs of `baseline`); the arm's recipe is the
  one with the lowest α-CROWN-verified error on the validation split (each run's best.pt, as the search
  certifies its candidates). Its compute is the nine runs' training seconds.
- `search`: TPE over the whole space with warmup-aware ASHA whose rungs are seconds at the target ε (the
  default for a space that searches `method`), given the same training seconds (`--max-trial-seconds`), one
  trial at a time on one thread as the single runs trained; at its end the top 3 points are certified on
  validation by α-CROWN and the winner is picked by it (`--select-by alpha-crown`); export follows it.
Both winners are trained again on seeds 1000-1002 at the same config (`retrain`) and `collect` certifies each
on the test split: clean, IBP and PGD on the first --test-n, α-CROWN on the first --strong-n, BaB (with the
cheaper verifiers' proofs) on the first --bab-n. Writes bench/results/methods_search.json: a list of entries
{"arm", "eps", "method", "seed", "device_seconds", "test": {"clean_err", "ibp_err", "alpha_crown_err",
"bab_err", "pgd_err", "verified_err"}} (device_seconds: the compute the arm spent choosing its recipe), and
prints the table with the largest share of the search's budget one trial took.
Every step is resumable: runs and certificates are kept per directory and reused while their inputs match.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from bench.methods_mnist import (FULL_TEST, base_overrides, check_runs_are_the_paper_points, last_metrics, limit,
                                 method_of, paper_points, single_runs, space_file, train_run)
from bench.methods_mnist import main as methods_mnist_main
from bench.runs import bench_parser, fingerprint, kept_per_key

ARMS = ("best-single", "search")
RETRAIN_SEEDS = (1000, 1001, 1002)
SELECT_BY = "alpha-crown"
SELECT_TOP = 3


def search_name(eps: float) -> str:
    return f"methods_search_eps{eps}"


def storage_of(args) -> str:
    return str((args.work / "searches").resolve())


def paper_runs(args) -> dict[str, Path]:
    """The nine single runs (seed 0) at this radius, checked to be the space's paper points."""
    runs = {m: r for m, r in single_runs(args.work, args.eps).items() if m != "search-best"}
    if not runs:
        raise SystemExit("run `baseline` first: the search gets the seconds the single-method runs trained")
    check_runs_are_the_paper_points(runs, paper_points(base_overrides(args), space_file(args)))
    return runs


def val_certificate(run: Path, args) -> dict:
    """α-CROWN on the run's validation split (its best.pt, the epoch of lowest validation IBP error)."""
    from tuner import api

    checkpoint = run / "best.pt"
    key = {"checkpoint": fingerprint(checkpoint), "verifier": SELECT_BY}
    return kept_per_key(run / "val_select.json", key,
                  lambda: api.verify(checkpoint, data_dir=args.data_dir, split="val", methods=SELECT_BY))


def best_single(args) -> tuple[str, dict]:
    """The baseline arm's choice: the paper point whose run α-CROWN certifies best on validation."""
    runs = paper_runs(args)
    figures = {m: val_certificate(r, args) for m, r in runs.items()}
    method = min(figures, key=lambda m: (figures[m]["alpha_crown_err"], m))
    return method, figures


def cmd_baseline(args) -> None:
    methods_mnist_main(["train", "--eps", str(args.eps), "--work", str(args.work), "--data-dir", args.data_dir,
                        "--seed", "0", *[f for d in args.defaults for f in ("--defaults", d)],
                        *(["--methods", args.methods] if args.methods else []), *args.overrides])


def baseline_seconds(args) -> float:
    return sum(last_metrics(r)["train_seconds"] for r in paper_runs(args).values())


def cmd_search(args) -> None:
    from tuner import api

    seconds = baseline_seconds(args)
    api.search(space_file(args), base_overrides(args), name=search_name(args.eps), num_samples=1000,
               max_concurrent=1, resources_per_trial="cpu=1", scheduler="asha", rungs="seconds",
               storage=storage_of(args), data_dir=args.data_dir, seed=args.search_seed, max_trial_seconds=seconds,
               select_by=SELECT_BY, select_top=SELECT_TOP)
    api.export(search_name(args.eps), storage=storage_of(args), out=export_dir(args))
    print(json.dumps({"search": search_name(args.eps), **search_summary(args)}), flush=True)


def export_dir(args) -> Path:
    return args.work / f"methods_search_export_eps{args.eps}"


def search_summary(args) -> dict:
    """What the search spent and chose: its device-seconds against the budget and the largest trial's share."""
    from tuner.results.experiment import load_search

    search = load_search(search_name(args.eps), storage_of(args))
    _, weight = search.record.seconds_weight()
    per_trial = [weight * t.seconds_run for t in search.trials]
    budget = search.record.max_trial_seconds
    return {"trials": len(search.trials), "counts": search.counts(), "device_seconds": round(search.device_seconds(), 1),
            "budget_device_seconds": budget, "largest_trial_share": round(max(per_trial, default=0.0) / budget, 3),
            "selection": search.selection,
            "trials_per_method": dict(sorted(Counter(method_of(t.params) for t in search.trials).items()))}


def arm_config(arm: str, args) -> dict:
    """The recipe each arm chose, as a training config (the seed set by the retrain)."""
    from trainers.safe_yaml import read_yaml_file

    if arm == "best-single":
        method, _ = best_single(args)
        return read_yaml_file(paper_runs(args)[method] / "config.yaml")
    best = export_dir(args) / "best.yaml"
    if not best.is_file():
        raise SystemExit(f"{best}: run `search` first")
    return read_yaml_file(best)


def retrain_dir(args, arm: str, seed: int) -> Path:
    return args.work / f"eps{args.eps}" / "retrain" / arm / f"seed{seed}"


def cmd_retrain(args) -> None:
    for arm in args.arms.split(","):
        config = arm_config(arm, args)
        for seed in RETRAIN_SEEDS:
            final = train_run(config, retrain_dir(args, arm, seed), args.data_dir, seed)
            print(json.dumps({"arm": arm, "method": config["method"], "seed": seed,
                              "val_ibp_err": final.get("ibp_err")}), flush=True)


def test_certificate(run: Path, args) -> dict:
    """The run's last.pt on the test split: each verifier beside PGD, so nothing proved is also broken."""
    from tuner import api

    checkpoint = run / "last.pt"
    key = {"checkpoint": fingerprint(checkpoint), "test_n": args.test_n, "strong_n": args.strong_n,
           "bab_n": args.bab_n, "bab_time_limit": args.bab_time_limit}

    def compute() -> dict:
        passes = {"test": ("ibp,crown-ibp,pgd", args.test_n), "strong": ("alpha-crown,pgd", args.strong_n),
                  "bab": ("alpha-crown,bab,pgd", args.bab_n)}
        return {name: api.verify(checkpoint, data_dir=args.data_dir, methods=methods,
                                 bab_time_limit=args.bab_time_limit, **limit(n))
                for name, (methods, n) in passes.items()}
    return kept_per_key(run / "test_certificate.json", key, compute)


def entries(args) -> list[dict]:
    spent = {"best-single": round(baseline_seconds(args), 1), "search": search_summary(args)["device_seconds"]}
    found = []
    for arm in ARMS:
        for seed in RETRAIN_SEEDS:
            run = retrain_dir(args, arm, seed)
            if not (run / "last.pt").is_file():
                continue
            cert = test_certificate(run, args)
            t, s, b = cert["test"], cert["strong"], cert["bab"]
            found.append({"arm": arm, "eps": args.eps, "method": last_config_method(run), "seed": seed,
                          "device_seconds": spent[arm],
                          "test": {"clean_err": t["clean_err"], "ibp_err": t["ibp_err"], "pgd_err": t["pgd_err"],
                                   "alpha_crown_err": s["alpha_crown_err"], "bab_err": b["bab_err"],
                                   "verified_err": b["verified_err"]},
                          "n": {"test": t["n"], "alpha_crown": s["n"], "bab": b["n"]},
                          "alpha_crown_err_on_bab_images": b["alpha_crown_err"]})
    return found


def last_config_method(run: Path) -> str:
    from trainers.safe_yaml import read_yaml_file

    return read_yaml_file(run / "config.yaml")["method"]


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def table(found: list[dict]) -> str:
    """Per arm and radius: test errors in %, mean ± SE over the retrained seeds."""
    rows = ["| ε | arm | method | seeds | device s | clean | IBP | α-CROWN | BaB | PGD |", "|---|---|---|---|---|---|---|---|---|---|"]
    for eps in sorted({e["eps"] for e in found}):
        for arm in ARMS:
            mine = [e for e in found if e["eps"] == eps and e["arm"] == arm]
            if not mine:
                continue
            cells = []
            for key in ("clean_err", "ibp_err", "alpha_crown_err", "bab_err", "pgd_err"):
                mean, se = mean_se([100 * e["test"][key] for e in mine])
                cells.append(f"{mean:.2f} ± {se:.2f}")
            rows.append(f"| {eps} | {arm} | {', '.join(sorted({e['method'] for e in mine}))} | {len(mine)} | "
                        f"{mine[0]['device_seconds']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cmd_collect(args) -> None:
    path = args.out or Path("bench/results/methods_search.json")
    try:
        kept = [e for e in json.loads(path.read_text()) if e["eps"] != args.eps]  # the other radius stays
    except (OSError, ValueError):
        kept = []
    found = entries(args)
    path.write_text(json.dumps(kept + found, indent=1) + "\n")
    method, figures = best_single(args)
    print(json.dumps({"eps": args.eps, "best_single_by_val_alpha_crown": method,
                      "val_alpha_crown_err": {m: f["alpha_crown_err"] for m, f in figures.items()},
                      "search": search_summary(args)}, indent=1))
    print(table(kept + found))


def main(argv=None) -> None:
    parser, sub, common = bench_parser(__doc__, "bench_runs/methods_mnist")
    common.add_argument("--eps", type=float, required=True)
    common.add_argument("--defaults", action="append", default=[], metavar="K=V",
                        help="change the space's defaults point (bench.methods_mnist); give each step the same")
    common.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    b = sub.add_parser("baseline", parents=[common])
    b.add_argument("--methods", default=None, help="comma list (default: every method with a paper point)")
    s = sub.add_parser("search", parents=[common])
    s.add_argument("--search-seed", type=int, default=0)
    r = sub.add_parser("retrain", parents=[common])
    r.add_argument("--arms", default=",".join(ARMS))
    c = sub.add_parser("collect", parents=[common])
    c.add_argument("--test-n", type=int, default=FULL_TEST)
    c.add_argument("--strong-n", type=int, default=2000, help="images for α-CROWN (the first ones)")
    c.add_argument("--bab-n", type=int, default=200)
    c.add_argument("--bab-time-limit", type=float, default=2.0)
    c.add_argument("--out", type=Path, default=None, help="default: bench/results/methods_search.json")
    args = parser.parse_args(argv)
    {"baseline": cmd_baseline, "search": cmd_search, "retrain": cmd_retrain, "collect": cmd_collect}[args.cmd](args)


if __name__ == "__main__":
    main()
