"""What a benchmark's training run (a `certtune train --out` directory, trainers/run_dir.py) says about itself, and
the helpers every benchmark shares (its command line, figures, per-run results kept across interruptions)."""
from __future__ import annotations

import json
from pathlib import Path


def epoch_rows(run: Path) -> list[dict]:
    """The run's metrics.jsonl, one dict per epoch ([] before its first epoch ends)."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def fingerprint(checkpoint: Path) -> list[int]:
    """[mtime_ns, size] of a checkpoint: a benchmark reuses figures only for the checkpoint they came from
    (a run copied without its timestamps is verified again, which is safe)."""
    stat = checkpoint.stat()
    return [stat.st_mtime_ns, stat.st_size]


def save_figure(fig, axes, path: Path, legend_size: int = 8) -> None:
    """Legend and grid on every axis, then the figure saved and closed (the benchmarks' plots end alike)."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.legend(fontsize=legend_size)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_parser(doc: str, default_work: str):
    """(parser, its subcommands, the options every subcommand shares: --work for its runs, --data-dir)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--work", type=Path, default=Path(default_work))
    common.add_argument("--data-dir", default=os.environ.get("CERTTUNE_DATA", "../shared/data"))
    return parser, parser.add_subparsers(dest="cmd", required=True), common


def kept_per_key(path: Path, key: dict, compute) -> dict:
    """compute() once per `key`, kept in `path` (written atomically), so an interrupted step goes on where it
    stopped and a changed input (the key) is figured again."""
    from tuner.space.record import write_text

    try:
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            return kept
    except (OSError, ValueError):  # none yet, or cut short
        pass
    found = {**compute(), "key": key}
    write_text(str(path), json.dumps(found))
    return found
