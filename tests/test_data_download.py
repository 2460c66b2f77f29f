"""Data on first use, when it cannot be had: one line, exit 2, within seconds, nothing left behind.

The successful download (a first search fetching MNIST once from a loopback mirror) is in tests/test_api.py.
Here: no network (a host that does not resolve), a source that does not answer (bounded by the probe), and
a source serving files whose md5 is not torchvision's (refused: the download is checked, not trusted).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_mirror import build_gz, serve

REPO = Path(__file__).resolve().parents[1]
TRACEBACK = "Traceback"


def certtune(*args, **env) -> tuple[subprocess.CompletedProcess, float]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CERTTUNE_", "RAY_"))}
    environ.update(PYTHONPATH=str(REPO), **env)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tuner.cli", *map(str, args)], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - start


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and TRACEBACK not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("space, env, fragments", [
    ("mnist_tiny", {"CERTTUNE_MNIST_MIRROR": "http://certtune-no-such-host.invalid/mnist"},
     ["mnist data", "MNIST not found under", "cannot reach certtune-no-such-host.invalid"]),
    ("cifar10_eps2", {"CERTTUNE_CIFAR10_URL": "http://127.0.0.1:9/cifar-10-python.tar.gz"},
     ["cifar10 data", "CIFAR-10 not found under", "cannot reach 127.0.0.1", "Connection refused"]),
])
def test_offline_first_search_is_one_line_naming_dataset_path_and_the_npz_route(tmp_path, space, env, fragments):
    data = tmp_path / "new" / "data"  # does not exist: a download would create it
    proc, seconds = certtune("search", space, "--data-dir", data, "--storage", tmp_path / "results",
                             "--num-samples", 1, **env)
    line = one_line(proc)
    for text in fragments + [str(data), "before starting Ray", "data.npz=FILE", ".npz of uint8 images",
                             "CERTTUNE_MNIST_MIRROR", "--data-dir"]:
        assert text in line, (text, line)
    assert list(tmp_path.iterdir()) == []  # the folders made for the download are gone again; no experiment
    assert seconds < 240, seconds  # a hang guard only: imports take most of it on a busy machine; the network
    # part is timed on its own below




@pytest.mark.parametrize("source", ["unresolvable", "silent"])
def test_a_source_that_does_not_answer_fails_within_the_probe_timeout(tmp_path, monkeypatch, source):
    from trainers.config import DataConfig
    from trainers.data import PROBE_TIMEOUT_S, DataError, load_splits
    import torchvision.datasets  # noqa: F401 - imported before the clock starts (seconds on a busy machine)

    # silent: a server that takes the connection (the kernel's backlog) and never answers, a stalled mirror.
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:
        host = "certtune-no-such-host.invalid" if source == "unresolvable" else "127.0.0.1"
        port = 80 if source == "unresolvable" else silent.getsockname()[1]
        monkeypatch.setenv("CERTTUNE_MNIST_MIRROR", f"http://{host}:{port}/mnist/")
        start = time.monotonic()
        with pytest.raises(DataError, match=rf"download failed: cannot reach {re.escape(host)}: "):
            load_splits("mnist", tmp_path / "d", DataConfig(), seed=0)
        assert time.monotonic() - start < PROBE_TIMEOUT_S + 3
    assert not (tmp_path / "d").exists()


def test_a_mirror_serving_other_bytes_is_refused_by_md5(tmp_path, data_dir):
    build_gz(Path(data_dir) / "MNIST" / "raw", tmp_path / "mirror")  # our gzip: not the official files' md5s
    with serve(tmp_path / "mirror") as (url, requests):
        proc, _ = certtune("train", REPO / "configs" / "mnist_small.yaml", "--data-dir", tmp_path / "data",
                           "--out", tmp_path / "run", CERTTUNE_MNIST_MIRROR=url)
    assert requests == ["/train-images-idx3-ubyte.gz"]  # fetched through the env var's mirror, then refused
    *progress, line = proc.stderr.strip().splitlines()  # torchvision's download progress bar, then the error
    assert proc.returncode == 2 and line.startswith("certtune: error:") and TRACEBACK not in proc.stderr
    assert all("B/s" in p for p in progress), progress
    assert "download failed" in line and "corrupted" in line, line
    assert not (tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()
    assert not (tmp_path / "run").exists()
