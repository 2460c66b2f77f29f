"""What a benchmark's training run (a `certtune train --out` directory, trainers/run_dir.py) says about itself, and
the helpers every benchmark shares (its command line, figures, per-run results kept across interruptions, and
finished steps kept across sessions)."""
from __future__ import annotations

import contextlib
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


def kept_step(path: Path, name: str, inputs: dict, compute) -> dict:
    """A long benchmark's finished step: compute() kept under `name` in `path`, a JSON file in bench/results that
    is committed. Run directories are scratch that a later session does not have (a session's files end with
    it), so a benchmark longer than a session goes on from the steps it recorded; a step is reused while its
    inputs are the same, computed again otherwise. Several workers may share one file (an flock serialises
    the read-modify-write)."""
    kept = recorded_step(path, name, inputs)
    if kept is not None:
        return kept
    output = compute()
    with _steps_lock(path):
        steps = read_steps(path)
        steps[name] = {"inputs": inputs, "output": output}
        _write_steps(path, steps)
    return output


def recorded_step(path: Path, name: str, inputs: dict | None) -> dict | None:
    """The output of a step recorded with these inputs (None: whichever it was recorded with), or None."""
    step = read_steps(path).get(name)
    # compared as the inputs read back from JSON (tuples as lists, keys as strings)
    if step is None or (inputs is not None and step.get("inputs") != json.loads(json.dumps(inputs))):
        return None
    return step["output"]


def read_steps(path: Path) -> dict:
    """{step name: {"inputs", "output"}} of a steps file ({} before its first step)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _write_steps(path: Path, steps: dict) -> None:
    from tuner.space.record import write_text

    write_text(str(path), json.dumps(steps, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def _steps_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def recipe_of(config: dict) -> dict:
    """A training config resolved, its seed aside: what two runs must share to be the same recipe."""
    from trainers.config import TrainConfig

    return {k: v for k, v in TrainConfig.from_dict(config).resolve().to_dict().items() if k != "seed"}
