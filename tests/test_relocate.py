"""A relocatable experiment (issue 21 §3): a search killed mid-run, copied to another storage, resumes there and
touches only the copy; moved away (the original gone), it resumes where it is now, without waiting on the old
place. Real CLI subprocesses, a real local Ray instance, real MNIST trials; the original is compared by the
checksum of every file before and after.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_search_resume import checksums, child_env, optuna_study, saved_trials, wait_until_quiet

REPO = Path(__file__).resolve().parents[1]
SAMPLES = 3
SEARCH = ["eps=0.02", "data.subset=512", "data.val_size=100", "epochs=4", "--name", "r",
          "--num-samples", str(SAMPLES), "--max-concurrent", "1", "--scheduler", "none", "--checkpoint-every", "0"]


def certtune(*args, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuner.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def kill_search(tmp: Path, storage: str, folder: Path, data_dir, *extra) -> dict[str, str]:
    """Run a search and kill it (SIGKILL to its process group) once its saved state holds a finished trial and
    a running one with a checkpoint: what a lost driver leaves. `folder` is where `storage` is on this disk.
    Returns the environment its commands run with."""
    env = child_env(tmp)
    args = [sys.executable, "-m", "tuner.cli", "search", REPO / "search_spaces" / "mnist_tiny.yaml", *SEARCH,
            *extra, "--data-dir", data_dir, "--storage", storage]
    with open(tmp / "search.log", "w") as log:
        proc = subprocess.Popen(list(map(str, args)), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            trials = saved_trials(folder / "r").values()
            if (any(t["status"] == "TERMINATED" for t in trials)
                    and any(t["status"] == "RUNNING" and t["checkpoint_epoch"] for t in trials)):
                break
            assert proc.poll() is None, (tmp / "search.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no saved state with a finished and a running trial"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    wait_until_quiet(folder)
    return env


@pytest.fixture(scope="module")
def killed_search(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("killed")
    env = kill_search(tmp, str(tmp / "original"), tmp / "original", data_dir)
    return tmp / "original", env


def report_rows(stdout: str) -> list[tuple[str, str, str]]:
    """(trial_id, status, rank) of each ranked row of `certtune report`."""
    rows = [line.split() for line in stdout.splitlines() if line[:1].isdigit()]
    return [(r[1], r[2], r[0]) for r in rows]


def finished_in(storage: Path, env) -> list[tuple[str, str, str]]:
    """The copy's report and export agree on every trial and its rank; all SAMPLES trials finished, and the
    study holds one COMPLETE Optuna trial per Ray trial."""
    report = certtune("report", "r", "--storage", storage, env=env, timeout=60)
    assert report.returncode == 0, report.stderr[-2000:]
    assert f"{SAMPLES} trials of {SAMPLES} planned; {SAMPLES} finished" in report.stdout, report.stdout
    out = storage.parent / f"export-{storage.name}"
    export = certtune("export", "r", "--storage", storage, "--out", out, env=env, timeout=120)
    assert export.returncode == 0, export.stderr[-2000:]
    with open(out / "trials.csv") as f:
        exported = [(row["trial_id"], row["status"], row["rank"]) for row in csv.DictReader(f)]
    assert sorted(exported, key=lambda r: int(r[2])) == report_rows(report.stdout)
    study = optuna_study(storage / "r")
    told = [t.user_attrs.get("ray_trial_id") for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(told) == sorted(r[0] for r in exported) and len(study.trials) == SAMPLES
    return exported


def test_a_copied_experiment_resumes_on_the_copy_and_the_original_stays_byte_identical(tmp_path, killed_search):
    original, env = killed_search
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, copy, symlinks=True)
    before = checksums(original)
    proc = certtune("resume", "r", "--storage", copy, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert checksums(original) == before  # nothing written into the original, not even a lock or a journal
    finished_in(copy, env)
    record = json.loads((copy / "r" / "certtune_search.json").read_text())
    assert record["location"] == str(copy / "r")  # the copy records where it now runs


def test_a_moved_experiment_resumes_where_it_is_now(tmp_path, killed_search):
    """The killed search itself moved to another storage: its saved state names a place that is gone; the resume
    finishes where the experiment is now. The shared killed search is put back afterwards, byte for byte, from
    a copy, so the tests may run in any order."""
    original, env = killed_search
    kept = tmp_path / "kept"
    shutil.copytree(original, kept, symlinks=True)
    moved = tmp_path / "moved"
    shutil.move(original, moved)
    try:
        start = time.monotonic()
        proc = certtune("resume", "r", "--storage", moved, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert time.monotonic() - start < 300
        assert not original.exists()  # nothing recreated where it was
        finished_in(moved, env)
    finally:
        shutil.rmtree(original, ignore_errors=True)
        shutil.move(kept, original)


BUDGET = 10  # trial-epochs: two 4-epoch trials and 2 epochs of the third


def test_a_copy_between_buckets_resumes_on_the_copy_within_the_same_budget(tmp_path, data_dir):
    """Object storage (file:// URIs, which Ray and pyarrow treat as they treat s3://): the study is kept in
    Ray's searcher snapshot, the budget stopper counts the copy. The resumed copy ends with exactly the budget
    spent, the original byte-identical."""
    original = tmp_path / "bucket-a"
    env = kill_search(tmp_path, f"file://{original}", original, data_dir, "--max-trial-epochs", BUDGET)
    copy = tmp_path / "bucket-b"
    shutil.copytree(original, copy, symlinks=True)
    before = checksums(original)
    proc = certtune("resume", "r", "--storage", f"file://{copy}", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert checksums(original) == before
    report = certtune("report", "r", "--storage", f"file://{copy}", env=env, timeout=60)
    assert report.returncode == 0, report.stderr[-2000:]
    assert f"budget: {BUDGET} of {BUDGET} trial-epochs" in report.stdout, report.stdout
    assert json.loads((copy / "r" / "certtune_search.json").read_text())["location"] == f"file://{copy}/r"
