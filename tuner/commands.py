"""The search subcommands of `certtune`: search, resume, export, report. tuner/cli.py registers them.

Ray, Optuna and W&B are imported only when a command runs. Bad input raises SearchError/SpaceError
(ConfigError subclasses), which the CLI prints as one line with exit code 2, before any trial starts.
"""
from __future__ import annotations

import json
import math

from trainers.config import parse_overrides
from trainers.verifiers import KNOBS, names


def add_search_commands(sub) -> None:
    p = sub.add_parser("search", help="run a hyperparameter search over a search space")
    p.add_argument("space", help="search space YAML (or the name of one in search_spaces/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the space's base config, e.g. data.subset=500 epochs=10")
    p.add_argument("--name", default=None, help="experiment name (default: <space>-<date>-<time>)")
    p.add_argument("--num-samples", default="20", help="trials to run (default 20)")
    p.add_argument("--max-concurrent", default="2", help="trials running at once (default 2)")
    p.add_argument("--resources-per-trial", default="cpu=1,gpu=0",
                   help="per trial, e.g. cpu=2,gpu=0.5 (fractional GPUs share one GPU; default cpu=1,gpu=0)")
    p.add_argument("--scheduler", default="asha", help="asha (warmup-aware, default), plain-asha or none")
    p.add_argument("--objective", default="ibp_err",
                   help="ibp_err (default) or a comma list for several objectives, e.g. ibp_err,clean_err or "
                        "ibp_err,train_seconds; all minimised on the validation split")
    p.add_argument("--storage", default=None,
                   help="results folder or cloud URI (default: $CERTTUNE_STORAGE, then ./certtune_results)")
    p.add_argument("--address", default=None,
                   help="join a Ray cluster: HOST:PORT, auto, or local (default: the cluster in $RAY_ADDRESS, "
                        "as in a `ray job submit` job; else a local Ray instance)")
    p.add_argument("--wandb-project", default=None,
                   help="log every trial to W&B (offline unless an API key is configured; default: $WANDB_PROJECT, "
                        "else W&B is off)")
    p.add_argument("--wandb-artifacts", action="store_true",
                   help="also log each finished trial's best.pt to W&B as a model artifact")
    p.add_argument("--data-dir", default=None, help="dataset root (default: $CERTTUNE_DATA, then ./data)")
    p.add_argument("--checkpoint-every", default=None, metavar="SECONDS",
                   help="a trial saves a checkpoint at its last epoch and after this many seconds of training "
                        "since its last one (default 30; 0: every epoch); a crash loses at most about twice that per trial")
    p.add_argument("--fidelity", default=None, metavar="target|epochs:E|subset:N",
                   help="what a trial trains: the target run (the space's base config), or it compressed to E "
                        "epochs (every phase keeps its fraction of the steps), or on N training images with the "
                        "batch scaled so an epoch keeps its steps (default: the space's fidelity section, else target)")
    p.add_argument("--rungs", default=None, choices=("epochs", "seconds"),
                   help="what the warmup-aware ASHA's rungs count at the target eps: epochs, or seconds trained "
                        "(trials of different cost per epoch meet at equal compute; default: seconds when the space "
                        "searches `method`, else epochs)")
    p.add_argument("--grace-seconds", default=None, metavar="S",
                   help="--rungs seconds: the first rung (default: the first epoch at target of the first trial)")
    p.add_argument("--select-by", default=None, metavar="VERIFIER",
                   help="when the trials have ended, certify the top --select-top points on the validation split "
                        f"with {', '.join(names(certifies=True))} and pick the winner by it (report shows both; export "
                        "follows it)")
    p.add_argument("--select-top", default="3", metavar="K", help="--select-by: points certified (default 3)")
    p.add_argument("--select-n", default=None, metavar="N",
                   help="--select-by: only the first N validation images (default all)")
    p.add_argument("--reeval-top", default="0", metavar="K",
                   help="when the other trials have ended, train the K best points and the space's defaults again "
                        "with --reeval-seeds more seeds each; points are then ranked by their mean over seeds "
                        "(counted in --num-samples; default 0: off)")
    p.add_argument("--reeval-seeds", default="0", metavar="S", help="more seeds per re-evaluated point (with --reeval-top)")
    p.add_argument("--seed", default="0", help="seed of the Optuna sampler (default 0)")
    p.add_argument("--sampler", default="tpe", help="tpe (Optuna's TPE, default) or random (the baseline)")
    p.add_argument("--startup-trials", default=None, metavar="N",
                   help="with --sampler tpe: the trials sampled at random before TPE models the results (default: "
                        "Optuna's 10, or a quarter of the trials the search affords when that is fewer, at least 2)")
    p.add_argument("--max-trial-epochs", default=None,
                   help="compute budget: stop the search once its trials have trained this many epochs in "
                        "total (default: no budget; --num-samples trials)")
    p.add_argument("--max-trial-seconds", default=None,
                   help="compute budget: stop the search once its trials have trained this many device-seconds in "
                        "total (each trial's training seconds times its GPUs, or its CPUs if it holds no GPU)")
    p.add_argument("--max-trial-share", default=None, metavar="F",
                   help="with --max-trial-seconds and --scheduler asha: the most of that budget one trial may take, "
                        "ramp included; a trial that cannot reach its next rung or its end within it is stopped "
                        "(default 1/3)")
    p.add_argument("--constraint", action="append", default=None, metavar="METRIC<=X",
                   help="a trial is feasible only if its final METRIC<=X (or >=X), e.g. clean_err<=0.35; "
                        "repeatable; TPE prefers feasible trials and export picks the best feasible one")
    p.add_argument("--optuna-storage", default=None,
                   help="keep the Optuna study in this database (sqlite:///abs/path.db, postgresql://user@host/db, "
                        "mysql://...), e.g. for optuna-dashboard or several drivers (default: a journal file "
                        "in the experiment directory)")
    p.add_argument("--warm-start", default=None, metavar="SEARCH_OR_STUDY",
                   help="start from the finished and pruned trials of an earlier search in --storage (its name), "
                        "or of any Optuna study given as STORAGE#STUDY (STORAGE: a database URL or a journal "
                        "file); its space must agree on the shared params")
    p.add_argument("--enqueue", default=None, metavar="FILE.yaml",
                   help="evaluate these points first, after the space's defaults: a YAML list of "
                        "{param: value} mappings")
    p.set_defaults(run=cmd_search)

    p = sub.add_parser("resume", help="continue an interrupted search")
    p.add_argument("name", help="the search's --name")
    p.add_argument("--storage", default=None, help="where it runs (default: as for search)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else the search's own --address; "
                        "'local' for a local instance)")
    p.set_defaults(run=cmd_resume)

    p = sub.add_parser("export", help="export a search: best config, top-k, trials table, Pareto front")
    p.add_argument("name", help="the search's --name")
    p.add_argument("--storage", default=None, help="where it ran (default: as for search)")
    p.add_argument("--out", default=None, help="output folder (default: <storage>/<name>/export/)")
    p.add_argument("--top-k", default="5", help="how many of the best trials to export (default 5)")
    p.add_argument("--epochs", default=None,
                   help="also write best_<N>ep.yaml: the best recipe scaled to N epochs (warmup, ramp and LR "
                        "milestones keep their fractions), to train the winner of short trials long")
    p.add_argument("--verify", default=None, metavar="VERIFIER",
                   help=f"certify the top-k trials' best checkpoints on the validation split with one of "
                        f"{', '.join(names(certifies=True))} and rank them by it (verified.csv)")
    p.add_argument("--verify-n", default=None, help="--verify: only the first N validation examples (default all)")
    p.add_argument("--data-dir", default=None, help="--verify: the data (default: the search's --data-dir)")
    p.add_argument("--device", default="cpu", help="--verify: cpu, cuda or cuda:N")
    for knob in KNOBS.values():  # the verifiers' knobs, as `certtune verify` takes them
        p.add_argument(knob.flag, type=knob.type, default=knob.default, help=knob.help)
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("report", help="print a summary of a search")
    p.add_argument("name", help="the search's --name")
    p.add_argument("--storage", default=None, help="where it ran (default: as for search)")
    p.set_defaults(run=cmd_report)


