"""`certtune` command line. Bad input prints one line and exits 2 before any compute starts.

train and verify need only the trainer core; the search commands import Ray/Optuna/W&B lazily.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


from trainers.config import ConfigError, parse_overrides
from trainers.verifiers import KNOBS, VERIFIERS, names, per_epoch_metrics


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
            print(f"certtune: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


def is_user_error(exc: Exception) -> bool:
    user_errors = (ConfigError, UsageError, FileNotFoundError)
    # A DataError or SpaceError can only come from a module already imported (and importing the data
    # module would pull in torch just to print a config typo).
    for module, name in (("trainers.data", "DataError"), ("tuner.space.search_space", "SpaceError")):
        if module in sys.modules:
            user_errors += (getattr(sys.modules[module], name),)
    return isinstance(exc, user_errors)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (the usage text stays behind --help), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"certtune: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="certtune", description="Certified-training search and training.")
    sub = parser.add_subparsers(parser_class=OneLineParser)

    p = sub.add_parser("train", help="train one configuration")
    p.add_argument("config", help="YAML training config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. schedule.length=10")
    p.add_argument("--data-dir", default=None, help="dataset root (default: $CERTTUNE_DATA, then ./data)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--restart", action="store_true",
                   help="start over in an --out that holds another run (its files move to --out/replaced-<time>/)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("verify", help="evaluate a checkpoint's certified errors")
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--eps", type=float, default=None, help="in (0, 1]; default: the checkpoint's target eps")
    p.add_argument("--verifiers", "--methods", dest="verifiers", action=RememberFlag,
                   default=",".join(names(per_epoch=True)),
                   help=f"comma list of {', '.join(VERIFIERS)} (--methods: its former name, the same)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N examples of the split")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                   help="a progress line on stderr at most this often (0: after every batch and BaB image)")
    add_knob_flags(p)
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_verify)

    try:
        from tuner.commands import add_search_commands
    except ImportError:
        add_search_commands = None
    if add_search_commands is not None:
        add_search_commands(sub)
    return parser


def add_knob_flags(p: argparse.ArgumentParser) -> None:
    """The verifiers' knobs (trainers/verifiers.py) as flags, with the table's defaults."""
    for knob in KNOBS.values():
        p.add_argument(knob.flag, type=knob.type, default=knob.default, help=knob.help)


def cmd_train(args) -> int:
    from tuner import api

    def show(metrics, _):
        keys = ("epoch", "eps", "loss", *per_epoch_metrics(), "time_epoch_s")
        print(json.dumps({k: _round(metrics[k]) for k in keys if k in metrics}), flush=True)

    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    api.train(args.config, parse_overrides(args.overrides), data_dir=args.data_dir, out=out, device=args.device,
              progress=not args.no_progress and sys.stderr.isatty(), restart=args.restart, on_epoch=show)
    print(f"run directory: {out}", flush=True)
    return 0


class RememberFlag(argparse.Action):
    """Stores the value and which of the option's names was used, so an error names the flag the user typed."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_flag", option_string)


def cmd_verify(args) -> int:
    from tuner import api
    from trainers.verify import ProgressLine, check_methods

    verifiers = check_methods(args.verifiers, getattr(args, "verifiers_flag", "--verifiers"))
    print(json.dumps(api.verify(args.checkpoint, data_dir=args.data_dir, split=args.split, eps=args.eps,
                                methods=verifiers, device=args.device, limit=args.limit,
                                progress=ProgressLine(args.progress_every),
                                **{k: getattr(args, k) for k in KNOBS})))
    return 0


def _round(v):
    return round(v, 5) if isinstance(v, float) else v


if __name__ == "__main__":
    sys.exit(main())
