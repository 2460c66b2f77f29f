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
  default for a space that searches `method`), given the same training seconds (`--max-trial-seconds`), no
  trial taking more than a third of them, ramp included (`--max-trial-share`, the service's default), one
  trial at a time on one thread as the single runs trained; at its end the top 3 points are certified on
  validation by α-CROWN and the winner is picked by it (`--select-by alpha-crown`); export follows it.
Both winners are trained again on seeds 1000-1002 at the same config and each is certified on the test split
as soon as it is trained (`retrain`): clean, IBP and PGD on the first --test-n, α-CROWN on the first
--strong-n, BaB (with the cheaper verifiers' proofs) on the first --bab-n. `collect` gathers the entries. Writes bench/results/methods_search.json: a list of entries
{"arm", "eps", "method", "seed", "device_seconds", "test": {"clean_err", "ibp_err", "alpha_crown_err",
"bab_err", "pgd_err", "verified_err"}} (device_seconds: the compute the arm spent choosing its recipe), and
prints the table with the largest share of the search's budget one trial took.
Every step is resumable, and each finished step (a baseline run with its training seconds and validation
certificate, the search's choice and spend, a retrained seed with its test certificate) is kept in
bench/results/methods_search_steps.json (`--steps`), which is committed: run directories do not outlive a
session, so the benchmark goes on from its recorded steps in the next one. A step is reused while its inputs
(the recipe, the budget, the certificate sizes) are the same.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

from bench.methods_mnist import FULL_TEST, base_overrides, limit, method_of, paper_points, space_file, train_run
from bench.runs import bench_parser, kept_step, recipe_of, recorded_step
from tuner.run.trial_share import DEFAULT_TRIAL_SHARE

# The search arms and what their rungs rank trials by during the run (the winner is picked by α-CROWN on validation
# either way): IBP, the certificate the trainers report by default, or CROWN-IBP, the cheap bound closest to
# α-CROWN (methods built for tighter verifiers, SABR, TAPS, STAPS, have loose IBP bounds by design).
SEARCH_ARMS = {"search": "ibp_err", "search-crown-ibp": "crown_ibp_err"}
EVAL_METRICS = {"ibp_err": ["clean", "ibp"], "crown_ibp_err": ["clean", "ibp", "crown-ibp"]}
ARMS = ("best-single", *SEARCH_ARMS)
RETRAIN_SEEDS = (1000, 1001, 1002)
SELECT_BY = "alpha-crown"
SELECT_TOP = 3
STEPS = Path("bench/results/methods_search_steps.json")


def search_name(eps: float, arm: str = "search") -> str:
    return f"methods_{arm.replace('-', '_')}_eps{eps}"


def storage_of(args) -> str:
    return str((args.work / "searches").resolve())


def paper_configs(args) -> dict[str, dict]:
    return paper_points(base_overrides(args), space_file(args))


# ---- the baseline: every method once at its paper point ------------------------------------------------
def baseline_step_name(args, method: str) -> str:
    return f"eps{args.eps} baseline {method}"


def train_baseline(args, method: str, config: dict) -> dict:
    """One paper point trained (seed 0, one thread) and certified by α-CROWN on validation (its best.pt, the epoch
    of lowest validation IBP error, as the search certifies its candidates)."""
    from tuner import api

    run = args.work / f"eps{args.eps}" / method
    final = train_run(config, run, args.data_dir, 0)
    return {"train_seconds": final["train_seconds"], "val_ibp_err": final.get("ibp_err"),
            "val_select": api.verify(run / "best.pt", data_dir=args.data_dir, split="val", methods=SELECT_BY)}


def cmd_baseline(args) -> None:
    configs = paper_configs(args)
    methods = args.methods.split(",") if args.methods else list(configs)
    unknown = [m for m in methods if m not in configs]
    if unknown:
        raise SystemExit(f"--methods: {', '.join(unknown)} not in the space's seed points ({', '.join(configs)})")
    for method in methods:
        step = kept_step(args.steps, baseline_step_name(args, method), {"recipe": recipe_of(configs[method])},
                         lambda: train_baseline(args, method, configs[method]))
        print(json.dumps({"method": method, "train_seconds": step["train_seconds"],
                          "val_alpha_crown_err": step["val_select"]["alpha_crown_err"]}), flush=True)


def baseline(args) -> dict[str, dict]:
    """method -> its recorded baseline step, for the paper points recorded with this setting."""
    found = {m: recorded_step(args.steps, baseline_step_name(args, m), {"recipe": recipe_of(c)})
             for m, c in paper_configs(args).items()}
    found = {m: step for m, step in found.items() if step is not None}
    if not found:
        raise SystemExit("run `baseline` first (with the same --defaults and KEY=VALUE overrides): the search gets "
                         "the seconds the single-method runs trained")
    return found


def baseline_seconds(args) -> float:
    return sum(step["train_seconds"] for step in baseline(args).values())


def best_single(args) -> tuple[str, dict]:
    """The baseline arm's choice: the paper point whose run α-CROWN certifies best on validation."""
    figures = {m: step["val_select"] for m, step in baseline(args).items()}
    return min(figures, key=lambda m: (figures[m]["alpha_crown_err"], m)), figures


# ---- the search arms ---------------------------------------------------------------------------------------
def search_inputs(args, arm: str) -> dict:
    # the space's paper points are in the budget already: it is the seconds of their recorded baseline steps
    return {"budget_seconds": baseline_seconds(args), "search_seed": args.search_seed, "select_by": SELECT_BY,
            "select_top": SELECT_TOP, "max_trial_share": round(args.max_trial_share, 6), "objective": SEARCH_ARMS[arm]}


def run_search(args, arm: str) -> dict:
    """The search at the baseline's seconds, its rungs ranking by the arm's metric, exported; its chosen recipe and
    what it spent."""
    from trainers.safe_yaml import read_yaml_file
    from tuner import api

    objective, name = SEARCH_ARMS[arm], search_name(args.eps, arm)
    api.search(space_file(args), {**base_overrides(args), "eval.metrics": EVAL_METRICS[objective]}, name=name,
               num_samples=1000, max_concurrent=1, resources_per_trial="cpu=1", scheduler="asha", rungs="seconds",
               objective=objective, storage=storage_of(args), data_dir=args.data_dir, seed=args.search_seed,
               max_trial_seconds=baseline_seconds(args), select_by=SELECT_BY, select_top=SELECT_TOP,
               max_trial_share=args.max_trial_share)
    out = args.work / f"{name}_export"
    api.export(name, storage=storage_of(args), out=out)
    return {"config": read_yaml_file(out / "best.yaml"), "summary": search_summary(args, arm)}


def cmd_search(args) -> None:
    step = kept_step(args.steps, f"eps{args.eps} {args.arm}", search_inputs(args, args.arm),
                     lambda: run_search(args, args.arm))
    print(json.dumps({"search": search_name(args.eps, args.arm), **step["summary"]}), flush=True)


def search_step(args, arm: str, required: bool = True) -> dict | None:
    step = recorded_step(args.steps, f"eps{args.eps} {arm}", search_inputs(args, arm))
    if step is None and required:
        raise SystemExit(f"run `search --arm {arm}` first (eps {args.eps}, search seed {args.search_seed}, this "
                         f"baseline)")
    return step


def searched_arms(args) -> list[str]:
    """The arms with a recorded choice: best-single always, each search arm once its search is recorded."""
    return ["best-single"] + [arm for arm in SEARCH_ARMS if search_step(args, arm, required=False) is not None]


def search_summary(args, arm: str) -> dict:
    """What the search spent and chose: its device-seconds against the budget and the largest trial's share."""
    from tuner.results.experiment import load_search

    search = load_search(search_name(args.eps, arm), storage_of(args))
    return {"trials": len(search.trials), "counts": search.counts(), "device_seconds": round(search.device_seconds(), 1),
            "budget_device_seconds": search.record.max_trial_seconds,
            "largest_trial_share": round(search.largest_trial_share(), 3),
            "selection": search.selection,
            "trials_per_method": dict(sorted(Counter(method_of(t.params) for t in search.trials).items()))}


# ---- both winners on fresh seeds, certified on test -------------------------------------------------------
def arm_config(arm: str, args) -> dict:
    """The recipe each arm chose, as a training config (the seed set by the retrain)."""
    if arm == "best-single":
        method, _ = best_single(args)
        return paper_configs(args)[method]  # the recipe its baseline step was recorded with
    return search_step(args, arm)["config"]


def retrain_inputs(args, arm: str) -> dict:
    return {"recipe": recipe_of(arm_config(arm, args)), "test_n": args.test_n, "strong_n": args.strong_n,
            "bab_n": args.bab_n, "bab_time_limit": args.bab_time_limit}


def retrain_step_name(args, arm: str, seed: int) -> str:
    return f"eps{args.eps} retrain {arm} seed{seed}"


def retrain_and_test(args, config: dict, seed: int, run: Path) -> dict:
    """Train the recipe on a fresh seed, then certify its last.pt on the test split: each verifier beside PGD,
    so nothing proved is also broken."""
    from tuner import api

    train_run(config, run, args.data_dir, seed)
    checkpoint = run / "last.pt"
    passes = {"test": ("ibp,crown-ibp,pgd", args.test_n), "strong": ("alpha-crown,pgd", args.strong_n),
              "bab": ("alpha-crown,bab,pgd", args.bab_n)}
    cert = {name: api.verify(checkpoint, data_dir=args.data_dir, methods=methods, bab_time_limit=args.bab_time_limit,
                             **limit(n))
            for name, (methods, n) in passes.items()}
    t, s, b = cert["test"], cert["strong"], cert["bab"]
    return {"method": config["method"],
            "test": {"clean_err": t["clean_err"], "ibp_err": t["ibp_err"], "pgd_err": t["pgd_err"],
                     "alpha_crown_err": s["alpha_crown_err"], "bab_err": b["bab_err"],
                     "verified_err": b["verified_err"]},
            "n": {"test": t["n"], "alpha_crown": s["n"], "bab": b["n"]},
            "alpha_crown_err_on_bab_images": b["alpha_crown_err"]}


def cmd_retrain(args) -> None:
    for arm in args.arms.split(",") if args.arms else searched_arms(args):
        config = arm_config(arm, args)
        for seed in RETRAIN_SEEDS:
            run = args.work / f"eps{args.eps}" / "retrain" / arm / f"seed{seed}"
            step = kept_step(args.steps, retrain_step_name(args, arm, seed), retrain_inputs(args, arm),
                             lambda: retrain_and_test(args, config, seed, run))
            print(json.dumps({"arm": arm, "method": step["method"], "seed": seed, **step["test"]}), flush=True)


def entries(args) -> list[dict]:
    arms = searched_arms(args)
    spent = {arm: search_step(args, arm)["summary"]["device_seconds"] for arm in arms if arm in SEARCH_ARMS}
    spent["best-single"] = round(baseline_seconds(args), 1)
    found = []
    for arm in arms:
        inputs = retrain_inputs(args, arm)
        for seed in RETRAIN_SEEDS:
            step = recorded_step(args.steps, retrain_step_name(args, arm, seed), inputs)
            if step is not None:
                found.append({"arm": arm, "eps": args.eps, "method": step["method"], "seed": seed,
                              "device_seconds": spent[arm], **{k: v for k, v in step.items() if k != "method"}})
    return found


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
                      **{arm: search_step(args, arm)["summary"] for arm in searched_arms(args) if arm in SEARCH_ARMS}},
                     indent=1))
    print(table(kept + found))


