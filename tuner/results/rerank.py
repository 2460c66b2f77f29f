"""`certtune export --verify METHOD`: the top-k finished trials re-ranked by a stronger verifier.

A search ranks trials by what each trial measured every epoch on its validation split, usually the
IBP-verified error: cheap, and loose for models trained by SABR, the expressive losses or TAPS, which
α-CROWN or BaB certify far better. `--verify` certifies each of the top-k trials' `best.pt` (the epoch of
lowest validation IBP-verified error, saved in the trial's last Ray checkpoint) on that same validation split
with the stronger verifier, and export then ranks the k by it. The test split is never evaluated here: only
`certtune verify` evaluates it, so a choice made on validation stays an honest estimate on test.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from trainers.verifiers import names
from tuner.space.record import is_uri
from tuner.results.experiment import ExportError, Search, TrialResult

RERANK_VERIFIERS = names(certifies=True)  # every verifier but the attack (trainers/verifiers.py)
CHECKPOINT_NAMES = ("best.pt", "last.pt")  # best.pt first; last.pt for searches from before it was kept


@dataclass
class VerifiedTrial:
    trial: TrialResult
    search_rank: int  # its place in the search's own ranking (1 = the search's best)
    checkpoint: str  # where the certified weights came from
    verifier_err: float  # the --verify verifier's error (result[METRIC_OF[verifier]])
    result: dict  # verify_checkpoint's figures: n, clean_err, the verifier's error (+ BaB's counts)
    seconds: float


def rerank(search: Search, candidates: list[TrialResult], verifier: str, data_dir: str | None = None,
           limit: int | None = None, options=None, device: str = "cpu") -> list[VerifiedTrial]:
    """The candidates (in the search's order) certified by `verifier` on their validation split, best first:
    those satisfying every --constraint of the search first, then by verified error, ties in the search's
    order. `limit`: the first n validation examples only."""
    from trainers.verify import METRIC_OF, verify_checkpoint

    if verifier not in RERANK_VERIFIERS:
        raise ExportError(f"--verify: {verifier!r} is not one of {', '.join(RERANK_VERIFIERS)}")
    data_dir = data_dir or search.record.data_dir
    verified = []
    with tempfile.TemporaryDirectory(prefix="certtune-rerank-") as scratch:
        for rank, trial in enumerate(candidates, 1):
            checkpoint, origin = fetch_checkpoint(search, trial, Path(scratch))
            start = time.perf_counter()
            result = verify_checkpoint(checkpoint, data_dir, "val", None, (verifier,), device, options, limit)
            verified.append(VerifiedTrial(trial, rank, origin, float(result[METRIC_OF[verifier]]), result,
                                          time.perf_counter() - start))
    return sorted(verified, key=lambda v: (not search.feasible(v.trial), v.verifier_err, v.search_rank))


def fetch_checkpoint(search: Search, trial: TrialResult, scratch: Path) -> tuple[Path, str]:
    """(a local path to the trial's best.pt, else last.pt, from its newest Ray checkpoint; where it lives).
    A checkpoint on remote storage is copied into `scratch` first."""
    if not trial.dirname:
        raise ExportError(f"trial {trial.trial_id}: its directory is not known, so its checkpoint cannot be found")
    trial_dir = f"{search.location.rstrip('/')}/{trial.dirname}"
    if not is_uri(trial_dir):
        for ckpt in sorted(Path(trial_dir).glob("checkpoint_*"), reverse=True):
            for name in CHECKPOINT_NAMES:
                if (ckpt / name).is_file():
                    return ckpt / name, str(ckpt / name)
        raise ExportError(f"trial {trial.trial_id}: no checkpoint with {' or '.join(CHECKPOINT_NAMES)} in {trial_dir}")
    return _fetch_remote(trial, trial_dir, scratch)


def _fetch_remote(trial: TrialResult, trial_dir: str, scratch: Path) -> tuple[Path, str]:
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(trial_dir)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
        checkpoints = sorted((i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                              and i.path.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_")), reverse=True)
        for ckpt in checkpoints:
            for name in CHECKPOINT_NAMES:
                if fs.get_file_info(f"{ckpt}/{name}").type == pyarrow.fs.FileType.File:
                    local = scratch / f"{trial.trial_id}-{name}"
                    with fs.open_input_stream(f"{ckpt}/{name}") as src, local.open("wb") as dst:
                        shutil.copyfileobj(src, dst)
                    return local, f"{trial_dir}/{ckpt.rstrip('/').rsplit('/', 1)[-1]}/{name}"
    except (OSError, ValueError) as e:
        raise ExportError(f"{trial_dir}: cannot read the trial's checkpoints ({str(e).splitlines()[0]})") from None
    raise ExportError(f"trial {trial.trial_id}: no checkpoint with {' or '.join(CHECKPOINT_NAMES)} in {trial_dir}")


def verified_rows(verified: list[VerifiedTrial], verifier: str, objectives: list[str]) -> tuple[list[str], list[list]]:
    """The table export writes as verified.csv: one row per candidate, verified rank order."""
    extra = [k for k in ("bab_falsified", "bab_unknown") if verified and k in verified[0].result]
    header = ["verified_rank", "search_rank", "trial_id", f"val_{verifier}_err", *extra, "val_clean_err", "n",
              *[f"search_{o}" for o in objectives], "checkpoint", "seconds"]
    rows = [[i, v.search_rank, v.trial.trial_id, v.verifier_err, *[v.result[k] for k in extra],
             v.result["clean_err"], v.result["n"], *[v.trial.value(o) for o in objectives], v.checkpoint,
             round(v.seconds, 2)] for i, v in enumerate(verified, 1)]
    return header, rows