def cmd_search(args) -> int:
    from tuner import api
    from tuner.run.driver import exit_code

    return exit_code(api.search(
        args.space, parse_overrides(args.overrides), name=args.name, num_samples=args.num_samples,
        max_concurrent=args.max_concurrent, resources_per_trial=args.resources_per_trial, scheduler=args.scheduler,
        objective=args.objective, storage=args.storage, address=args.address, wandb_project=args.wandb_project,
        data_dir=args.data_dir, seed=args.seed, sampler=args.sampler, max_trial_epochs=args.max_trial_epochs,
        max_trial_seconds=args.max_trial_seconds, constraints=args.constraint, optuna_storage=args.optuna_storage,
        warm_start=args.warm_start, enqueue=args.enqueue, wandb_artifacts=args.wandb_artifacts,
        checkpoint_every=args.checkpoint_every, fidelity=args.fidelity, reeval_top=args.reeval_top,
        reeval_seeds=args.reeval_seeds, rungs=args.rungs, grace_seconds=args.grace_seconds, select_by=args.select_by,
        select_top=args.select_top, select_n=args.select_n, max_trial_share=args.max_trial_share,
        startup_trials=args.startup_trials))


def cmd_resume(args) -> int:
    from tuner import api
    from tuner.run.driver import exit_code

    return exit_code(api.resume(args.name, storage=args.storage, address=args.address))


def cmd_export(args) -> int:
    from tuner import api

    summary = api.export(args.name, storage=args.storage, out=args.out, top_k=args.top_k, epochs=args.epochs,
                         verify=args.verify, verify_n=args.verify_n, data_dir=args.data_dir, device=args.device,
                         **{k: getattr(args, k) for k in KNOBS})
    print(json.dumps(finite_or_null(summary), indent=2, default=str, allow_nan=False), flush=True)
    return 0


def finite_or_null(value):
    """The summary as strict JSON (what jq and other languages parse): NaN and ±inf, e.g. the standard error of
    a point on one seed, become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def cmd_report(args) -> int:
    from tuner.results.report import report_search

    print(report_search(args.name, args.storage), flush=True)
    return 0
