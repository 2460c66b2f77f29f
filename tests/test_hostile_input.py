"""Hostile and careless input through the real CLI (issue 9): every case is a subprocess of `certtune` that
must exit 2 with one line on stderr naming the problem, print no traceback, change no file, and run no code
hidden in a file it was handed. docs/reliability.md lists the promises these tests hold."""
from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
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


def test_two_real_train_processes_on_one_out(tmp_path, config_file, data_dir):
    """Two real `certtune train` processes started together: exactly one trains, the other gets one line."""
    run = tmp_path / "run"
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
                   "metrics.jsonl: a FIFO, not a regular file", "--restart")
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


def test_a_finished_trial_whose_result_json_lost_its_tail_is_not_demoted(tmp_path, finished_search):
    def cut_last_line(_, trial):
        text = (trial / "result.json").read_text()
        (trial / "result.json").write_text(text[: text.rstrip("\n").rfind("\n") + 1] + text.rstrip("\n")[-300:-200])

    storage, experiment = damaged_copy(finished_search, tmp_path / "copy", cut_last_line)
    proc = certtune("report", "s", "--storage", storage, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "2 finished, 0 stopped" in proc.stdout.splitlines()[0], proc.stdout


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
        assert_refused(certtune(*args, timeout=60), "optuna_journal.log: line 3 is not an Optuna journal entry")
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
