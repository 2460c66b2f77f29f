"""Hostile and careless input through the real CLI (issue 9): every case is a subprocess of `certtune` that
must exit 2 with one line on stderr naming the problem, print no traceback, change no file, and run no code
hidden in a file it was handed. docs/reliability.md lists the promises these tests hold."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trainers.config import TrainConfig, parse_overrides
from trainers.train import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = {"dataset": "mnist", "model": "cnn_small", "method": "fast", "eps": 0.1, "epochs": 2, "batch_size": 64,
        "lr": 1e-3, "lr_milestones": [2], "schedule": {"start": 1, "length": 1},
        "data": {"subset": 128, "val_size": 64, "test_subset": 64},
        "eval": {"metrics": ["clean", "ibp"], "batch_size": 64, "pgd_steps": 2}}


class RunsShell:
    """A pickle that runs a shell command when unpickled: what a hostile .pt on shared storage would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def certtune(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTTUNE_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "tuner.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env=env)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with a hash of its bytes: 'no file changed' is snapshot equality. The run's
    lock file (empty or a pid, created by whoever opens the run) is not part of the run."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_refused(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("certtune: error: ") and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert len(lines[0]) < 600, lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A real one-epoch run (config, metrics, last.pt, best.pt) to copy and tamper with."""
    out = tmp_path_factory.mktemp("trained") / "run"
    Trainer(TrainConfig.from_dict(TINY), data_dir, out).fit()
    return out


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


# ---- 1. no code runs when a file is loaded ----------------------------------------------------------
def test_verify_refuses_a_checkpoint_that_would_run_code(tmp_path, trained, data_dir):
    marker = tmp_path / "pwned"
    state = torch.load(trained / "best.pt", weights_only=True)
    state["config"]["note"] = RunsShell(marker)
    torch.save(state, tmp_path / "evil.pt")
    before = snapshot(tmp_path)
    assert_refused(certtune("verify", tmp_path / "evil.pt", "--data-dir", data_dir), "evil.pt", "refused",
                   "system", "could run code")
    assert not marker.exists() and snapshot(tmp_path) == before


def test_train_refuses_to_resume_from_a_checkpoint_that_would_run_code(tmp_path, trained, data_dir):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        (run / name).write_bytes((trained / name).read_bytes())
    marker = tmp_path / "pwned"
    torch.save({"config": TrainConfig.from_dict(TINY).resolve().to_dict(), "model": RunsShell(marker)},
               run / "last.pt")
    before = snapshot(run)
    assert_refused(certtune("train", trained / "config.yaml", "--data-dir", data_dir, "--out", run),
                   "last.pt", "refused", "--restart")
    assert not marker.exists() and snapshot(run) == before


def test_certtune_checkpoints_load_weights_only(trained):
    state = torch.load(trained / "last.pt", weights_only=True)  # the strict loader accepts our own files
    assert {"config", "model", "optimizer", "lr_scheduler", "rng_cpu"} <= set(state)


# ---- 2. valid input accepted --------------------------------------------------------------------------
def test_readme_override_lr_1e_3_is_a_float(tmp_path, data_dir):
    assert parse_overrides(["lr=1e-3", "reg.lambda0=5E-1"]) == {"lr": 0.001, "reg.lambda0": 0.5}
    # README's command, sized down with more overrides of the same kind.
    proc = certtune("train", REPO / "configs/mnist_small.yaml", "--data-dir", data_dir, "--out", tmp_path / "small",
                    "schedule.length=2", "lr=1e-3", "epochs=2", "lr_milestones=[2]", "data.subset=128",
                    "data.val_size=64", "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TrainConfig.from_yaml(tmp_path / "small" / "config.yaml").lr == 0.001


# ---- 3. one line, exit 2, never a traceback ---------------------------------------------------------------
@pytest.mark.parametrize("text, fragment", [
    ("dataset: mnist\nmodel: [cnn_small\n", "not valid YAML"),
    ("dataset: mnist\ndataset: cifar10\n", "duplicate key 'dataset'"),
    ("a: &x [1, 2]\nlr_milestones: *x\n", "aliases"),
    ("- just\n- a list\n", "expected a mapping"),
    ("lr: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_malformed_config_files(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert_refused(certtune("train", path, "--out", tmp_path / "run"), fragment)
    assert not (tmp_path / "run").exists()


def test_non_utf8_config_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: cnn_small  # café\n".encode("latin-1"))
    assert_refused(certtune("train", path, "--out", tmp_path / "run"), "not a UTF-8 text file")


@pytest.mark.parametrize("override, fragment", [
    ("lr=.inf", "lr: must be a finite number"),
    ("lr=.nan", "lr: must be a finite number"),
    ("reg.lambda0=.inf", "reg.lambda0: must be a finite number"),
    ("train_eps_mul=.inf", "train_eps_mul: must be a finite number"),
    ("epochs=1e22", "epochs: expected an integer"),
    ("epochs=10000000000000000000000", "epochs"),
    ("epochs=1000000", "epochs: at most"),
    ("batch_size=100000000", "batch_size: at most"),
    ("seed=-1", "seed"),
    ("lr_milestones=[1, [2]]", "lr_milestones"),
    ("lr=[", "not valid YAML"),
])
def test_infinite_or_absurd_values_are_refused_before_compute(tmp_path, config_file, override, fragment):
    assert_refused(certtune("train", config_file, override, "--out", tmp_path / "run"), fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device, fragment", [("foo", "unknown device 'foo'"), ("cuda:x", "unknown device")]
                         + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device")]))
def test_bad_device(tmp_path, config_file, data_dir, device, fragment):
    assert_refused(certtune("train", config_file, "--data-dir", data_dir, "--out", tmp_path / "run",
                            "--device", device), "--device", fragment)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_out_pointing_at_a_file(tmp_path, config_file, data_dir):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    assert_refused(certtune("train", config_file, "--data-dir", data_dir, "--out", target), "not a directory")
    assert target.read_text() == "keep me\n"


def test_npz_holding_objects_is_refused(tmp_path, config_file, data_dir):
    marker = tmp_path / "pwned"
    images = np.empty(4, dtype=object)
    images[:] = [RunsShell(marker)] * 4
    np.savez(tmp_path / "evil.npz", train_data=images, train_targets=np.zeros(4, np.int64),
             test_data=images, test_targets=np.zeros(4, np.int64))
    assert_refused(certtune("train", config_file, f"data.npz={tmp_path / 'evil.npz'}", "--data-dir", data_dir,
                            "--out", tmp_path / "run"), "evil.npz", "train_data")
    assert not marker.exists()


def _bad_checkpoints(tmp_path: Path, trained: Path) -> dict[str, tuple[Path, str]]:
    good = (trained / "best.pt").read_bytes()
    cases = {"empty": (b"", "is empty"),
             "truncated": (good[: len(good) // 2], "truncated or corrupt"),
             "random": (np.random.default_rng(0).bytes(4096), "truncated or corrupt"),
             "text": (b"not a checkpoint\n", "truncated or corrupt")}
    out = {}
    for name, (data, fragment) in cases.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
        out[name] = (tmp_path / f"{name}.pt", fragment)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    out["foreign"] = (tmp_path / "foreign.pt", "not a certtune checkpoint (missing config, model)")
    state = torch.load(trained / "best.pt", weights_only=True)
    state["config"]["model"] = "cnn7"  # the weights are cnn_small's
    torch.save(state, tmp_path / "other_arch.pt")
    out["other_arch"] = (tmp_path / "other_arch.pt", "weights do not fit this model")
    state = torch.load(trained / "best.pt", weights_only=True)
    state["config"]["lr"] = "fast"
    torch.save(state, tmp_path / "bad_config.pt")
    out["bad_config"] = (tmp_path / "bad_config.pt", "its config is not valid")
    return out


def test_verify_bad_checkpoints(tmp_path, trained, data_dir):
    for name, (path, fragment) in _bad_checkpoints(tmp_path, trained).items():
        assert_refused(certtune("verify", path, "--data-dir", data_dir), path.name, fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--methods", ","], "--methods: name at least one"),
    (["--methods", "ibp,bogus"], "--methods: unknown 'bogus'"),
    (["--eps", "2"], "--eps: must be in (0, 1]"),
    (["--eps", "-0.1"], "--eps: must be in (0, 1]"),
    (["--eps", "nan"], "--eps: must be in (0, 1]"),
    (["--eps", "abc"], "--eps"),
    (["--split", "train"], "--split"),
])
def test_verify_bad_flags(tmp_path, trained, data_dir, args, fragment):
    assert_refused(certtune("verify", trained / "best.pt", "--data-dir", data_dir, *args), fragment)


# ---- 4. a failed start leaves the run as it was ------------------------------------------------------------
def copy_run(trained: Path, to: Path) -> Path:
    to.mkdir()
    for p in trained.iterdir():
        if p.is_file():
            (to / p.name).write_bytes(p.read_bytes())
    return to


def test_a_different_config_is_refused_and_nothing_changes(tmp_path, trained, data_dir):
    run = copy_run(trained, tmp_path / "run")
    before = snapshot(run)
    assert_refused(certtune("train", trained / "config.yaml", "lr=2e-3", "--data-dir", data_dir, "--out", run),
                   "different config", "lr: 0.001 there, 0.002 now", "--restart")
    assert snapshot(run) == before  # config.yaml was not rewritten before the check


def test_truncated_last_checkpoint_says_how_to_go_on(tmp_path, trained, data_dir):
    run = copy_run(trained, tmp_path / "run")
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])  # as a disk that filled would leave it
    before = snapshot(run)
    assert_refused(certtune("train", trained / "config.yaml", "--data-dir", data_dir, "--out", run),
                   "last.pt", "truncated or corrupt", "--restart")
    assert snapshot(run) == before
    # The documented way on: --restart sets the old files aside (nothing lost) and trains from scratch.
    proc = certtune("train", trained / "config.yaml", "--data-dir", data_dir, "--out", run, "--restart",
                    "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    aside = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "last.pt").read_bytes() == data[: len(data) // 3]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2


def test_a_second_writer_on_one_run_directory_is_refused(tmp_path, trained, data_dir):
    run = copy_run(trained, tmp_path / "run")
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    try:  # this test process plays the first `certtune train`, holding the run's lock
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        before = snapshot(run)
        assert_refused(certtune("train", trained / "config.yaml", "--data-dir", data_dir, "--out", run),
                       "in use by another certtune process", f"pid {os.getpid()}")
        assert snapshot(run) == before
    finally:
        os.close(fd)


def test_two_real_train_processes_on_one_out(tmp_path, data_dir):
    """Two real `certtune train` processes started together: exactly one trains, the other gets one line."""
    run, config_file = tmp_path / "run", tmp_path / "longer.yaml"
    # Long enough (a few seconds an epoch) that the two always overlap: with the tiny run, one process could
    # finish before the other, still importing torch on a loaded machine, reached the lock (seen once).
    config_file.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "subset": 4096}}))
    args = ["train", config_file, "--data-dir", data_dir, "--out", run, "--no-progress"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTTUNE_")} | {"PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "tuner.cli", *map(str, args)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by another certtune process" in refused and "Traceback" not in refused
    epochs = [int(line.split('"epoch": ')[1].split(",")[0]) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # one writer's lines, not interleaved


# ---- 5. search-space expressions are bounded --------------------------------------------------------------
SPACE = {"base": TINY,
         "params": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}


def write_space(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(SPACE))
    edit(raw)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("edit, fragment", [
    (lambda r: r["params"]["lr"].update(high=float("inf")), "high must be a finite number"),
    (lambda r: r["params"]["lr"].update(low=float("nan")), "low must be a finite number"),
    (lambda r: r.update(derived={"_x": "max([1]*100000000)"}), "too long"),
    (lambda r: r.update(derived={"lr_milestones": "[1]*10**12"}), "too long"),
    (lambda r: r.update(derived={"_x": "((10**64)**64)**64"}), "number too large"),
    (lambda r: r["params"].update(epochs={"type": "int", "low": 1, "high": "1e308*10"}), "finite"),
    (lambda r: r.update(derived={"_x": "-" * 1990 + "1"}), "nested deeper than 50 levels"),
    (lambda r: r.update(derived={"_x": "not " * 490 + "1"}), "nested deeper than 50 levels"),
])
def test_bad_space_expressions_are_refused_quickly(tmp_path, edit, fragment):
    path = write_space(tmp_path, edit)
    start = time.monotonic()
    assert_refused(certtune("search", path, "--storage", tmp_path / "results", timeout=60), fragment)
    assert time.monotonic() - start < 60 and not (tmp_path / "results").exists()


def test_a_duplicated_param_is_an_error_not_last_wins(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(SPACE, sort_keys=False)
                    + "  lr: {type: uniform, low: 0.001, high: 0.002}\n")  # a second `lr:` under params
    assert_refused(certtune("search", path, "--storage", tmp_path / "results"), "duplicate key 'lr'")


def test_non_utf8_space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_bytes(yaml.safe_dump(SPACE).encode() + "# é\n".encode("latin-1"))
    assert_refused(certtune("search", path, "--storage", tmp_path / "results"), "not a UTF-8 text file")


# ---- 6. writes stay inside certtune's own files (issue 21) -------------------------------------------------
def plant_link(where: Path, victim: Path) -> None:
    """What another user of a shared storage can leave where certtune is about to write."""
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(victim)


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside every run and experiment, which no certtune command may change."""
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir()
    path.write_text("another user's file\n")
    return path


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "config.yaml", "last.pt", "best.pt"])
def test_train_never_writes_through_a_link_in_its_out(tmp_path, config_file, data_dir, victim, name):
    run = tmp_path / "run"
    plant_link(run / name, victim)
    assert_refused(certtune("train", config_file, "--data-dir", data_dir, "--out", run),
                   str(run / name), "symbolic link")
    assert victim.read_text() == "another user's file\n"  # a refused lock did not truncate it either


def test_train_refuses_a_fifo_for_metrics_at_once(tmp_path, config_file, data_dir):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "metrics.jsonl")
    start = time.monotonic()
    assert_refused(certtune("train", config_file, "--data-dir", data_dir, "--out", run, timeout=60),
                   "metrics.jsonl", "FIFO")
    assert time.monotonic() - start < 60


def test_train_temporary_files_are_fresh_names_not_planted_links(tmp_path, config_file, data_dir, victim):
    run = tmp_path / "run"
    for name in ("last.pt.tmp", "best.pt.tmp", "config.yaml.tmp", "metrics.jsonl.tmp"):
        plant_link(run / name, victim)
    proc = certtune("train", config_file, "--data-dir", data_dir, "--out", run, "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert victim.read_text() == "another user's file\n"
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2
    assert not [p for p in run.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]  # none left


def test_a_link_planted_as_a_new_searchs_journal_is_refused_before_anything_is_written(tmp_path, data_dir,
                                                                                      victim):
    plant_link(tmp_path / "results" / "new" / "optuna_journal.log", victim)
    space = space_file(tmp_path)
    before = snapshot(tmp_path)
    assert_refused(certtune("search", space, "--name", "new", "--storage", tmp_path / "results", "--data-dir",
                            data_dir), "optuna_journal.log", "symbolic link")
    assert snapshot(tmp_path) == before and victim.read_text() == "another user's file\n"


# ---- 7. --warm-start reads its source, never writes it (issue 21) -------------------------------------------
def space_file(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    return path


@pytest.mark.parametrize("source", ["checkpoint", "latin1", "json_but_not_journal", "torn_only"])
def test_warm_start_from_a_file_that_is_not_a_journal_is_one_line_and_leaves_it_as_it_was(
        tmp_path, trained, data_dir, source):
    path = tmp_path / "source"
    path.write_bytes({"checkpoint": (trained / "best.pt").read_bytes(),
                      "latin1": "caf\xe9 op_code\n".encode("latin-1"),
                      "json_but_not_journal": b'{"a": 1}\n',
                      "torn_only": b'{"op_code": 0, "study_na'}[source])
    before = snapshot(tmp_path)
    assert_refused(certtune("search", space_file(tmp_path), "--name", "w", "--storage", tmp_path / "results",
                            "--data-dir", data_dir, "--warm-start", f"{path}#base"),
                   f"--warm-start {path}", "not an Optuna journal")
    after = snapshot(tmp_path)
    assert after == {**before, "space.yaml": after["space.yaml"]}  # the source untouched, no .lock beside it
    assert not (tmp_path / "results").exists()


def journal_with_torn_tail(path: Path) -> bytes:
    """An Optuna journal of one finished trial in SPACE, whose last line a crash tore."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.create_study(study_name="old", storage=JournalStorage(JournalFileBackend(str(path))))
    dist = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    study.add_trial(optuna.trial.create_trial(params={"lr": 1e-3}, distributions={"lr": dist}, value=0.5))
    with open(path, "ab") as f:
        f.write(b'{"op_code": 4, "worker_id": "x", "study_i')
    for lock in path.parent.glob("*.lock"):
        lock.unlink()
    return path.read_bytes()


def test_warm_start_from_a_journal_with_a_torn_tail_reads_it_and_never_repairs_it(tmp_path):
    """Given as FILE#STUDY, or as the name of another search (whose own journal it is): read, not repaired."""
    from tuner.space.record import RECORD_FILE, SearchRecord
    from tuner.space.search_space import SearchSpace
    from tuner.study.journal import warm_start_trials

    journal = tmp_path / "old" / "optuna_journal.log"
    journal.parent.mkdir()
    data = journal_with_torn_tail(journal)
    (journal.parent / RECORD_FILE).write_text(SearchRecord(
        "old", "space.yaml", SPACE, ["ibp_err"], ["min"], "none", 1, 1, {"cpu": 1, "gpu": 0}, "data",
        study_storage="journal").to_json())
    before = snapshot(tmp_path)
    for spec in (f"{journal}#old", "old"):
        trials = warm_start_trials(spec, str(tmp_path), SearchSpace.from_dict(SPACE, name="s"), ["ibp_err"], ["min"])
        assert [(t.params, t.values) for t in trials] == [({"lr": 1e-3}, [0.5])]
    assert journal.read_bytes() == data and snapshot(tmp_path) == before  # no repair, no lock file beside it


# ---- 8. export writes only into a folder of its own; reads only inside the experiment (issue 21) ------------
STATE_FILE = "experiment_state-2026-01-01_00-00-00.json"


def fake_experiment(storage: Path, name: str = "exp") -> Path:
    """A search as Ray and certtune leave it on disk (record, Ray's experiment state, trial directories with
    params, results and error.txt), written directly: report and export read these plain files only."""
    import json

    from tuner.space.record import RECORD_FILE, SearchRecord

    exp = storage / name
    exp.mkdir(parents=True)
    (exp / RECORD_FILE).write_text(SearchRecord(name, "space.yaml", SPACE, ["ibp_err"], ["min"], "none", 3, 1,
                                                {"cpu": 1, "gpu": 0}, "data", location=str(exp)).to_json())
    state = []
    for n, (tid, lr, status, ibp) in enumerate([("a", 1e-3, "TERMINATED", 0.4), ("b", 2e-3, "TERMINATED", 0.3),
                                                ("c", 3e-3, "ERROR", None)], 1):
        d = exp / f"trial_{tid}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps({"lr": lr}))
        rows = [{"epoch": e, "epochs": 2, "at_target": True, "ibp_err": (ibp or 0.9) + 0.1 * (2 - e),
                 "clean_err": 0.2, "train_seconds": float(e)} for e in ((1, 2) if ibp else (1,))]
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if status == "ERROR":
            (d / "error.txt").write_text("RuntimeError: synthetic failure\n")
        info = {"trial_id": tid, "status": status, "config": {"lr": lr}, "relative_logdir": d.name,
                "experiment_tag": f"{n}_lr={lr}"}
        runtime = {"error_filename": "error.txt" if status == "ERROR" else None, "last_result": rows[-1],
                   "last_result_time": float(n)}
        state.append([json.dumps(info), json.dumps(runtime)])
    (exp / STATE_FILE).write_text(json.dumps({"trial_data": state}))
    return exp


def edit_state(exp: Path, trial: int, info: dict | None = None, runtime: dict | None = None) -> None:
    import json

    raw = json.loads((exp / STATE_FILE).read_text())
    old_info, old_runtime = (json.loads(x) for x in raw["trial_data"][trial])
    raw["trial_data"][trial] = [json.dumps({**old_info, **(info or {})}), json.dumps({**old_runtime, **(runtime or {})})]
    (exp / STATE_FILE).write_text(json.dumps(raw))


def test_export_refuses_a_non_empty_folder_it_did_not_write(tmp_path):
    fake_experiment(tmp_path / "results")
    out = tmp_path / "mine"
    (out / "top_k").mkdir(parents=True)
    (out / "notes.txt").write_text("mine\n")
    (out / "top_k" / "rank1.yaml").write_text("mine\n")
    before = snapshot(tmp_path)
    assert_refused(certtune("export", "exp", "--storage", tmp_path / "results", "--out", out),
                   f"--out {out}", "not written by `certtune export`")
    assert snapshot(tmp_path) == before


def test_a_second_export_replaces_only_what_the_first_wrote(tmp_path):
    fake_experiment(tmp_path / "results")
    out = tmp_path / "out"
    export = ("export", "exp", "--storage", tmp_path / "results", "--out", out)
    assert certtune(*export, "--top-k", "2").returncode == 0
    assert sorted(p.name for p in (out / "top_k").iterdir()) == ["rank1.yaml", "rank2.yaml"]
    (out / "notes.txt").write_text("added by the user\n")
    (out / "top_k" / "mine.yaml").write_text("added by the user\n")
    proc = certtune(*export, "--top-k", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "top_k").iterdir()) == ["mine.yaml", "rank1.yaml"]  # rank2: its own, gone
    assert (out / "notes.txt").read_text() == "added by the user\n"


@pytest.mark.parametrize("planted", ["trials.csv", "best.yaml", "history.png", "top_k", "top_k/rank1.yaml"])
def test_export_never_writes_through_a_link_in_its_out(tmp_path, victim, planted):
    fake_experiment(tmp_path / "results")
    out = tmp_path / "out"
    export = ("export", "exp", "--storage", tmp_path / "results", "--out", out)
    assert certtune(*export).returncode == 0  # an export folder of its own, then a link planted in it
    target = out / planted
    (target.unlink() if target.is_file() else __import__("shutil").rmtree(target))
    plant_link(target, victim.parent if planted == "top_k" else victim)
    before = snapshot(tmp_path)
    line = assert_refused(certtune(*export), "--out")
    assert "link" in line and victim.read_text() == "another user's file\n" and snapshot(tmp_path) == before


def test_export_out_that_is_a_file_is_one_line(tmp_path, victim):
    fake_experiment(tmp_path / "results")
    assert_refused(certtune("export", "exp", "--storage", tmp_path / "results", "--out", victim),
                   "exists and is not a directory")
    assert victim.read_text() == "another user's file\n"


SECRET = "SECRET-TOKEN-do-not-copy"


def point_outside(exp: Path, tamper: str, outside: Path, dotdot: str) -> str:
    """Make trial 2 of the experiment's state, or a planted trial directory, lead to `outside`: by an absolute
    log dir, a `../` one (`dotdot`), or a link (`trial_dir_link`); other tampers are the caller's. Returns the
    file a refusal must name."""
    if tamper == "absolute_logdir":
        edit_state(exp, 2, info={"relative_logdir": str(outside)})
    elif tamper == "dotdot_logdir":
        edit_state(exp, 2, info={"relative_logdir": dotdot})
    elif tamper == "trial_dir_link":  # a trial directory Ray's state does not know, which is a link to elsewhere
        (exp / "trial_d").symlink_to(outside)
        return "trial_d"
    return STATE_FILE


@pytest.mark.parametrize("tamper", ["absolute_logdir", "dotdot_logdir", "dotdot_error_file", "error_file_link",
                                    "result_link", "trial_dir_link", "stop_reason_link"])
def test_export_and_report_read_only_inside_the_experiment(tmp_path, tamper):
    exp = fake_experiment(tmp_path / "results")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "error.txt").write_text(f"{SECRET}\n")
    (outside / "result.json").write_text('{"epoch": 2, "epochs": 2, "ibp_err": 0.01, "note": "%s"}\n' % SECRET)
    (outside / "params.json").write_text('{"lr": 0.001}')
    named = point_outside(exp, tamper, outside, "../../outside")
    if tamper == "dotdot_error_file":
        edit_state(exp, 2, runtime={"error_filename": "../../../outside/error.txt"})
    elif tamper == "error_file_link":
        (exp / "trial_c" / "error.txt").unlink()
        (exp / "trial_c" / "error.txt").symlink_to(outside / "error.txt")
        named = "trial_c/error.txt"
    elif tamper == "result_link":
        (exp / "trial_a" / "result.json").unlink()
        (exp / "trial_a" / "result.json").symlink_to(outside / "result.json")
        named = "trial_a/result.json"
    elif tamper == "stop_reason_link":  # the scheduler's marker (tuner/run/schedulers.py record_stop)
        (outside / "stop.json").write_text('{"by": "rung", "note": "%s"}\n' % SECRET)
        (exp / "trial_a" / "certtune_stop_reason.json").symlink_to(outside / "stop.json")
        named = "trial_a/certtune_stop_reason.json"
    before = snapshot(tmp_path)
    out = tmp_path / "export"
    for command in (("export", "exp", "--storage", tmp_path / "results", "--out", out),
                    ("report", "exp", "--storage", tmp_path / "results")):
        proc = certtune(*command)
        assert_refused(proc, named, "outside the experiment")
        assert SECRET not in proc.stdout + proc.stderr
    assert snapshot(tmp_path) == before and not out.exists()


def test_resume_of_a_copy_whose_study_is_in_a_database_is_refused_and_changes_neither(tmp_path):
    """A copy resumes on itself (tests/test_relocate.py), except when its Optuna study lives in a database the
    original shares (--optuna-storage URL): the copy would add its trials to the original's study. Refused
    in one line before anything is written (not even the driver lock)."""
    import shutil

    original = fake_experiment(tmp_path / "results")
    (original / "tuner.pkl").write_bytes(b"")
    record = json.loads((original / "certtune_search.json").read_text())
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    (original / "certtune_search.json").write_text(json.dumps({**record, "study_storage": url}, indent=2) + "\n")
    copy = tmp_path / "copy" / "exp"
    shutil.copytree(original, copy)
    before = snapshot(tmp_path)
    assert_refused(certtune("resume", "exp", "--storage", tmp_path / "copy"),
                   f"was started in {original}", f"now read from {copy}", f"lives in the database {url}")
    assert snapshot(tmp_path) == before and not (copy / ".lock").exists()


@pytest.mark.parametrize("tamper", ["absolute_logdir", "dotdot_logdir", "trial_dir_link"])
def test_resume_refuses_a_state_that_points_outside_the_experiment_before_ray_starts(tmp_path, tamper):
    """A copy's state whose trial directory is the original's (an absolute path, `../`, a link) is refused in
    one line before Ray starts: a resumed copy reads and writes only itself."""
    exp = fake_experiment(tmp_path / "results")
    (exp / "tuner.pkl").write_bytes(b"")  # Ray would see an experiment to restore; certtune refuses first
    outside = tmp_path / "original" / "trial_c"
    outside.mkdir(parents=True)
    (outside / "params.json").write_text('{"lr": 0.003}')
    named = point_outside(exp, tamper, outside, "../../original/trial_c")
    before = snapshot(tmp_path)
    start = time.monotonic()
    assert_refused(certtune("resume", "exp", "--storage", tmp_path / "results", timeout=60), named,
                   "outside the experiment")
    assert time.monotonic() - start < 60 and snapshot(tmp_path) == before


def test_report_and_export_of_a_copied_experiment_read_only_the_copy(tmp_path):
    import shutil

    original = fake_experiment(tmp_path / "results")
    shutil.copytree(original, tmp_path / "copy" / "exp", symlinks=True)
    moved = original.rename(tmp_path / "moved-away")  # the original is gone from where it ran
    before = snapshot(moved)
    report = certtune("report", "exp", "--storage", tmp_path / "copy")
    assert report.returncode == 0 and "3 trials of 3 planned; 2 finished" in report.stdout, report.stderr[-2000:]
    export = certtune("export", "exp", "--storage", tmp_path / "copy")
    assert export.returncode == 0, export.stderr[-2000:]
    assert (tmp_path / "copy" / "exp" / "export" / "trials.csv").is_file() and snapshot(moved) == before


# ---- 9. one driver per experiment (issue 21) ----------------------------------------------------------------
HOLD_LOCK = ("import sys, time\nfrom trainers.files import open_lock, take_lock\nfd = open_lock(sys.argv[1])\n"
             "assert take_lock(fd) is None\nprint('held', flush=True)\ntime.sleep(600)\n")


def test_a_second_driver_of_one_experiment_is_refused_naming_the_first(tmp_path, data_dir):
    exp = fake_experiment(tmp_path / "results")
    (exp / "tuner.pkl").write_bytes(b"")  # what makes Ray (and `certtune search`) see an experiment to resume
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(exp / ".lock")], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:  # the holder plays a driver running the search `exp`
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path)
        for command in (("resume", "exp", "--storage", tmp_path / "results"),
                        ("search", space_file(tmp_path / "results"), "--name", "exp", "--storage",
                         tmp_path / "results", "--data-dir", data_dir)):
            assert_refused(certtune(*command), "search 'exp'", "another certtune driver", f"pid {holder.pid} on ")
            assert snapshot(tmp_path) == {**before, **{k: v for k, v in snapshot(tmp_path).items()
                                                       if k == "results/space.yaml"}}
    finally:
        holder.kill()  # kill -9: the kernel drops its lock, which the next driver takes over
        holder.wait()
    # Past the lock now: refused only because the search exists (its name is taken by a real experiment).
    assert_refused(certtune("search", space_file(tmp_path), "--name", "exp", "--storage", tmp_path / "results",
                            "--data-dir", data_dir), "a search of that name already exists")