def main(argv=None) -> None:
    parser, sub, common = bench_parser(__doc__, "bench_runs/methods_mnist")
    common.add_argument("--eps", type=float, required=True)
    common.add_argument("--defaults", action="append", default=[], metavar="K=V",
                        help="change the space's defaults point (bench.methods_mnist); give each step the same")
    common.add_argument("--search-seed", type=int, default=0)
    common.add_argument("--max-trial-share", type=float, default=DEFAULT_TRIAL_SHARE,
                        help="the most of the budget one search trial may take (default: the service's, 1/3)")
    common.add_argument("--steps", type=Path, default=STEPS, help="the finished steps, kept across sessions")
    common.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    b = sub.add_parser("baseline", parents=[common])
    b.add_argument("--methods", default=None, help="comma list (default: every method with a paper point)")
    sub.add_parser("search", parents=[common]).add_argument("--arm", choices=list(SEARCH_ARMS), default="search")
    certify = argparse.ArgumentParser(add_help=False)  # retrain certifies; collect finds those certificates
    certify.add_argument("--test-n", type=int, default=FULL_TEST)
    certify.add_argument("--strong-n", type=int, default=2000, help="images for α-CROWN (the first ones)")
    certify.add_argument("--bab-n", type=int, default=200)
    certify.add_argument("--bab-time-limit", type=float, default=2.0)
    r = sub.add_parser("retrain", parents=[common, certify])
    r.add_argument("--arms", default=None, help="comma list (default: best-single and every recorded search arm)")
    c = sub.add_parser("collect", parents=[common, certify])
    c.add_argument("--out", type=Path, default=None, help="default: bench/results/methods_search.json")
    args = parser.parse_args(argv)
    {"baseline": cmd_baseline, "search": cmd_search, "retrain": cmd_retrain, "collect": cmd_collect}[args.cmd](args)


if __name__ == "__main__":
    main()
