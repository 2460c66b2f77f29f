"""What a benchmark's training run (a `certtune train --out` directory, trainers/run_dir.py) says about itself."""
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