def test_a_link_planted_as_the_driver_lock_is_refused_and_its_target_kept(tmp_path, victim):
    exp = fake_experiment(tmp_path / "results")
    plant_link(exp / ".lock", victim)
    assert_refused(certtune("resume", "exp", "--storage", tmp_path / "results"), ".lock", "symbolic link")
    assert victim.read_text() == "another user's file\n"

# ---- 6. every input is bounded before work (issue 21 §5) ---------------------------------------------------
def run_measured(*args, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    """certtune as a child process, with its peak resident memory in MiB (from wait4: this child only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTTUNE_")} | {"PYTHONPATH": str(REPO)}
    with open(tmp_path / "out.txt", "w+") as out, open(tmp_path / "err.txt", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tuner.cli", *map(str, args)], cwd=REPO, env=env,
                                stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()), usage.ru_maxrss / 1024


def test_a_small_checkpoint_that_inflates_to_a_gigabyte_is_refused_without_inflating(tmp_path, trained, data_dir):
    """torch.load reads deflated zip records; torch.save never writes one. 2 MB on disk, 1 GiB inflated."""
    import zipfile
    import zlib

    big = 2**28  # float32 elements: 1 GiB
    state = torch.load(trained / "best.pt", weights_only=True)
    name = next(k for k, v in state["model"].items() if v.dim() == 2)
    state["model"][name] = torch.zeros(70001)  # a placeholder storage we make claim `big` elements below
    torch.save(state, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as z:
        records = {i.filename: z.read(i.filename) for i in z.infolist()}
    pkl_name = next(n for n in records if n.endswith("data.pkl"))
    key = next(n for n, data in records.items() if data == bytes(4 * 70001))  # the placeholder's bytes
    index = key.rsplit("/", 1)[1]
    pkl = records[pkl_name]
    at = pkl.index(b"J" + (70001).to_bytes(4, "little"), pkl.index(index.encode() + b"q"))
    records[pkl_name] = pkl[:at] + b"J" + big.to_bytes(4, "little") + pkl[at + 5:]
    with zipfile.ZipFile(tmp_path / "bomb.pt", "w") as w:
        for n, data in records.items():
            if n == key:
                info = zipfile.ZipInfo(n)
                info.compress_type = zipfile.ZIP_DEFLATED
                with w.open(info, "w", force_zip64=True) as f:
                    for _ in range(big * 4 // 2**24):
                        f.write(bytes(2**24))
            else:
                w.writestr(zipfile.ZipInfo(n), data)
    assert (tmp_path / "bomb.pt").stat().st_size < 5 * 2**20
    start = time.monotonic()
    proc, rss_mib = run_measured("verify", tmp_path / "bomb.pt", "--data-dir", data_dir, tmp_path=tmp_path)
    assert_refused(proc, "bomb.pt", "compressed", "refused")
    assert time.monotonic() - start < 30
    (tmp_path / "empty.pt").write_bytes(b"")  # the same command refused at once: its memory is the baseline
    _, baseline_mib = run_measured("verify", tmp_path / "empty.pt", "--data-dir", data_dir, tmp_path=tmp_path)
    assert rss_mib < baseline_mib + 200, (rss_mib, baseline_mib)  # loading it would take 1 GiB more


def test_a_checkpoint_holding_more_than_its_architecture_is_refused_before_reading(tmp_path, trained, data_dir):
    state = torch.load(trained / "best.pt", weights_only=True)
    state["extra"] = torch.zeros(2**22)  # 16 MiB no cnn_small checkpoint holds
    torch.save(state, tmp_path / "fat.pt")
    assert_refused(certtune("verify", tmp_path / "fat.pt", "--data-dir", data_dir), "fat.pt", "its tensors claim",
                   "more than a checkpoint of its architecture holds")


@pytest.mark.parametrize("key, value, fragment", [
    ("epoch", -1000000, "epoch -1000000 is not an epoch of its 2-epoch run"),
    ("step", "7", "step '7'"),
    ("best_ibp_err", float("nan"), "best_ibp_err nan"),
    ("rng_cpu", torch.zeros(10, dtype=torch.uint8), "rng_cpu is not a CPU random-generator state"),
    ("rng_cuda", [torch.zeros(3, 3)], "rng_cuda"),
])
def test_out_of_range_training_state_is_refused_before_training(tmp_path, trained, data_dir, key, value, fragment):
    run = copy_run(trained, tmp_path / "run")
    state = torch.load(run / "last.pt", weights_only=True)
    state[key] = value
    torch.save(state, run / "last.pt")
    before = snapshot(run)
    start = time.monotonic()
    assert_refused(certtune("train", trained / "config.yaml", "--data-dir", data_dir, "--out", run),
                   "last.pt", fragment, "--restart")
    assert snapshot(run) == before and time.monotonic() - start < 60


def test_an_npz_header_claiming_279_tib_is_refused_without_allocating(tmp_path, config_file, data_dir):
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (2**40 * 279 // 784, 28, 28)})
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("train_data.npy", header.getvalue() + bytes(784))
        for key in ("train_targets", "test_data", "test_targets"):
            array = io.BytesIO()
            np.save(array, np.zeros((1, 28, 28) if key == "test_data" else 1, np.uint8))
            z.writestr(key + ".npy", array.getvalue())
    start = time.monotonic()
    assert_refused(certtune("train", config_file, f"data.npz={tmp_path / 'huge.npz'}", "--data-dir", data_dir,
                            "--out", tmp_path / "run"), "huge.npz", "'train_data' claims shape", "refused")
    assert time.monotonic() - start < 60 and not (tmp_path / "run" / "config.yaml").exists()


def mnist_copy(data_dir: Path, to: Path, edit) -> Path:
    """A data dir whose MNIST/raw holds the real files, one of them changed by `edit(name, bytes) -> bytes`."""
    raw = to / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (data_dir / "MNIST" / "raw").iterdir():
        (raw / path.name).write_bytes(edit(path.name, path.read_bytes()))
    return to


def _labels_out_of_range(name, data):
    return data[:8] + bytes([12]) + data[9:] if name == "t10k-labels-idx1-ubyte" else data


def _float_labels(name, data):  # idx type 0x0d: 4-byte floats
    if name != "train-labels-idx1-ubyte":
        return data
    return data[:2] + b"\x0d\x01" + data[4:8] + np.frombuffer(data[8:], np.uint8).astype(">f4").tobytes()


def _fewer_images_than_labels(name, data):
    if name != "t10k-images-idx3-ubyte":
        return data
    n = int.from_bytes(data[4:8], "big") - 1
    return data[:4] + n.to_bytes(4, "big") + data[8:-784]


@pytest.mark.parametrize("edit, fragments", [
    (lambda name, data: b"\x00\x00\x08\x04" + data[4:] if name == "train-images-idx3-ubyte" else data,
     ["train-images-idx3-ubyte", "bad magic number 0x00000804"]),
    (_labels_out_of_range, ["t10k-labels-idx1-ubyte", "labels must be in [0, 9], found 12"]),
    (_float_labels, ["train-labels-idx1-ubyte", "bad magic number 0x00000d01"]),
    (_fewer_images_than_labels, ["t10k-labels-idx1-ubyte", "10000 labels for 9999 images"]),
])
def test_mnist_idx_files_are_checked_like_an_npz(tmp_path, config_file, data_dir, edit, fragments):
    bad = mnist_copy(data_dir, tmp_path / "data", edit)
    assert_refused(certtune("train", config_file, "--data-dir", bad, "--out", tmp_path / "run"), *fragments)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_search_on_bad_mnist_labels_is_refused_before_ray_and_leaves_nothing(tmp_path, data_dir):
    bad = mnist_copy(data_dir, tmp_path / "data", _labels_out_of_range)
    space = write_space(tmp_path, lambda raw: None)
    start = time.monotonic()
    assert_refused(certtune("search", space, "--data-dir", bad, "--name", "s", "--storage", tmp_path / "results"),
                   "checked before starting Ray", "labels must be in [0, 9]")
    assert time.monotonic() - start < 60 and not (tmp_path / "results").exists()


def test_oversized_or_deeply_nested_yaml_is_refused_at_once(tmp_path, config_file):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(200 * 2**20)  # 200 MB (sparse): refused by its size before a byte is read
    deep = tmp_path / "deep.yaml"
    deep.write_text("lr_milestones: " + "[" * 5000 + "]" * 5000 + "\n")
    for args, fragments in [((big,), ("big.yaml", "200.0 MiB is too large", "at most 1.0 MiB")),
                            ((deep,), ("deep.yaml", "nesting deeper than 50 levels")),
                            ((config_file, "lr_milestones=" + "[" * 3000 + "]" * 3000), ("nesting deeper than 50",)),
                            ((config_file, "note=" + "x" * 20000), ("20005 characters; at most 10000",))]:
        start = time.monotonic()
        assert_refused(certtune("train", *args, "--out", tmp_path / "run"), *fragments)
        assert time.monotonic() - start < 30 and not (tmp_path / "run").exists()


def test_fifos_where_input_files_should_be_are_refused_without_blocking(tmp_path, trained, data_dir):
    fifo_config = tmp_path / "config.yaml"
    os.mkfifo(fifo_config)
    assert_refused(certtune("train", fifo_config, "--out", tmp_path / "run1", timeout=60),
                   "config.yaml: a FIFO, not a regular file")
    run = copy_run(trained, tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")  # resuming reads it to drop lines after the checkpoint
    assert_refused(certtune("train", trained / "config.yaml", "--data-dir", data_dir, "--out", run, timeout=60),
                   "metrics.jsonl: is a FIFO")  # the run directory's own-files check (trainers/files.py) comes first
    os.mkfifo(tmp_path / "model.pt")
    assert_refused(certtune("verify", tmp_path / "model.pt", "--data-dir", data_dir, timeout=60),
                   "model.pt: a FIFO, not a regular file")


@pytest.mark.parametrize("edit, fragment", [
    (lambda raw: raw["params"].update({f"_h{i}": {"type": "uniform", "low": 0, "high": 1} for i in range(5000)}),
     "5001 params; at most 200"),
    (lambda raw: raw["params"].update(lr={"type": "categorical", "choices": [1e-3 + i * 1e-8 for i in range(20000)]}),
     "20000 choices; at most 1000"),
])
def test_huge_spaces_are_refused_quickly(tmp_path, edit, fragment):
    path = write_space(tmp_path, edit)
    start = time.monotonic()
    assert_refused(certtune("search", path, "--storage", tmp_path / "results", timeout=60), fragment)
    assert time.monotonic() - start < 30 and not (tmp_path / "results").exists()


# ---- 7. checked before Ray starts (issue 21 §6) ------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["--seed", "-5"], "--seed: must be an integer in [0, 2**32), got -5"),
    (["--seed", str(2**64)], "--seed: must be an integer in [0, 2**32)"),
    (["--resources-per-trial", "cpu=0.00001"], "cpu=1e-05 is below the smallest share, 0.01"),
    (["--name", "a" * 300], "--name: 300 characters; a search name has at most 100"),
])
def test_search_flags_are_refused_before_ray_and_leave_the_name_usable(tmp_path, args, fragment):
    space = write_space(tmp_path, lambda raw: None)
    start = time.monotonic()
    assert_refused(certtune("search", space, "--name", "s", *args, "--storage", tmp_path / "results"), fragment)
    assert time.monotonic() - start < 60 and not (tmp_path / "results").exists()  # nothing blocks the name


def test_an_address_that_speaks_tcp_but_not_ray_is_one_line_within_the_handshake_timeout(tmp_path):
    import socket

    space = write_space(tmp_path, lambda raw: None)
    with socket.socket() as server:  # accepts connections (the kernel completes them) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        assert_refused(certtune("search", space, "--address", address, "--storage", tmp_path / "results",
                                timeout=60), address, "answers TCP but not as a Ray cluster", "no HTTP/2 answer")
    assert time.monotonic() - start < 30 and not (tmp_path / "results").exists()


# ---- 8. damaged state is named, not misread (issue 21 §7) ----------------------------------------------------
SEARCH_SPACE = {"base": TINY | {"eps": 0.02, "data": {"subset": 256, "val_size": 200}},
                "params": {"_unused": {"type": "uniform", "low": 0.0, "high": 1.0}}}


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory, data_dir):
    """A real search of two finished trials (2 epochs each) to copy and damage."""
    root = tmp_path_factory.mktemp("search")
    (root / "space.yaml").write_text(yaml.safe_dump(SEARCH_SPACE, sort_keys=False))
    proc = certtune("search", root / "space.yaml", "--name", "s", "--num-samples", 2, "--max-concurrent", 1,
                    "--scheduler", "none", "--data-dir", data_dir, "--storage", root / "storage", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "storage"


def damaged_copy(finished_search: Path, to: Path, damage) -> tuple[Path, Path]:
    """A copy of the search with `damage(experiment_dir, first_trial_dir)` applied."""
    import shutil

    shutil.copytree(finished_search, to)
    experiment = to / "s"
    # the copy stands for a search started there
    record = json.loads((experiment / "certtune_search.json").read_text())
    (experiment / "certtune_search.json").write_text(json.dumps({**record, "location": str(experiment)}, indent=2) + "\n")
    damage(experiment, sorted(experiment.glob("trial_*"))[0])
    return to, experiment


def _replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (old, text[:300])
    path.write_text(text.replace(old, new, 1))


def _deep_state(experiment, _):
    next(experiment.glob("experiment_state-*.json")).write_text("[" * 100000 + "]" * 100000)


@pytest.mark.parametrize("damage, fragments", [
    (lambda e, t: _replace_in(t / "result.json", '"ibp_err": 1.0', '"ibp_err": NaN'),
     ["result.json: line 1 holds NaN in a result that is not a failure"]),
    (lambda e, t: _replace_in(t / "result.json", '"epoch": 2,', '"epoch": Infinity,'),
     ["result.json: line 2 holds Infinity"]),
    (lambda e, t: _replace_in(t / "result.json", '"epoch": 2,', '"epoch": "2",'),
     ["result.json: line 2: 'epoch' is '2', not an integer"]),
    (lambda e, t: _replace_in(e / "certtune_search.json", '"objective": [\n    "ibp_err"\n  ]', '"objective": "ibp_err"'),
     ["certtune_search.json: field 'objective' must be list[str], got 'ibp_err'"]),
    (lambda e, t: (t / "params.json").write_text('{"_unused": "zzz"}'),
     [f"params.json: not a point of the search's space: param '_unused': expected a number, got 'zzz'"]),
    (_deep_state, ["experiment_state-", "nested too deeply"]),
    (lambda e, t: (next(e.glob("experiment_state-*.json")).unlink(), os.mkfifo(e / "experiment_state-9.json")),
     ["experiment_state-9.json: a FIFO, not a regular file"]),
    (lambda e, t: (t / "certtune_stop_reason.json").write_text('{"by": "gremlins"}'),
     ["certtune_stop_reason.json: 'by' is 'gremlins', not one of rung, share; damaged"]),
    (lambda e, t: os.mkfifo(t / "certtune_stop_reason.json"), ["certtune_stop_reason.json: a FIFO, not a regular file"]),
])
def test_damaged_experiment_state_is_named_by_report_and_export(tmp_path, finished_search, damage, fragments):
    storage, experiment = damaged_copy(finished_search, tmp_path / "copy", damage)
    before = snapshot(experiment) if not any(p.is_fifo() for p in experiment.iterdir()) else None
    for command in (["report", "s"], ["export", "s", "--out", tmp_path / "exported"]):
        start = time.monotonic()
        assert_refused(certtune(*command, "--storage", storage, timeout=60), *fragments)
        assert time.monotonic() - start < 60 and not (tmp_path / "exported").exists()
    if before is not None:
        assert snapshot(experiment) == before


@pytest.mark.parametrize("garbage", [b"[" * 10**6, b'{"_unused": "\xff\xfe"}'], ids=["nested", "not-utf8"])
def test_a_params_file_nested_past_any_parser_falls_back_to_rays_record_of_the_config(tmp_path, finished_search, garbage):
    """params.json is Ray's copy of a trial's config, also held in Ray's experiment state: one that is not JSON
    (a million open brackets, which Python's own parser meets with a RecursionError; bytes that are not UTF-8) is
    set aside for the state's copy, without a traceback."""
    storage, experiment = damaged_copy(finished_search, tmp_path / "copy",
                                       lambda e, t: (t / "params.json").write_bytes(garbage))
    proc = certtune("report", "s", "--storage", storage, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "2 finished" in proc.stdout.splitlines()[0] and "_unused=" in proc.stdout, proc.stdout


def test_a_huge_file_in_remote_storage_is_refused_before_it_is_copied(tmp_path, finished_search):
    """A search in URI storage is copied file by file before it is read: each file's size is checked first (a
    sparse 257-MiB result.json here: no disk is spent), so a planted huge file costs neither memory nor disk."""
    storage, experiment = damaged_copy(finished_search, tmp_path / "copy",
                                       lambda e, t: os.truncate(t / "result.json", 257 * 2**20))
    for command in (["report", "s"], ["export", "s", "--out", tmp_path / "exported"]):
        assert_refused(certtune(*command, "--storage", f"file://{storage}", timeout=120),
                       "result.json: 257 MiB is too large for a file of a search")
    assert not (tmp_path / "exported").exists()


def test_a_finished_trial_whose_result_json_lost_its_tail_is_not_demoted(tmp_path, finished_search):
    def cut_last_line(_, trial):
        text = (trial / "result.json").read_text()
        (trial / "result.json").write_text(text[: text.rstrip("\n").rfind("\n") + 1] + text.rstrip("\n")[-300:-200])

    storage, experiment = damaged_copy(finished_search, tmp_path / "copy", cut_last_line)
    proc = certtune("report", "s", "--storage", storage, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "2 finished, 0 stopped" in proc.stdout.splitlines()[0], proc.stdout


def test_a_finished_trial_whose_lost_tail_no_state_holds_is_named_damaged_not_stopped(tmp_path, finished_search):
    """result.json lost its last line and Ray's state was saved before that result: the trial may have
    finished, so report and export name it damaged (a failed trial whose reason names the file), never a
    silent "stopped" that drops out of the ranking."""
    damaged_trial = {}

    def cut_tail_and_forget_it(experiment, trial):
        text = (trial / "result.json").read_text()
        kept = text[: text.rstrip("\n").rfind("\n") + 1]
        (trial / "result.json").write_text(kept + text.rstrip("\n")[-300:-200])
        state = next(experiment.glob("experiment_state-*.json"))
        raw = json.loads(state.read_text())
        for n, (info, runtime) in enumerate(raw["trial_data"]):
            if json.loads(info)["trial_id"] == trial.name.removeprefix("trial_"):
                older = json.loads(kept.splitlines()[-1])  # the state as saved one epoch earlier
                raw["trial_data"][n][1] = json.dumps({**json.loads(runtime), "last_result": older})
        state.write_text(json.dumps(raw))
        damaged_trial["id"] = trial.name.removeprefix("trial_")

    storage, experiment = damaged_copy(finished_search, tmp_path / "copy", cut_tail_and_forget_it)
    result_file = experiment / f"trial_{damaged_trial['id']}" / "result.json"
    before = snapshot(experiment)
    report = certtune("report", "s", "--storage", storage, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "1 finished, 0 stopped, 1 failed" in report.stdout.splitlines()[0], report.stdout
    assert f"failed {damaged_trial['id']}: damaged: {result_file} lost its last line (torn)" in report.stdout
    export = certtune("export", "s", "--storage", storage, "--out", tmp_path / "exported", timeout=60)
    assert export.returncode == 0, export.stderr
    import csv
    with open(tmp_path / "exported" / "trials.csv") as f:
        rows = {row["trial_id"]: row for row in csv.DictReader(f)}
    assert rows[damaged_trial["id"]]["status"] == "failed"
    assert rows[damaged_trial["id"]]["error"].startswith(f"damaged: {result_file}")
    assert snapshot(experiment) == before  # reading names the damage; it repairs nothing


def test_a_garbled_journal_is_named_before_ray_starts(tmp_path, finished_search, data_dir):
    def garble(experiment, _):
        lines = (experiment / "optuna_journal.log").read_text().splitlines(keepends=True)
        lines[2] = '{"op_code": garbled\n'
        (experiment / "optuna_journal.log").write_text("".join(lines))

    storage, experiment = damaged_copy(finished_search, tmp_path / "copy", garble)
    before = snapshot(experiment)
    for args in (["resume", "s", "--storage", storage],
                 ["search", storage.parent / "space.yaml", "--name", "w", "--storage", storage, "--warm-start", "s",
                  "--data-dir", data_dir]):
        if args[0] == "search":
            (storage.parent / "space.yaml").write_text(yaml.safe_dump(SEARCH_SPACE, sort_keys=False))
        start = time.monotonic()
        # resume checks its own journal; --warm-start reads the source read-only (study.read_journal)
        says = ("line 3 is not an Optuna journal entry" if args[0] == "resume" else
                "not an Optuna journal file (line 3 is not a journal entry)")
        assert_refused(certtune(*args, timeout=60), "optuna_journal.log: " + says)
        assert time.monotonic() - start < 30
    assert snapshot(experiment) == before and not (storage / "w").exists()


def test_verify_on_an_empty_split_is_one_line(tmp_path, trained):
    np.savez(tmp_path / "no_test.npz", train_data=np.zeros((300, 28, 28), np.uint8),
             train_targets=np.zeros(300, np.int64), test_data=np.zeros((0, 28, 28), np.uint8),
             test_targets=np.zeros(0, np.int64))
    state = torch.load(trained / "best.pt", weights_only=True)
    state["config"]["data"]["test_subset"] = 0  # all of the (empty) test split
    torch.save(state, tmp_path / "all.pt")
    assert_refused(certtune("verify", tmp_path / "all.pt", "--data-dir", tmp_path / "no_test.npz"),
                   "--split test", "has no test examples")


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a 1 MiB file system (a tmpfs; mounting needs root, which the CI and this machine have).
    Without root, a 1 MiB file-size limit on the child (RLIMIT_FSIZE) makes its writes fail the same way."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    yield disk, mounted
    if mounted:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(small_disk, config_file, data_dir):
    import resource
    import signal

    disk, mounted = small_disk

    def limit_file_size():  # only without the tmpfs
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTTUNE_")} | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tuner.cli", "train", str(config_file), "--data-dir", str(data_dir),
                           "--out", str(disk / "run"), "--no-progress"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300, preexec_fn=None if mounted else limit_file_size)
    assert_refused(proc, "last.pt: cannot write the checkpoint", "the previous last.pt, if any, is intact",
                   *(["No space left on device"] if mounted else []))
    assert not list((disk / "run").glob("*.tmp")) and not (disk / "run" / "last.pt").exists()


def test_resume_refuses_a_fifo_among_the_experiment_files_before_ray(tmp_path, finished_search):
    def fifo_for_ray_state(experiment, _):
        (experiment / "tuner.pkl").unlink()
        os.mkfifo(experiment / "tuner.pkl")  # Ray's Tuner.restore would block reading it

    storage, experiment = damaged_copy(finished_search, tmp_path / "copy", fifo_for_ray_state)
    start = time.monotonic()
    assert_refused(certtune("resume", "s", "--storage", storage, timeout=60), "tuner.pkl: a FIFO, not a regular file")
    assert time.monotonic() - start < 30 and not list(experiment.glob("trial_*/certtune_superseded.json"))


def test_two_real_drivers_of_one_search_one_runs_the_other_is_refused(tmp_path, data_dir):
    """Two real `certtune search` with one --name and --storage: the second, started while the first runs, gets
    one line naming the first and changes nothing; the first runs its planned trials alone."""
    space = space_file(tmp_path)
    args = ["search", space, "--name", "twice", "--storage", tmp_path / "results", "--data-dir", data_dir,
            "--num-samples", "2", "--max-concurrent", "1", "--scheduler", "none", "--resources-per-trial", "cpu=1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CERTTUNE_", "RAY_", "WANDB_"))}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", HOME=str(tmp_path / "home"))
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "tuner.cli", *map(str, args)], cwd=REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "experiment in" not in (tmp_path / "first.log").read_text():  # printed once the record is written
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-2000:]
            time.sleep(0.1)
        record = (tmp_path / "results" / "twice" / "certtune_search.json").read_bytes()
        assert_refused(certtune(*args, "--num-samples", "5"), "search 'twice'", "another certtune driver",
                       f"pid {first.pid} on ")
        assert (tmp_path / "results" / "twice" / "certtune_search.json").read_bytes() == record
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log.close()
    report = certtune("report", "twice", "--storage", tmp_path / "results")
    assert "2 trials of 2 planned; 2 finished" in report.stdout, report.stdout + report.stderr
