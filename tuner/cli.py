"""`certtune` command line. Bad input prints one line and exits 2 before any compute starts.

train and verify need only the trainer core; the search commands import Ray/Optuna/W&B lazily.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


from trainers.config import ConfigError


class UsageError(ConfigError):
    """Bad input from the user: reported as one line, exit code 2 (a ConfigError, so it is recognised
    even when this module runs as __main__ and is imported a second time as tuner.cli)."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may come after options too (argparse stops collecting positionals at an option).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.run(args) or 0
    except Exception as exc:  # noqa: BLE001 - only user-input errors are turned into one line
        if is_user_error(exc):
            print(f"certtune: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


def is_user_error(exc: Exception) -> bool:
    from trainers.config import ConfigError
    from trainers.data import DataError
    user_errors = (ConfigError, DataError, UsageError, FileNotFoundError)
    try:
        from tuner.spaces import SpaceError
        user_errors += (SpaceError,)
    except ImportError:
        pass
    return isinstance(exc, user_errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="certtune", description="Certified-training search and training.")
    sub = parser.add_subparsers()

    p = sub.add_parser("train", help="train one configuration")
    p.add_argument("config", help="YAML training config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. schedule.length=10")
    p.add_argument("--data-dir", default=None, help="dataset root (default: $CERTTUNE_DATA, then ./data)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("verify", help="evaluate a checkpoint's certified errors")
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--eps", type=float, default=None, help="default: the checkpoint's target eps")
    p.add_argument("--methods", default="ibp,crown-ibp,pgd",
                   help="comma list of ibp, crown-ibp, crown, alpha-crown, bab, pgd")
    p.add_argument("--alpha-iterations", type=int, default=20, help="alpha-crown/bab: slope optimisation steps")
    p.add_argument("--alpha-lr", type=float, default=0.1, help="alpha-crown/bab: Adam step size of the slopes")
    p.add_argument("--bab-time-limit", type=float, default=10.0, help="bab: seconds per example")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_verify)

    try:
        from tuner.commands import add_search_commands
    except ImportError:
        add_search_commands = None
    if add_search_commands is not None:
        add_search_commands(sub)
    return parser


def cmd_train(args) -> int:
    from trainers.config import TrainConfig, parse_overrides
    from trainers.train import Trainer

    cfg = TrainConfig.from_yaml(args.config).with_overrides(parse_overrides(args.overrides)).resolve()
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    trainer = Trainer(cfg, data_dir=args.data_dir, out_dir=out, device=args.device,
                      progress=not args.no_progress and sys.stderr.isatty())

    def show(metrics, _):
        keys = ("epoch", "eps", "loss", "clean_err", "ibp_err", "crown_ibp_err", "pgd_err", "time_epoch_s")
        print(json.dumps({k: _round(metrics[k]) for k in keys if k in metrics}), flush=True)

    trainer.fit(on_epoch=show)
    print(f"run directory: {out}", flush=True)
    return 0


def cmd_verify(args) -> int:
    from trainers.verify import verify_checkpoint

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    allowed = ("ibp", "crown-ibp", "crown", "alpha-crown", "bab", "pgd")
    if not set(methods) <= set(allowed):
        raise UsageError(f"--methods: unknown {sorted(set(methods) - set(allowed))}; allowed: {', '.join(allowed)}")
    if args.eps is not None and not args.eps > 0:
        raise UsageError(f"--eps: must be > 0, got {args.eps}")
    if args.alpha_iterations < 0 or not args.alpha_lr > 0 or not args.bab_time_limit > 0:
        raise UsageError("--alpha-iterations must be >= 0, --alpha-lr and --bab-time-limit > 0")
    from trainers.bab import BabConfig
    from trainers.evaluate import VerifierOptions
    options = VerifierOptions(args.alpha_iterations, args.alpha_lr,
                              BabConfig(time_limit=args.bab_time_limit, iterations=args.alpha_iterations,
                                        lr=args.alpha_lr))
    result = verify_checkpoint(args.checkpoint, args.data_dir, args.split, args.eps, methods, args.device,
                               options)
    print(json.dumps(result))
    return 0


def _round(v):
    return round(v, 5) if isinstance(v, float) else v


if __name__ == "__main__":
    sys.exit(main())
