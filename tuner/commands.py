"""The search subcommands of `certtune`: search, resume, export, report. tuner/cli.py registers them.

Ray, Optuna and W&B are imported only when a command runs. Bad input raises SearchError/SpaceError
(ConfigError subclasses), which the CLI prints as one line with exit code 2, before any trial starts.
"""
from __future__ import annotations

import json
from pathlib import Path


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
    p.add_argument("--seed", default="0", help="seed of the Optuna sampler (default 0)")
    p.add_argument("--sampler", default="tpe", help="tpe (Optuna's TPE, default) or random (the baseline)")
    p.add_argument("--max-trial-epochs", default=None,
                   help="compute budget: stop the search once its trials have trained this many epochs in "
                        "total (default: no budget; --num-samples trials)")
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
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("report", help="print a summary of a search")
    p.add_argument("name", help="the search's --name")
    p.add_argument("--storage", default=None, help="where it ran (default: as for search)")
    p.set_defaults(run=cmd_report)


def cmd_search(args) -> int:
    from trainers.config import parse_overrides
    from tuner.search import finish, prepare_search, run_search

    record, storage = prepare_search(
        args.space, parse_overrides(args.overrides), args.name, args.num_samples, args.max_concurrent,
        args.resources_per_trial, args.scheduler, args.objective, args.storage, args.address,
        args.wandb_project, args.data_dir, args.seed, args.sampler, args.max_trial_epochs,
        args.wandb_artifacts)
    print(f"search {record.name}: experiment in {storage}/{record.name}", flush=True)
    run_search(record, storage)
    summary, code = finish(record, storage)
    print(summary, flush=True)
    return code


def cmd_resume(args) -> int:
    from tuner.record import normalize_storage, read_record
    from tuner.search import finish, resume_search

    resume_search(args.name, args.storage, args.address)
    storage = normalize_storage(args.storage)
    summary, code = finish(read_record(storage, args.name), storage)
    print(summary, flush=True)
    return code


def cmd_export(args) -> int:
    from tuner.export import export_search
    from tuner.record import positive_int

    out = Path(args.out) if args.out else None
    epochs = None if args.epochs is None else positive_int("--epochs", args.epochs)
    summary = export_search(args.name, args.storage, out, positive_int("--top-k", args.top_k), epochs)
    print(json.dumps(summary, indent=2, default=str), flush=True)
    return 0


def cmd_report(args) -> int:
    from tuner.report import report_search

    print(report_search(args.name, args.storage), flush=True)
    return 0
