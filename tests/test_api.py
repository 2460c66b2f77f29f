"""`import certtune`: the example in docs/ run end to end, on first use of a data directory.

The module fixture runs docs/api_example.py in this process (a real local Ray instance, real Optuna, 2 tiny
trials) with $CERTTUNE_DATA pointing at a directory that does not exist yet and torchvision's MNIST mirror
list pointed at a loopback HTTP server holding the MNIST .gz files (tests/mnist_mirror.py). So one search
shows both: the API works end to end, and a first search downloads the data once, before the trials start.
The API's errors are the CLI's: same checks, same one-line messages.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torchvision

from mnist_mirror import FILES, build_gz, serve

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example(tmp_path_factory, data_dir):
    import ray

    tmp = tmp_path_factory.mktemp("api")
    resources = build_gz(Path(data_dir) / "MNIST" / "raw", tmp / "mirror")
    fresh = tmp / "first-use" / "data"  # neither folder exists: the search creates them
    work = tmp / "work"
    mp = pytest.MonkeyPatch()
    mp.setattr(torchvision.datasets.MNIST, "mirrors", None)  # set below, once the server has a port
    mp.setattr(torchvision.datasets.MNIST, "resources", resources)  # our gzip's md5s
    mp.setenv("CERTTUNE_DATA", str(fresh))
    mp.setenv("WANDB_MODE", "offline")
    mp.delenv("RAY_ADDRESS", raising=False)
    mp.setattr(sys, "argv", [str(REPO / "docs" / "api_example.py"), str(work)])
    out = io.StringIO()
    try:
        with serve(tmp / "mirror") as (url, requests):
            mp.setattr(torchvision.datasets.MNIST, "mirrors", [url])
            with contextlib.redirect_stdout(out):
                names = runpy.run_path(str(REPO / "docs" / "api_example.py"), run_name="__main__")
    finally:
        ray.shutdown()
        mp.undo()
    return {"names": names, "stdout": out.getvalue(), "requests": list(requests), "fresh": fresh, "work": work,
            "data_dir": Path(data_dir)}


def test_first_search_downloads_mnist_once_before_the_trials(example):
    # One GET per file: the driver fetched the data; neither trial (nor a retry) downloaded it again.
    assert sorted(example["requests"]) == sorted(f"/{name}.gz" for name in FILES), example["requests"]
    raw = example["fresh"] / "MNIST" / "raw"
    for name in FILES:  # the extracted files are the shared data, byte for byte
        assert (raw / name).read_bytes() == (example["data_dir"] / "MNIST" / "raw" / name).read_bytes()
    found = example["names"]["found"]
    assert found.record.data_dir == str(example["fresh"])
    assert found.counts()["finished"] == 2 and found.is_complete() and not found.all_failed()


def test_report_is_a_dataframe_of_the_trials_as_export_writes_them(example):
    names, work = example["names"], example["work"]
    table, found = names["table"], names["found"]
    assert list(table["trial_id"]) == [t.trial_id for t in found.ranked()]  # finished, best first
    assert table["trial_id"].iloc[0] == found.best().trial_id and list(table["rank"]) == [1, 2]
    with (work / "export" / "trials.csv").open() as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert list(table.columns) == list(next(iter(rows.values())).keys())
    for _, row in table.iterrows():
        assert float(rows[row["trial_id"]]["ibp_err"]) == row["ibp_err"]
        assert rows[row["trial_id"]]["param.lr"] == str(row["param.lr"])


def test_the_exported_best_config_retrains_to_the_same_numbers_and_verifies(example):
    names = example["names"]
    best = names["found"].best()
    assert names["metrics"]["ibp_err"] == best.value("ibp_err")
    assert names["metrics"]["clean_err"] == best.value("clean_err")
    errors = names["errors"]
    assert errors["n"] == 200 and set(errors) == {"n", "clean_err", "ibp_err", "pgd_err"}
    assert errors["clean_err"] <= errors["pgd_err"] <= errors["ibp_err"]  # PGD finds at most what IBP cannot rule out
    assert "refused: override lr=0.1" in example["stdout"]


CASES = {  # name: (API call, CLI argv); both must fail with the same message before anything runs
    "searched override": (lambda s: __import__("certtune").search("mnist_tiny", {"lr": 0.1}, storage=s),
                          lambda s: ["search", "mnist_tiny", "lr=0.1", "--storage", s]),
    "bad sample count": (lambda s: __import__("certtune").search("mnist_tiny", num_samples=0, storage=s),
                         lambda s: ["search", "mnist_tiny", "--num-samples", "0", "--storage", s]),
    "unknown objective": (lambda s: __import__("certtune").search("mnist_tiny", objective=["ibp_err", "x"], storage=s),
                          lambda s: ["search", "mnist_tiny", "--objective", "ibp_err,x", "--storage", s]),
    "report of nothing": (lambda s: __import__("certtune").report("nope", storage=s),
                          lambda s: ["report", "nope", "--storage", s]),
    "export top-k": (lambda s: __import__("certtune").export("nope", storage=s, top_k=0),
                     lambda s: ["export", "nope", "--top-k", "0", "--storage", s]),
    "train config": (lambda s: __import__("certtune").train(REPO / "configs" / "mnist_small.yaml", ["epochs=0"]),
                     lambda s: ["train", REPO / "configs" / "mnist_small.yaml", "epochs=0"]),
    "verify methods": (lambda s: __import__("certtune").verify(s, methods="ibp,nope"),
                       lambda s: ["verify", s, "--methods", "ibp,nope"]),
}


@pytest.mark.parametrize("case", CASES)
def test_api_errors_are_the_cli_errors(case, tmp_path):
    import certtune

    api_call, argv = CASES[case]
    with pytest.raises(certtune.ConfigError) as raised:
        api_call(str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "tuner.cli", *map(str, argv(str(tmp_path)))], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stderr.strip() == f"certtune: error: {' '.join(str(raised.value).split())}"
    assert list(tmp_path.iterdir()) == []  # nothing written by either


def test_a_dict_space_is_checked_like_a_file(tmp_path):
    import certtune

    with pytest.raises(certtune.ConfigError, match=r"api-space: param 'lr': unknown type 'nope'"):
        certtune.search({"base": {"dataset": "mnist"}, "params": {"lr": {"type": "nope"}}}, storage=tmp_path)
    with pytest.raises(certtune.ConfigError, match=r"space: a dict space holds plain YAML values only"):
        certtune.search({"base": {"lr": object()}}, storage=tmp_path)


def test_the_wheel_installs_only_the_layouts_packages(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "data", "build", "*.egg-info",
                                                              "__pycache__", "wandb"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("certtune-*.whl"))
    top = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert top - {n for n in top if n.endswith(".dist-info")} == {"certtune", "trainers", "tuner", "search_spaces"}
