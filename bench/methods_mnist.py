"""Every training method on real MNIST, certified by every verifier; then a search over methods at equal compute.

    python -m bench.methods_mnist train   --eps 0.1 [--methods fast,sabr,...] [--defaults K=V ...] [KEY=VALUE ...]
    python -m bench.methods_mnist search  --eps 0.1 [--defaults K=V ...] [KEY=VALUE ...]   (the same flags as train)
    python -m bench.methods_mnist collect --eps 0.1 [--test-n 10000] [--strong-n 10000] [--bab-n 200]
                                          [--bab-time-limit 2]

Setting: search_spaces/mnist_methods.yaml (cnn_small; its base: 8 epochs on a 4,000-image training subset,
1,000 validation images; KEY=VALUE overrides change the base, e.g. `epochs=12 data.subset=12000`).
`--defaults K=V` (repeated) changes the space's defaults point, i.e. the shared knobs of every paper point and
where the search starts, to scale them to the budget: e.g. `--defaults batch_size=64 --defaults
schedule.length=5` for 12 epochs on 12,000 images, where the space's 256-image batches and 3-epoch ramp (made
for 8 epochs on 4,000) leave IBP-based training too few steps at eps=0.3 and it collapses to a constant output.
The changed space is written to `--work`/mnist_methods_eps<eps>.yaml (bench/spaces.py); `search` refuses to
start unless its paper points are the configs `train` ran.
- train: each method at its paper's settings as the space's seed points hold them (CTBench's MNIST scripts:
  SABR/STAPS λ, the expressive losses' α and attack, TAPS's split and gradient scale; the shared knobs are the
  `fast` recipe's), one run per method in `--work`/eps<eps>/<method>/, resumed if interrupted.
- search: TPE with warmup-aware ASHA over the whole space (method and every knob; the nine paper points
  first) with `--max-trial-seconds` equal to the CPU-seconds the single-method runs trained: equal compute
  against trying each method once. Its best trial is retrained as `search-best`.
- collect: each run's last.pt on the first `--test-n` test images: clean, IBP-, CROWN-IBP-verified and PGD-20
  errors; CROWN- and α-CROWN-verified (and PGD) on the first `--strong-n`; BaB on the first `--bab-n`
  (per-example time limit) with α-CROWN on the same images beside it; the per-run training seconds and config.
  Each run's figures are kept in its directory (collect.json, for that last.pt and those sizes), so an
  interrupted collect goes on where it stopped. Writes bench/results/methods_mnist_eps<eps>.json and prints a
  markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

from bench.runs import epoch_rows, fingerprint, kept_per_key, recipe_of

SPACE = "search_spaces/mnist_methods.yaml"
FULL_TEST = 10_000


def space_file(args) -> str:
    from bench.spaces import space_with_defaults

    out = args.work / f"{Path(SPACE).stem}_eps{args.eps}.yaml"
    return space_with_defaults(SPACE, args.defaults, out, base_overrides(args))


def paper_points(overrides: dict, space_path: str = SPACE) -> dict[str, dict]:
    """method → its seed point in the space (the paper settings), with the overrides applied to the base."""
    from tuner.space.record import read_space_file, space_with_overrides

    path, raw = read_space_file(space_path)
    space = space_with_overrides(raw, overrides, path)
    points = {}
    for point in space.start_points():
        points.setdefault(method_of(point), point)
    return {m: space.to_train_config(p).to_dict() for m, p in points.items()}


def method_of(params: dict) -> str:
    return params.get("method", "fast")  # the space's defaults point is `fast`


def base_overrides(args) -> dict:
    from trainers.config import parse_overrides

    return {"eps": args.eps, **parse_overrides(args.overrides)}


def train_run(config: dict, out: Path, data_dir: str, seed: int) -> dict:
    """One training run on one CPU thread, as a search trial with cpu=1 trains, so train_seconds compare."""
    import torch

    from tuner import api

    torch.set_num_threads(1)
    return api.train({**config, "seed": seed}, data_dir=data_dir, out=out)


def cmd_train(args) -> None:
    configs = paper_points(base_overrides(args), space_file(args))
    methods = args.methods.split(",") if args.methods else list(configs)
    unknown = [m for m in methods if m not in configs]
    if unknown:
        raise SystemExit(f"--methods: {', '.join(unknown)} not in the space's seed points ({', '.join(configs)})")
    for method in methods:
        out = args.work / f"eps{args.eps}" / method
        final = train_run(configs[method], out, args.data_dir, args.seed)
        print(json.dumps({"method": method, "epoch": final.get("epoch"), "ibp_err": final.get("ibp_err"),
                          "train_seconds": final.get("train_seconds")}), flush=True)


def single_runs(work: Path, eps: float) -> dict[str, Path]:
    root = work / f"eps{eps}"
    return {d.name: d for d in sorted(root.iterdir()) if (d / "last.pt").is_file()} if root.is_dir() else {}


def last_metrics(run: Path) -> dict:
    return epoch_rows(run)[-1]


def cmd_search(args) -> None:
    from tuner import api

    runs = {m: r for m, r in single_runs(args.work, args.eps).items() if m != "search-best"}
    if not runs:
        raise SystemExit("run `train` first: the search gets the CPU-seconds the single-method runs trained")
    space, overrides = space_file(args), base_overrides(args)
    check_runs_are_the_paper_points(runs, paper_points(overrides, space))
    seconds = sum(last_metrics(r)["train_seconds"] for r in runs.values())
    name = f"methods_eps{args.eps}"
    storage = str((args.work / "searches").resolve())
    api.search(space, overrides, name=name, num_samples=1000, max_concurrent=1,
               resources_per_trial="cpu=1", scheduler="asha", storage=storage, data_dir=args.data_dir,
               seed=args.seed, max_trial_seconds=seconds, max_trial_share=args.max_trial_share)
    out = args.work / f"export_eps{args.eps}"
    api.export(name, storage=storage, out=out)
    from trainers.safe_yaml import read_yaml_file

    best = read_yaml_file(out / "best.yaml")
    final = train_run(best, args.work / f"eps{args.eps}" / "search-best", args.data_dir, args.seed)
    print(json.dumps({"search": name, "budget_cpu_seconds": round(seconds, 1), "best_method": best["method"],
                      "ibp_err": final.get("ibp_err")}), flush=True)


def check_runs_are_the_paper_points(runs: dict[str, Path], points: dict[str, dict]) -> None:
    """The search starts from the paper points and gets the seconds the runs trained: both must be the same
    configs (seed aside), i.e. `train` and `search` got the same --defaults and KEY=VALUE overrides."""
    from trainers.safe_yaml import read_yaml_file

    for method, run in runs.items():
        ran, point = recipe_of(read_yaml_file(run / "config.yaml")), recipe_of(points.get(method, {}))
        differ = sorted(k for k in ran.keys() | point.keys() if ran.get(k) != point.get(k))
        if differ:
            raise SystemExit(f"{run}: trained with other {', '.join(differ)} than this search's paper point for "
                             f"{method}; give search the --defaults and KEY=VALUE overrides train had")


def search_summary(work: Path, eps: float) -> dict | None:
    from tuner.results.experiment import load_search

    try:
        search = load_search(f"methods_eps{eps}", str((work / "searches").resolve()))
    except ValueError:
        return None
    best = search.best()
    return {"trials": len(search.trials), "counts": search.counts(), "trial_epochs": search.trial_epochs(),
            "cpu_seconds": round(search.device_seconds(), 1), "budget_cpu_seconds": search.record.max_trial_seconds,
            "best_params": best.params if best else None,
            "best_val_ibp_err": best.value("ibp_err") if best else None,
            "trials_per_method": dict(Counter(method_of(t.params) for t in search.trials).most_common()),
            "best_finished_val_ibp_err_per_method": best_per_method(search.trials)}


def best_per_method(trials) -> dict[str, float]:
    best = {}
    for t in trials:
        value = t.value("ibp_err") if t.status == "finished" else None
        method = method_of(t.params)
        if value is not None and value < best.get(method, float("inf")):
            best[method] = value
    return best


def cmd_collect(args) -> None:
    results = []
    for method, run in single_runs(args.work, args.eps).items():
        results.append(collect_run(method, run, args))
        print(json.dumps(results[-1]), flush=True)
    out = {"eps": args.eps, "space": SPACE, "runs": results, "search": search_summary(args.work, args.eps)}
    path = args.out or Path(f"bench/results/methods_mnist_eps{args.eps}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(table(results))


def collect_run(method: str, run: Path, args) -> dict:
    """One run's figures, kept in the run directory (collect.json) so an interrupted collect goes on where it
    stopped; redone if its last.pt or the sizes asked for changed."""
    from trainers.safe_yaml import read_yaml_file
    from tuner import api

    checkpoint = run / "last.pt"
    key = {"test_n": args.test_n, "strong_n": args.strong_n, "bab_n": args.bab_n, "bab_time_limit": args.bab_time_limit,
           "checkpoint": fingerprint(checkpoint)}

    def compute() -> dict:
        metrics = last_metrics(run)
        found = {"method": method, "epochs": metrics["epochs"], "train_seconds": round(metrics["train_seconds"], 1),
                 "val_ibp_err": metrics.get("ibp_err"), "config": read_yaml_file(run / "config.yaml")}
        # PGD runs with each so that no example a verifier proves is one it breaks (verify stops if so).
        passes = (("test", "ibp,crown-ibp,pgd", args.test_n), ("strong", "crown,alpha-crown,pgd", args.strong_n),
                  ("bab", "alpha-crown,bab,pgd", args.bab_n))
        for name, methods, n in passes:
            start = time.perf_counter()
            found[name] = api.verify(checkpoint, data_dir=args.data_dir, methods=methods,
                                     bab_time_limit=args.bab_time_limit, **limit(n))
            found[name + "_seconds"] = round(time.perf_counter() - start, 1)
        return found
    return kept_per_key(run / "collect.json", key, compute)


def limit(n: int) -> dict:
    return {} if n >= FULL_TEST else {"limit": n}


def table(results: list[dict]) -> str:
    """Errors in %, in three groups of images: clean, IBP, CROWN-IBP and PGD on the first test_n; CROWN,
    α-CROWN, verified by any of them (IBP included) and PGD on the first strong_n; α-CROWN and BaB (which
    starts from every cheaper verifier: the best certificate) with BaB's unknowns on the first bab_n."""
    if not results:
        return "(no runs)"
    n = {k: results[0][k]["n"] for k in ("test", "strong", "bab")}
    rows = [f"| method | train s | clean | IBP | CROWN-IBP | PGD | | CROWN | α-CROWN | any | PGD | | α-CROWN | BaB "
            f"| unknown |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| *images* | | *{n['test']}* | | | | | *{n['strong']}* | | | | | *{n['bab']}* | | |"]
    for r in results:
        t, s, b = r["test"], r["strong"], r["bab"]
        pct = lambda d, k: f"{100 * d[k]:.2f}"  # noqa: E731
        rows.append(f"| {r['method']} | {r['train_seconds']:.0f} | {pct(t, 'clean_err')} | {pct(t, 'ibp_err')} | "
                    f"{pct(t, 'crown_ibp_err')} | {pct(t, 'pgd_err')} | | {pct(s, 'crown_err')} | "
                    f"{pct(s, 'alpha_crown_err')} | {pct(s, 'verified_err')} | {pct(s, 'pgd_err')} | | "
                    f"{pct(b, 'alpha_crown_err')} | **{pct(b, 'bab_err')}** | {b['bab_unknown']} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--eps", type=float, required=True)
    common.add_argument("--work", type=Path, default=Path("bench_runs/methods_mnist"))
    common.add_argument("--data-dir", default=os.environ.get("CERTTUNE_DATA", "../shared/data"))
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--defaults", action="append", default=[], metavar="K=V",
                        help="change the space's defaults point (the shared knobs of every paper point); repeat")
    common.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t = sub.add_parser("train", parents=[common])
    t.add_argument("--methods", default=None, help="comma list (default: every method with a paper point)")
    s = sub.add_parser("search", parents=[common])
    s.add_argument("--max-trial-share", default=None, metavar="F",
                   help="the most of the budget one trial may take (default: the service's, 1/3)")
    c = sub.add_parser("collect", parents=[common])
    c.add_argument("--test-n", type=int, default=FULL_TEST)
    c.add_argument("--strong-n", type=int, default=FULL_TEST, help="images for CROWN and α-CROWN (the first ones)")
    c.add_argument("--bab-n", type=int, default=200)
    c.add_argument("--bab-time-limit", type=float, default=2.0)
    c.add_argument("--out", type=Path, default=None, help="default: bench/results/methods_mnist_eps<eps>.json")
    args = parser.parse_args(argv)
    {"train": cmd_train, "search": cmd_search, "collect": cmd_collect}[args.cmd](args)


if __name__ == "__main__":
    main()
