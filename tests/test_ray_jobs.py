"""`certtune search` submitted to a Ray cluster with `ray job submit`, read back with report/export.

A head (`ray start --head`, with the dashboard that serves the Jobs API) and one worker node run on
loopback, each with 1 CPU, its own short temp dir and free ports. The search is submitted as users do
(`ray job submit --working-dir . -- certtune search ...`, no --address: the job's RAY_ADDRESS names the
cluster); two concurrent trials of 1 CPU then run one on each node. Storage is a directory both nodes see
(this filesystem, standing in for NFS or s3://). Afterwards, as from a laptop: the job's logs (`ray job
logs` and JobSubmissionClient), `certtune report` and `certtune export` on the same storage; then
`certtune resume` as a second job.
Teardown kills exactly this cluster's processes (tests/raycluster.py), never `ray stop`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from raycluster import RAY, free_ports, kill_node, node_port_flags, start_node

REPO = Path(__file__).resolve().parents[1]
NAME = "jobs"
NUM_SAMPLES = 2
EPOCHS = 4
JOB_ID = "certtune-jobs-test"


@pytest.fixture
def cluster(tmp_path):
    # Short temp dir: Ray's Unix socket paths under it must stay below ~107 characters.
    temp = Path(tempfile.mkdtemp(prefix="ctjb", dir="/tmp"))
    # The nodes' environment, which a job's entrypoint inherits: no RAY_*/certtune settings from this shell,
    # no PYTHONPATH (the job's --working-dir provides the code), `certtune` on PATH (installed, as on a node).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "WANDB_", "CERTTUNE_")) and k != "PYTHONPATH"}
    env.update(HOME=str(tmp_path / "home"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    ports = {}

    def ray(*args):
        proc = subprocess.run([*RAY, *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, (args, proc.stdout[-3000:], proc.stderr[-3000:])
        return proc

    def head_flags():
        ports.update(zip(("gcs", "dashboard", "client"), free_ports(3)))
        return ["--head", "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}", "--num-cpus=1",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                f"--ray-client-server-port={ports['client']}", *node_port_flags(), "--disable-usage-stats"]

    try:
        start_node(env, temp / "head", head_flags, cwd=REPO)
        start_node(env, temp / "worker", lambda: [f"--address=127.0.0.1:{ports['gcs']}", "--node-ip-address=127.0.0.1",
                                                  "--num-cpus=1", *node_port_flags(), "--disable-usage-stats"],
                   cwd=REPO)
        yield {"jobs": f"http://127.0.0.1:{ports['dashboard']}", "temp": temp, "env": env, "ray": ray}
    finally:
        kill_node(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def node_of(pid: int, temp: Path) -> str:
    """The node whose logs hold this worker process's output file (worker-<id>-<job>-<pid>.out)."""
    nodes = {d.name for d in temp.iterdir() for _ in d.glob(f"session_*/logs/worker-*-{pid}.out")}
    assert len(nodes) == 1, (pid, nodes)
    return nodes.pop()


def test_search_submitted_as_a_ray_job_runs_on_the_cluster(cluster, tmp_path, data_dir):
    from ray.job_submission import JobStatus, JobSubmissionClient

    storage = tmp_path / "shared"
    submitted = subprocess.run(
        [*RAY, "job", "submit", "--address", cluster["jobs"], "--submission-id", JOB_ID, "--working-dir", ".",
         "--", "certtune", "search", "mnist_tiny", f"epochs={EPOCHS}", "data.subset=512", "data.val_size=200",
         "--name", NAME, "--num-samples", str(NUM_SAMPLES), "--max-concurrent", "2",
         "--resources-per-trial", "cpu=1", "--scheduler", "none", "--storage", str(storage),
         "--data-dir", str(data_dir)],
        cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert submitted.returncode == 0, submitted.stdout[-5000:] + submitted.stderr[-3000:]

    # The job's logs hold certtune's progress: its first line, Tune's status tables, the summary.
    client = JobSubmissionClient(cluster["jobs"])
    assert client.get_job_status(JOB_ID) == JobStatus.SUCCEEDED
    logs = client.get_job_logs(JOB_ID)
    assert f"search {NAME}: experiment in {storage}/{NAME}" in logs
    assert "Trial status:" in logs
    assert f"search {NAME}: {NUM_SAMPLES} trials ({NUM_SAMPLES} finished), {NUM_SAMPLES * EPOCHS} trial-epochs" in logs
    assert "Connecting to existing Ray cluster" in logs and "Started a local Ray instance" not in logs
    cli_logs = cluster["ray"]("job", "logs", JOB_ID, "--address", cluster["jobs"]).stdout
    assert f"search {NAME}: {NUM_SAMPLES} trials ({NUM_SAMPLES} finished)" in cli_logs
    assert f"Job '{JOB_ID}' succeeded" in cluster["ray"]("job", "status", JOB_ID, "--address", cluster["jobs"]).stdout

    # The job joined the cluster (RAY_ADDRESS) instead of starting a Ray of its own: trials ran on both nodes.
    exp = storage / NAME
    record = json.loads((exp / "certtune_search.json").read_text())
    assert record["address"] == "auto"  # `certtune resume` joins a cluster again
    trial_dirs = sorted(exp.glob("trial_*"))
    assert len(trial_dirs) == NUM_SAMPLES
    nodes = set()
    for d in trial_dirs:
        rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line]
        assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1)), d.name
        nodes |= {node_of(r["pid"], cluster["temp"]) for r in rows}
    assert nodes == {"head", "worker"}

    # From "a laptop": report and export read the same storage; no Ray address needed.
    laptop = {**cluster["env"], "PYTHONPATH": str(REPO)}
    report = subprocess.run(["certtune", "report", NAME, "--storage", str(storage)], env=laptop, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert report.stdout.startswith(f"search {NAME}: {NUM_SAMPLES} trials of {NUM_SAMPLES} planned; "
                                    f"{NUM_SAMPLES} finished"), report.stdout
    out = tmp_path / "export"
    export = subprocess.run(["certtune", "export", NAME, "--storage", str(storage), "--out", str(out)],
                            env=laptop, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    assert (out / "best.yaml").is_file() and len(list((out / "top_k").glob("rank*.yaml"))) == NUM_SAMPLES
    table = (out / "trials.csv").read_text().splitlines()
    assert len(table) == NUM_SAMPLES + 1

    # `certtune resume` submitted as a job joins the cluster the same way (nothing is left to run here).
    resumed = subprocess.run(
        [*RAY, "job", "submit", "--address", cluster["jobs"], "--submission-id", f"{JOB_ID}-resume",
         "--working-dir", ".", "--", "certtune", "resume", NAME, "--storage", str(storage)],
        cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-5000:] + resumed.stderr[-3000:]
    logs = client.get_job_logs(f"{JOB_ID}-resume")
    assert "Connecting to existing Ray cluster" in logs and "Started a local Ray instance" not in logs
    assert f"search {NAME}: {NUM_SAMPLES} trials ({NUM_SAMPLES} finished)" in logs
