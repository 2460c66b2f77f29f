"""A search across two Ray nodes on loopback; the worker node is killed mid-search and no trial is lost.

`ray start --head` (1 CPU, custom resource `head`) and `ray start --address` (2 CPUs) run on this machine,
each with its own temp dir, so the worker node's processes (raylet, log monitor, trial workers) are the
ones whose command line names its temp dir. Both share this filesystem, which stands in for the NFS a
real cluster needs for --storage. Once a trial on the worker node has reported an epoch (with its
checkpoint), every process of that node is SIGKILLed and a fresh worker node joins; the trial is retried
from its checkpoint (FailureConfig(max_failures=3)) and the search ends with every trial finished.
W&B (offline) keeps one run per trial through the retry.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from raycluster import RAY, free_port, kill_node, pids_of_node, start_node

from wandb_offline import find_offline_runs, read_offline_run

REPO = Path(__file__).resolve().parents[1]
TRIALS = ["eps=0.02", "data.subset=1024", "data.val_size=200", "epochs=6"]
NUM_SAMPLES = 4
EPOCHS = 6


@pytest.fixture
def cluster(tmp_path):
    # Short temp dirs: Ray's Unix socket paths under them must stay below ~107 characters.
    temp = Path(tempfile.mkdtemp(prefix="ctmn", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_")) and k != "CERTTUNE_STORAGE"}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO),
               # Notice a dead node within seconds rather than half a minute.
               RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
               RAY_health_check_failure_threshold="3", RAY_health_check_initial_delay_ms="1000")
    head = {}

    def ray(*args, check=True):
        return subprocess.run([*RAY, *args], env=env, capture_output=True, text=True, timeout=120, check=check)

    def start_worker(name: str) -> str:
        node_dir = temp / name
        start_node(env, node_dir, lambda: [f"--address={head['address']}", "--node-ip-address=127.0.0.1",
                                           "--num-cpus=2", "--disable-usage-stats"])
        return str(node_dir)

    def head_flags():
        head["address"] = f"127.0.0.1:{free_port()}"
        return ["--head", "--node-ip-address=127.0.0.1", f"--port={head['address'].split(':')[1]}", "--num-cpus=1",
                '--resources={"head": 1}', "--include-dashboard=false", "--disable-usage-stats"]

    try:
        start_node(env, temp / "head", head_flags)
        yield {"address": head["address"], "env": env, "start_worker": start_worker, "ray": ray}
    finally:
        kill_node(str(temp))  # this cluster's processes only; `ray stop` would stop every Ray on the machine
        shutil.rmtree(temp, ignore_errors=True)


def rows_of(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def final_state(exp: Path) -> dict[str, dict]:
    state = json.loads(sorted(exp.glob("experiment_state-*.json"))[-1].read_text())
    out = {}
    for trial_json, meta_json in state["trial_data"]:
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        out[trial["trial_id"]] = {"status": trial["status"], "num_failures": meta["num_failures"]}
    return out


def test_killing_the_worker_node_mid_search_loses_no_trial(cluster, tmp_path, data_dir):
    worker_dir = cluster["start_worker"]("w1")
    storage, name = tmp_path / "results", "multi"
    exp = storage / name
    log = open(tmp_path / "search.log", "w")
    search = subprocess.Popen(
        [sys.executable, "-m", "tuner.cli", "search", "mnist_tiny", *TRIALS, "--name", name,
         "--num-samples", str(NUM_SAMPLES), "--max-concurrent", "3", "--resources-per-trial", "cpu=1",
         "--scheduler", "none", "--address", cluster["address"], "--storage", str(storage),
         "--data-dir", str(data_dir), "--wandb-project", "certtune-multinode",
         "--checkpoint-every", "0"],  # a checkpoint every epoch, so the killed trial continues from one
        cwd=REPO, env=cluster["env"], stdout=log, stderr=subprocess.STDOUT)
    try:
        # Wait for a trial running on the worker node with at least one epoch (and checkpoint) reported.
        victim = None
        deadline = time.monotonic() + 240
        while victim is None and time.monotonic() < deadline:
            assert search.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
            for d in exp.glob("trial_*"):
                rows = rows_of(d)
                # Ray retitles trial processes ("ray::ImplicitFunc.train"): find them as the raylet's children.
                if rows and rows[-1]["epoch"] < EPOCHS - 1 and rows[-1]["pid"] in pids_of_node(worker_dir):
                    victim = d
                    break
            time.sleep(0.1)
        assert victim is not None, "no trial ran on the worker node"
        epochs_before = rows_of(victim)[-1]["epoch"]
        node = pids_of_node(worker_dir)
        assert rows_of(victim)[-1]["pid"] in node
        for pid in node:  # the whole worker node dies at once, as when a machine is lost
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        cluster["start_worker"]("w2")  # a replacement node joins
        assert search.wait(timeout=300) == 0, (tmp_path / "search.log").read_text()[-3000:]
    finally:
        if search.poll() is None:
            search.kill()
        log.close()

    state = final_state(exp)
    assert len(state) == NUM_SAMPLES and all(s["status"] == "TERMINATED" for s in state.values()), state
    for trial_id in state:
        rows = rows_of(exp / f"trial_{trial_id}")
        assert rows[-1]["epoch"] == rows[-1]["epochs"] == EPOCHS, trial_id  # every trial finished
    victim_id = victim.name.removeprefix("trial_")
    assert state[victim_id]["num_failures"] >= 1  # it did fail with its node ...
    rows = rows_of(victim)
    epochs = [r["epoch"] for r in rows]
    assert epochs.count(1) == 1 and sorted(set(epochs)) == list(range(1, EPOCHS + 1))  # ... and resumed
    assert len({r["pid"] for r in rows}) >= 2
    retried = [r for r in rows if r["pid"] != rows[0]["pid"]]
    # Continued from its checkpoint, not from epoch 1. The storage's copy of the results lags the driver
    # (it arrives with Ray's snapshots), so the bound is what the first attempt reported in the end, not what
    # the storage showed at the kill (epochs_before).
    first_attempt = max(r["epoch"] for r in rows if r["pid"] == rows[0]["pid"])
    assert epochs_before <= first_attempt and retried[0]["epoch"] <= first_attempt + 1
    assert retried[0]["epoch"] > 1
    # W&B (offline, no key): still one run per trial; the retried trial kept its run, each epoch logged once.
    runs = {run.id: run for run in map(read_offline_run, find_offline_runs(exp)) if run.job_type == "trial"}
    assert sorted(runs) == sorted(state)
    assert [h["epoch"] for h in runs[victim_id].history] == list(range(1, EPOCHS + 1))
    assert all(run.group == name for run in runs.values())
