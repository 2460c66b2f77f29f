"""`certtune search` end to end: a real local Ray instance, real Optuna, W&B offline and a real MNIST subset.

One search (4 tiny trials, 2 at a time, warmup-aware ASHA, W&B on without an API key) runs once for the
module; the tests read back what it left: certtune_search.json, Ray's per-trial results and checkpoints,
the Optuna study saved with the experiment, the W&B offline runs; then the best trial is exported and
retrained with `certtune train`. Bad input is checked through the CLI: one line on stderr, exit code 2,
nothing started.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# A few seconds per trial on one CPU: ε small enough that IBP verifies part of the validation set.
TINY = ["eps=0.02", "data.subset=1024", "data.val_size=200", "epochs=4"]
NAME = "e2e"
NUM_SAMPLES = 4


def child_env(tmp: Path, **extra) -> dict[str, str]:
    """The caller's environment without W&B/Ray settings; HOME (so ~/.netrc) and W&B dirs inside tmp."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "RAY_")) and k not in ("NETRC", "CERTTUNE_STORAGE")}
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), WANDB_CONFIG_DIR=str(tmp / "wandb-config"), WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
               WANDB_DATA_DIR=str(tmp / "wandb-data"), WANDB_SILENT="true", PYTHONPATH=str(REPO))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(*args, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuner.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def result_rows(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line]


def trial_dirs(exp: Path) -> list[Path]:
    return sorted(p for p in exp.glob("trial_*") if p.is_dir())


@pytest.fixture(scope="module")
def searched(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("search")
    env = child_env(tmp)
    assert not (Path(env["HOME"]) / ".netrc").exists()  # no W&B key anywhere: offline is forced
    storage = tmp / "results"
    # W&B is turned on by WANDB_PROJECT alone, as W&B's own tools do; best.pt of finished trials as artifacts.
    proc = cli("search", "mnist_tiny", *TINY, "--name", NAME, "--num-samples", NUM_SAMPLES, "--max-concurrent", 2,
               "--resources-per-trial", "cpu=1", "--scheduler", "asha", "--seed", 3, "--storage", storage,
               "--data-dir", data_dir, "--wandb-artifacts", env={**env, "WANDB_PROJECT": "certtune-test"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"tmp": tmp, "env": env, "storage": storage, "exp": storage / NAME, "proc": proc, "data_dir": data_dir}


def test_search_writes_its_record_and_reports_every_epoch_with_a_checkpoint(searched):
    exp = searched["exp"]
    record = json.loads((exp / "certtune_search.json").read_text())
    assert record["name"] == NAME and record["objective"] == ["ibp_err"] and record["modes"] == ["min"]
    assert record["overrides"] == {"eps": 0.02, "data.subset": 1024, "data.val_size": 200, "epochs": 4}
    assert record["space"]["base"]["epochs"] == 6  # the file as written; overrides are kept apart
    assert record["resources_per_trial"] == {"cpu": 1, "gpu": 0} and record["wandb_project"] == "certtune-test"
    assert Path(record["data_dir"]).is_absolute() and record["address"] is None and record["seed"] == 3
    dirs = trial_dirs(exp)
    assert len(dirs) == NUM_SAMPLES
    for d in dirs:
        rows = result_rows(d)
        assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))  # every epoch once, none rerun
        assert all(r["epochs"] == 4 for r in rows) and rows[-1]["training_iteration"] == len(rows)
        # A checkpoint at the last epoch, and before it at most every 30 s (--checkpoint-every; these trials
        # take seconds, so usually none before); Ray keeps the two newest. The newest of a finished trial is its
        # last epoch's: the trainer's own resume files and best.pt.
        checkpoints = sorted(d.glob("checkpoint_*"))
        assert len(checkpoints) <= 2
        if rows[-1]["epoch"] < rows[-1]["epochs"]:
            continue  # stopped early: whatever it saved before
        ckpt = checkpoints[-1]
        assert ckpt.name == rows[-1]["checkpoint_dir_name"]
        lines = (ckpt / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == len(rows) and json.loads(lines[-1])["ibp_err"] == rows[-1]["ibp_err"]
        assert (ckpt / "last.pt").stat().st_size > 0 and (ckpt / "best.pt").stat().st_size > 0
    summary = searched["proc"].stdout
    assert f"search {NAME}: {NUM_SAMPLES} trials" in summary and "best finished trial: ibp_err=" in summary
    # ray[default] is installed: the local instance serves Ray's dashboard, and the search says where.
    assert "certtune: Ray dashboard at http://127.0.0.1:" in summary, summary[-2000:]


def test_optuna_study_saved_with_the_experiment_matches_the_trials(searched):
    import optuna
    from optuna.trial import TrialState

    from tuner.results.experiment import load_study
    from tuner.space.search_space import load_space

    study = load_study(searched["exp"])
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    trials = study.trials
    assert len(trials) == NUM_SAMPLES
    # The space's defaults point is evaluated first.
    assert trials[0].params == load_space("mnist_tiny").default_point()
    by_ray = {d.name.removeprefix("trial_"): result_rows(d) for d in trial_dirs(searched["exp"])}
    states = []
    for t in trials:
        rows = by_ray[t.user_attrs["ray_trial_id"]]
        params = json.loads((searched["exp"] / f"trial_{t.user_attrs['ray_trial_id']}" / "params.json").read_text())
        assert params == t.params  # the Ray config is exactly the sampled params
        last = rows[-1]
        marker = searched["exp"] / f"trial_{t.user_attrs['ray_trial_id']}" / "certtune_stop_reason.json"
        if last["epoch"] == last["epochs"]:
            assert t.state == TrialState.COMPLETE and t.value == last["ibp_err"] and not marker.exists()
        else:  # stopped by the scheduler at a rung: PRUNED, never COMPLETE with a short-budget value
            assert t.state == TrialState.PRUNED
            assert json.loads(marker.read_text())["by"] == "rung"  # the rule, for report and trials.csv
        at_target = [r["ibp_err"] for r in rows if r["at_target"]]
        assert list(t.intermediate_values.values()) == at_target
        states.append(t.state)
    assert TrialState.COMPLETE in states and TrialState.RUNNING not in states


def best_complete_trial(exp: Path):
    from optuna.trial import TrialState

    from tuner.results.experiment import load_study

    complete = [t for t in load_study(exp).trials if t.state == TrialState.COMPLETE]
    return min(complete, key=lambda t: (t.value, t.number))


def trained_config(trial_dir: Path):
    """The TrainConfig a trial saved in its checkpoint (None: stopped early, before its first checkpoint)."""
    from trainers.config import TrainConfig

    found = sorted(trial_dir.glob("checkpoint_*/config.yaml"))
    return TrainConfig.from_yaml(found[-1]) if found else None


def test_trial_config_is_the_space_point_with_the_overrides(searched):
    """One code path: the config a trial trained with is space.to_train_config(its params) + overrides."""
    from trainers.config import TrainConfig
    from tuner.space.record import SearchRecord

    record = SearchRecord.from_json((searched["exp"] / "certtune_search.json").read_text())
    checked = 0
    for d in trial_dirs(searched["exp"]):
        params = json.loads((d / "params.json").read_text())
        trained = trained_config(d)
        if trained is None:
            continue  # stopped before its first checkpoint
        assert trained == record.build_space().to_train_config(params)
        assert trained.epochs == 4 and trained.eps == 0.02 and trained.data.subset == 1024
        checked += 1
    assert checked >= 1


def test_export_then_certtune_train_reproduces_the_best_trial(searched, tmp_path):
    exp, env = searched["exp"], searched["env"]
    best = best_complete_trial(exp)
    out = tmp_path / "export"
    proc = cli("export", NAME, "--storage", searched["storage"], "--out", out, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best_yaml = out / "best.yaml"
    run = tmp_path / "rerun"
    # The trial trained on one CPU thread (cpu=1); the rerun does too, on CPU with the same seed.
    proc = cli("train", best_yaml, "--data-dir", searched["data_dir"], "--out", run, "--no-progress",
               env={**env, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["epoch"] == 4
    assert abs(final["ibp_err"] - best.value) <= 1e-6
    assert 0 < best.value < 1  # a value that can tell a wrong config from the right one


def test_export_verify_ranks_the_top_trials_by_a_stronger_verifier_on_validation(searched, tmp_path, monkeypatch):
    """`export --verify alpha-crown`: each finished trial's best.pt certified on the first 60 validation images,
    best.yaml and top_k/ in that order; the figures are verify's own on the same checkpoint and split, α-CROWN
    is never looser than IBP there, and the test split is never touched."""
    import csv

    import trainers.verify as verify_module
    from tuner.results.export import export_search
    from tuner.results.experiment import load_search
    from trainers.verify import verifier_options, verify_checkpoint

    real_load_splits = verify_module.load_splits

    class ValOnly:  # the splits with the test view replaced by an alarm
        def __init__(self, splits):
            self._splits = splits

        def __getattr__(self, name):
            if name == "test":
                raise AssertionError("export --verify read the test split")
            return getattr(self._splits, name)

    monkeypatch.setattr(verify_module, "load_splits", lambda *a, **k: ValOnly(real_load_splits(*a, **k)))
    options = verifier_options(alpha_iterations=5)
    out = tmp_path / "verified"
    summary = export_search(NAME, str(searched["storage"]), out, top_k=5, verify="alpha-crown", verify_n=60,
                            verifier_options=options, data_dir=str(searched["data_dir"]))
    rows = list(csv.DictReader((out / "verified.csv").open()))
    finished = len([t for t in load_study_trials(searched["exp"]) if t.state.name == "COMPLETE"])
    assert len(rows) == min(5, finished) >= 1
    errs = [float(r["val_alpha-crown_err"]) for r in rows]
    assert errs == sorted(errs) and all(int(r["n"]) == 60 for r in rows)
    assert [r["trial_id"] for r in rows] == [v["trial_id"] for v in summary["verified"]["ranking"]]
    assert f"trial {rows[0]['trial_id']}:" in (out / "best.yaml").read_text()
    assert "alpha-crown-verified error" in (out / "top_k" / "rank1.yaml").read_text()
    monkeypatch.setattr(verify_module, "load_splits", real_load_splits)
    for row in rows:
        assert f"trial_{row['trial_id']}/checkpoint_" in row["checkpoint"] and row["checkpoint"].endswith("best.pt")
        again = verify_checkpoint(row["checkpoint"], searched["data_dir"], "val", None, ("ibp", "alpha-crown"),
                                  verifier_options=options, limit=60)
        assert again["alpha_crown_err"] == float(row["val_alpha-crown_err"])
        assert again["alpha_crown_err"] <= again["ibp_err"]
    # IBP on the whole validation split gives back exactly what each trial measured for its best epoch: the
    # checkpoint is best.pt and the split is the trial's own validation split.
    by_ibp = export_search(NAME, str(searched["storage"]), tmp_path / "ibp", top_k=5, verify="ibp",
                           data_dir=str(searched["data_dir"]))
    reported = {t.trial_id: t.value("best_ibp_err") for t in load_search(NAME, str(searched["storage"])).trials}
    n = by_ibp["verified"]["n"]
    for v in by_ibp["verified"]["ranking"]:  # one example may flip: another thread count sums differently
        assert abs(v["val_ibp_err"] - reported[v["trial_id"]]) <= 1 / n + 1e-9, (v, reported[v["trial_id"]])
    # Bad --verify input is one line and exit 2, before any checkpoint is read.
    for bad in (["--verify", "pgd"], ["--verify", "alpha-crown", "--verify-n", "0"],
                ["--verify", "bab", "--bab-time-limit", "-1"]):
        proc = cli("export", NAME, "--storage", searched["storage"], "--out", tmp_path / "bad", *bad,
                   env=searched["env"], timeout=120)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "bad").exists()


def load_study_trials(exp: Path):
    from tuner.results.experiment import load_study

    return load_study(exp).trials


def trial_and_search_runs(exp: Path):
    from wandb_offline import find_offline_runs, read_offline_run

    runs = [read_offline_run(d) for d in find_offline_runs(exp)]
    return [r for r in runs if r.job_type == "trial"], [r for r in runs if r.job_type == "search"]


def test_wandb_offline_runs_one_per_trial_grouped_with_config_and_epoch_metrics(searched):
    import base64
    import hashlib

    from trainers.config import TrainConfig
    from tuner.results.experiment import trial_status

    from tuner.space.record import SearchRecord

    exp = searched["exp"]
    record = SearchRecord.from_json((exp / "certtune_search.json").read_text())
    runs, _ = trial_and_search_runs(exp)
    trials = {d.name.removeprefix("trial_"): d for d in trial_dirs(exp)}
    assert sorted(r.id for r in runs) == sorted(trials)  # one run per trial, the run id is the trial id
    finished = 0
    for run in runs:
        d = trials[run.id]
        assert run.group == NAME and run.project == "certtune-test" and run.job_type == "trial"
        assert {"mnist", "fast", "scheduler:asha", "sampler:tpe"} <= set(run.tags)
        assert run.resume  # resume="allow": a resumed trial's run continues on `wandb sync`
        assert run.metrics == {"epoch": "", "*": "epoch"}  # epoch is every metric's x-axis
        assert run.path.parent.parent == d / "wandb"  # offline files live with the trial
        params = json.loads((d / "params.json").read_text())
        assert run.config["searched"] == params
        assert run.config["search"]["name"] == NAME and run.config["search"]["objective"] == ["ibp_err"]
        # The full resolved training config, derived values included: what the trial trained with.
        # (A trial stopped before its first checkpoint: the config its params resolve to.)
        trained = trained_config(d) or record.build_space().to_train_config(params)
        trained = json.loads(json.dumps(trained.to_dict()))
        assert {k: run.config[k] for k in trained} == trained
        assert run.config["lr_milestones"] == trained["lr_milestones"] and "lr_milestones" not in params
        rows = result_rows(d)
        logged = [(h["_step"], h["epoch"], h["ibp_err"], h["clean_err"]) for h in run.history]
        assert logged == [(r["training_iteration"], r["epoch"], r["ibp_err"], r["clean_err"]) for r in rows]
        assert run.exit_code == 0
        # How it ended, as `certtune report` says, and its final objective.
        status = trial_status("TERMINATED", rows[-1], ["ibp_err"])[0]
        assert run.summary["status"] == status and run.summary["reason"] == ""
        assert run.summary["final/ibp_err"] == rows[-1]["ibp_err"] and run.summary["epochs_trained"] == rows[-1]["epoch"]
        if status == "finished":  # --wandb-artifacts: its best.pt, the file the last checkpoint holds
            finished += 1
            (artifact,) = run.artifacts
            ckpt = sorted(d.glob("checkpoint_*"))[-1]
            digest = base64.b64encode(hashlib.md5((ckpt / "best.pt").read_bytes()).digest()).decode()
            assert artifact["type"] == "model" and artifact["files"] == {"best.pt": digest}
            assert artifact["name"] == f"{NAME}-{run.id}" and "best" in artifact["aliases"]
            assert artifact["metadata"]["ibp_err"] == rows[-1]["ibp_err"]
        else:  # stopped early: no final model
            assert run.artifacts == [] and status == "stopped"
    assert finished >= 1


def test_wandb_search_run_holds_the_report_table(searched):
    from tuner.results.report import ordered_trials, report_search, status_cell, trial_rows
    from tuner.results.experiment import load_search
    from tuner.tracking.search_run import table_rows

    exp = searched["exp"]
    _, (run,) = trial_and_search_runs(exp)
    assert run.group == NAME and run.project == "certtune-test" and run.resume and run.exit_code == 0
    assert run.path.parent.parent == exp / "wandb"
    (table_file,) = run.path.parent.glob("files/media/table/trials_*.table.json")
    columns, rows = table_rows(table_file)
    search = load_search(NAME, str(searched["storage"]))
    assert columns[:3] == ["rank", "trial_id", "status"] and columns[-1] == "reason" and "ibp_err" in columns
    assert [(r[1], r[2]) for r in rows] == [(t.trial_id, status_cell(search, t)) for t in ordered_trials(search)]
    assert run.summary["best/trial_id"] == search.best().trial_id == rows[0][1]
    assert run.summary["trials/finished"] == search.counts()["finished"]
    # The table `certtune report` prints (report.trial_rows), every trial, cell for cell, plus the reasons.
    header, expected = trial_rows(search, ordered_trials(search))
    assert columns == header + ["reason"] and [r[:-1] for r in rows] == expected
    assert any("trial_id" in line for line in report_search(NAME, str(searched["storage"])).splitlines())


def test_no_trial_diverged_or_failed_and_no_api_key_is_needed(searched):
    from tuner.results.experiment import trial_status

    for d in trial_dirs(searched["exp"]):
        rows = result_rows(d)
        ray_status = "ERROR" if (d / "error.txt").exists() else "TERMINATED"
        assert trial_status(ray_status, rows[-1], ["ibp_err"])[0] in ("finished", "stopped")
        assert len({r["pid"] for r in rows}) == 1  # never retried


# ---- divergence ------------------------------------------------------------------------------------
# lr 1e30: the first Adam steps make the weights overflow float32, so epoch 1 ends with non-finite metrics.
DIVERGING_SPACE = {
    "base": {"dataset": "mnist", "model": "cnn_small", "eps": 0.02, "epochs": 2, "lr": 1.0e30, "grad_clip": 0,
             "lr_milestones": [2], "schedule": {"start": 1, "length": 1},
             "data": {"subset": 256, "val_size": 100}, "eval": {"metrics": ["clean", "ibp"], "batch_size": 500}},
    "params": {"init": {"type": "categorical", "choices": ["ibp"]}},
}


def test_a_diverged_trial_fails_with_its_reason_and_is_not_retried(tmp_path, data_dir):
    from optuna.trial import TrialState

    from tuner.results.experiment import load_study

    space = tmp_path / "diverging.yaml"
    space.write_text(yaml.safe_dump(DIVERGING_SPACE))
    storage = tmp_path / "results"
    proc = cli("search", space, "--name", "nan", "--num-samples", 1, "--scheduler", "none", "--storage", storage,
               "--data-dir", data_dir, "--wandb-project", "certtune-nan", env=child_env(tmp_path), timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]  # every trial failed: non-zero, with the reasons
    assert "every trial failed (1); reasons:\n  1 x diverged: non-finite" in proc.stdout, proc.stdout[-2000:]
    (d,) = trial_dirs(storage / "nan")
    rows = result_rows(d)
    assert len(rows) == 1 and "non-finite" in rows[0]["diverged"] and math.isnan(rows[0]["ibp_err"])
    assert rows[0]["epoch"] == 1 and not (d / "error.txt").exists()  # ended, not errored: no retries
    (trial,) = load_study(storage / "nan").trials
    assert trial.state == TrialState.FAIL and "diverged: non-finite" in trial.user_attrs["fail_reason"]
    assert "1 failed" in proc.stdout
    # The reason reaches the driver's log as the trial ends, and the trial's W&B run says how it ended.
    trial_id = d.name.removeprefix("trial_")
    assert f"certtune: trial {trial_id} failed: diverged: non-finite" in proc.stderr, proc.stderr[-3000:]
    (run,), (search_run,) = trial_and_search_runs(storage / "nan")
    assert run.summary["status"] == "failed" and run.summary["reason"].startswith("diverged: non-finite")
    assert run.exit_code == 1  # W&B lists the run as failed
    final = run.summary["final/ibp_err"]  # NaN: W&B's summary stores a non-finite value as null
    assert (final is None or math.isnan(final)) and run.summary["epochs_trained"] == 1
    assert search_run.summary["trials/failed"] == 1 and "best/trial_id" not in search_run.summary


# ---- W&B settings without a search ------------------------------------------------------------------
def test_wandb_is_offline_without_a_key_and_the_key_never_reaches_the_experiment(tmp_path, monkeypatch):
    from tuner.tracking import trial_runs as tracking
    from tuner.space.record import SearchRecord

    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.setenv(var, "")  # records the original value, so the test leaves the environment as it was
        monkeypatch.delenv(var)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    record = SearchRecord(name="g", space_path="s.yaml", space={}, objective=["ibp_err"], modes=["min"],
                          scheduler="asha", num_samples=1, max_concurrent=1, resources_per_trial={"cpu": 1},
                          data_dir="/d", wandb_project=None)
    assert tracking.wandb_callback(record) is None  # off unless a project is given
    record.wandb_project = "p"
    assert tracking.wandb_mode() == "offline"
    cb = tracking.wandb_callback(record)
    assert cb.kwargs == {"mode": "offline"} and cb.group == "g" and os.environ["WANDB_MODE"] == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password netrckey123\n")
    assert tracking.api_key_configured() and tracking.wandb_mode() is None
    monkeypatch.delenv("WANDB_MODE")
    key = "certtunefakekey" + "y" * 25
    monkeypatch.setenv("WANDB_API_KEY", key)
    cb = tracking.wandb_callback(record)
    assert "mode" not in cb.kwargs
    cb.setup()  # what Ray runs in the driver before the first trial
    # The callback is pickled into the experiment (tuner.pkl): the key must not be in it.
    assert key.encode() not in pickle.dumps(cb) and b"netrckey123" not in pickle.dumps(cb)


# ---- bad input: one line, exit 2, nothing started ---------------------------------------------------
def bad_space(tmp: Path, change: dict) -> Path:
    raw = yaml.safe_load((REPO / "search_spaces" / "mnist_tiny.yaml").read_text())
    raw.pop("defaults")
    for key, value in change.items():
        raw["params"][key] = value
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The cases run the real CLI in a subprocess; the other checks call the same main() in-process.
BAD_CLI = {
    "unknown parameter": ({"no.such_knob": {"type": "uniform", "low": 0, "high": 1}}, [], "no.such_knob"),
    "low above high": ({"lr": {"type": "loguniform", "low": 1.0e-2, "high": 1.0e-3}}, [], "lr"),
    "unknown distribution": ({"lr": {"type": "gaussian", "low": 0.1, "high": 1}}, [], "gaussian"),
    "condition on a missing parameter": (
        {"reg.lambda0": {"type": "uniform", "low": 0.1, "high": 1, "when": {"reg.nothing": True}}}, [], "reg.nothing"),
    "unreachable address": ({}, ["--address", "127.0.0.1:{port}"], "cannot reach a Ray cluster"),
    "bad resources": ({}, ["--resources-per-trial", "cpu=2,tpu=1"], "--resources-per-trial"),
    "bad objective": ({}, ["--objective", "ibp_err,accuracy"], "unknown metric 'accuracy'"),
}
BAD_MAIN = {
    "fractional gpu above one": (["--resources-per-trial", "cpu=1,gpu=1.5"], "whole number"),
    "more cpus than the machine": (["--resources-per-trial", "cpu=512"], "this machine has"),
    "objective not measured": (["--objective", "ibp_err,pgd_err"], "needs 'pgd' in eval.metrics"),
    "bad scheduler": (["--scheduler", "hyperband"], "--scheduler"),
    "bad sample count": (["--num-samples", "0"], "--num-samples"),
    "bad name": (["--name", "a/b"], "--name"),
    "override of a searched param": (["lr=0.1"], "'lr' is searched"),
    "override of an unknown key": (["data.nope=1"], "data.nope"),
    "artifacts without W&B": (["--wandb-artifacts"], "--wandb-artifacts: W&B is off"),
}


def test_bad_input_is_one_line_and_exit_2_before_any_trial(tmp_path, data_dir):
    # All cases at once (each is a fresh interpreter importing torch): a few seconds instead of half a minute.
    procs = {}
    for i, (case, (change, extra, expected)) in enumerate(BAD_CLI.items()):
        tmp = tmp_path / str(i)
        tmp.mkdir()
        space = bad_space(tmp, change) if change else "mnist_tiny"
        extra = [e.format(port=closed_port()) for e in extra]
        args = ["search", space, *TINY, "--name", "bad", "--num-samples", 1, "--storage", tmp / "results",
                "--data-dir", data_dir, *extra]
        procs[case] = (tmp, expected, subprocess.Popen(
            [sys.executable, "-m", "tuner.cli", *map(str, args)], cwd=REPO, env=child_env(tmp),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for case, (tmp, expected, proc) in procs.items():
        _, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (case, err[-3000:])
        assert lines[0].startswith("certtune: error:") and expected in lines[0], (case, lines[0])
        assert not (tmp / "results").exists(), case  # checked before anything was written


@pytest.mark.parametrize("case", list(BAD_MAIN))
def test_more_bad_input_is_one_line_and_exit_2(case, tmp_path, data_dir, capsys, monkeypatch):
    from tuner.cli import main

    monkeypatch.delenv("WANDB_PROJECT", raising=False)

    extra, expected = BAD_MAIN[case]
    storage = tmp_path / "results"
    code = main(["search", "mnist_tiny", *TINY, "--num-samples", "1", "--storage", str(storage),
                 "--data-dir", str(data_dir), *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines
    assert not storage.exists()


def test_unwritable_storage_is_one_line_and_exit_2(tmp_path, data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = cli("search", "mnist_tiny", *TINY, "--name", "bad", "--storage", blocker / "results",
               "--data-dir", data_dir, env=child_env(tmp_path), timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("certtune: error: --storage") and "cannot write" in lines[0]


def test_a_second_search_with_the_same_name_is_refused(searched):
    proc = cli("search", "mnist_tiny", *TINY, "--name", NAME, "--storage", searched["storage"],
               "--data-dir", searched["data_dir"], env=searched["env"], timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "certtune resume e2e" in lines[0]


def test_resume_of_an_unknown_search_is_one_line_and_exit_2(tmp_path):
    proc = cli("resume", "nosuch", "--storage", tmp_path, env=child_env(tmp_path), timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no search named 'nosuch'" in lines[0]


def test_resource_and_objective_parsing():
    from tuner.run.driver import SearchError, parse_resources

    assert parse_resources("cpu=2,gpu=0.5") == {"cpu": 2, "gpu": 0.5}
    assert parse_resources("gpu=1") == {"cpu": 1, "gpu": 1}
    for bad in ("cpu=0", "cpu=-1", "gpu=x", "cpu", "mem=1", "gpu=nan"):
        with pytest.raises(SearchError, match="--resources-per-trial"):
            parse_resources(bad)


def test_max_epochs_at_target_is_the_longest_possible_time_at_target():
    from tuner.space.record import space_with_overrides
    from tuner.run.driver import max_epochs_at_target
    from tuner.space.search_space import load_space

    raw = yaml.safe_load((REPO / "search_spaces" / "mnist_tiny.yaml").read_text())
    space = load_space("mnist_tiny")
    # 6 epochs, shortest ramp: start 1, length 1 → at target from epoch 2, so 5 epochs at target.
    assert max_epochs_at_target(space) == 5
    assert max_epochs_at_target(space_with_overrides(raw, {"epochs": 9}, space.source)) == 8
    raw.pop("defaults")
    raw["params"]["epochs"] = {"type": "int", "low": 4, "high": 12}
    raw["params"]["schedule.length"]["high"] = "epochs - schedule.start - 1"
    assert max_epochs_at_target(space_with_overrides(raw, {}, space.source)) == 11
