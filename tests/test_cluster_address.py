"""Which Ray a search joins (tuner/run/cluster.py): --address, RAY_ADDRESS, auto, local. No Ray is started.

`auto` without RAY_ADDRESS is not tested here: it asks Ray to look for any cluster on this machine, which
depends on what else runs on it. tests/test_ray_jobs.py runs the RAY_ADDRESS path on a real cluster.
"""
from __future__ import annotations

import contextlib
import json
import socket
import threading

import pytest

from tuner.run.cluster import AddressError, check_address, recorded_address, resolve_address, resume_flag

TINY = ["epochs=4", "data.subset=256", "data.val_size=100"]


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def listener(answer: bytes | None):
    """A TCP port on 127.0.0.1 whose server sends `answer` to each connection (None: says nothing)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def serve():
            with contextlib.suppress(OSError):
                while True:
                    connection, _ = server.accept()
                    if answer is not None:
                        connection.sendall(answer)
                    threading.Timer(10, connection.close).start()

        threading.Thread(target=serve, daemon=True).start()
        yield f"127.0.0.1:{server.getsockname()[1]}"


# What a gRPC server such as Ray's GCS sends first: an (empty) HTTP/2 SETTINGS frame.
GRPC_HELLO = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("flag, env, expected", [
    (None, None, None),                                   # plain local run: a fresh local instance
    ("", None, None),
    (None, "", None),                                     # an empty RAY_ADDRESS is unset, as for Ray
    (None, "10.0.0.5:6379", "10.0.0.5:6379"),             # `ray job submit` sets RAY_ADDRESS for the job
    ("auto", "10.0.0.5:6379", "10.0.0.5:6379"),           # auto: RAY_ADDRESS first, as ray.init does
    ("10.0.0.7:6380", "10.0.0.5:6379", "10.0.0.7:6380"),  # an explicit address wins over the environment
    ("local", "10.0.0.5:6379", None),                     # local: always a fresh instance
    (None, "local", None),
    ("ray://10.0.0.5:10001", None, "ray://10.0.0.5:10001"),
    ("[::1]:6379", None, "[::1]:6379"),
])
def test_resolve_address(monkeypatch, flag, env, expected):
    if env is not None:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert resolve_address(flag) == expected


@pytest.mark.parametrize("flag, env, message", [
    ("nohost", None, "--address nohost: expected auto, local or HOST:PORT"),
    ("10.0.0.5:port", None, "expected auto, local or HOST:PORT"),
    (None, "10.0.0.5", "RAY_ADDRESS=10.0.0.5: expected auto, local or HOST:PORT"),
    # The Jobs API address users export for `ray job submit` is not a cluster a driver can join.
    (None, "http://127.0.0.1:8265", "RAY_ADDRESS=http://127.0.0.1:8265: that is a Ray dashboard (Jobs API)"),
    ("auto", "https://ray.example.com", "ray job submit -- certtune search"),
])
def test_bad_addresses_say_which_setting_is_wrong(monkeypatch, flag, env, message):
    if env is not None:
        monkeypatch.setenv("RAY_ADDRESS", env)
    with pytest.raises(AddressError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_address(flag)


def test_unreachable_ray_address_names_the_variable(monkeypatch):
    port = closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(AddressError, match=f"RAY_ADDRESS=127.0.0.1:{port}: cannot reach a Ray cluster"):
        check_address(None)
    with pytest.raises(AddressError, match=f"--address 127.0.0.1:{port}: cannot reach"):
        check_address(f"127.0.0.1:{port}")
    assert check_address("local") is None  # nothing to reach


def test_an_address_that_answers_grpc_passes_the_check(monkeypatch):
    with listener(GRPC_HELLO) as address:
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert check_address(None) == address


@pytest.mark.parametrize("answer, fragment", [(None, "no HTTP/2 answer within 3 s"),
                                              (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not HTTP/2")])
def test_a_port_that_speaks_tcp_but_not_ray_fails_within_the_handshake_timeout(answer, fragment):
    with listener(answer) as address:
        with pytest.raises(AddressError, match=f"--address {address}: {address} answers TCP but not as a Ray "
                                               f"cluster .*{fragment}"):
            check_address(address)


@pytest.mark.parametrize("flag, env, expected", [
    (None, None, None),
    (None, "10.0.0.5:6379", "auto"),  # a job: the record says "a cluster", not the head's own view of it
    ("10.0.0.7:6380", "10.0.0.5:6379", "10.0.0.7:6380"),
    ("auto", None, "auto"),
    ("local", "10.0.0.5:6379", "local"),
])
def test_recorded_address(monkeypatch, flag, env, expected):
    if env is not None:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert recorded_address(flag) == expected


@pytest.mark.parametrize("flag, env, recorded, expected", [
    (None, None, None, None),                      # searched locally, resumed locally
    (None, None, "auto", "auto"),                  # searched as a job, resumed on the head: the cluster again
    (None, None, "10.0.0.5:6379", "10.0.0.5:6379"),
    (None, "10.0.0.9:6379", "10.0.0.5:6379", None),  # resumed as a job: RAY_ADDRESS (None resolves to it)
    ("local", "10.0.0.9:6379", "auto", "local"),   # the resume's own --address wins
    ("10.0.0.7:6380", None, "auto", "10.0.0.7:6380"),
])
def test_resume_flag(monkeypatch, flag, env, recorded, expected):
    if env is not None:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert resume_flag(flag, recorded) == expected


@pytest.mark.parametrize("env, expected", [
    ("127.0.0.1:{port}", "RAY_ADDRESS=127.0.0.1:{port}: cannot reach a Ray cluster"),
    ("http://127.0.0.1:8265", "that is a Ray dashboard (Jobs API) address"),
])
def test_search_with_a_bad_ray_address_is_one_line_and_exit_2(monkeypatch, tmp_path, data_dir, capsys, env,
                                                                expected):
    from tuner.cli import main

    port = closed_port()
    monkeypatch.setenv("RAY_ADDRESS", env.format(port=port))
    storage = tmp_path / "results"
    code = main(["search", "mnist_tiny", *TINY, "--num-samples", "1", "--storage", str(storage),
                 "--data-dir", str(data_dir)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected.format(port=port) in lines[0], lines
    assert not storage.exists()  # checked before anything was written


def test_a_local_search_records_no_address(tmp_path, data_dir):
    from tuner.run.driver import prepare_search

    record, storage = prepare_search("mnist_tiny", {"epochs": 4}, "loc", 1, 1, "cpu=1", "none", "ibp_err",
                                     str(tmp_path / "results"), None, None, str(data_dir), 0)
    assert record.address is None
    assert json.loads((tmp_path / "results" / "loc" / "certtune_search.json").read_text())["address"] is None


def test_a_search_in_a_job_asks_the_cluster_for_gpus_not_this_machine(monkeypatch, tmp_path, data_dir):
    # The failure: under `ray job submit` the driver runs on the head, which may have no GPU; a search
    # asking for more GPUs than the driver's machine has must go to the cluster, not be refused.
    import torch

    from tuner.run.driver import SearchError, prepare_search

    gpus = torch.cuda.device_count() + 1  # more than this machine has
    args = ("mnist_tiny", {"epochs": 4}, None, 1, 1, f"cpu=1,gpu={gpus}", "none", "ibp_err")
    with pytest.raises(SearchError, match="this machine has"):
        prepare_search(*args, str(tmp_path / "local"), None, None, str(data_dir), 0)
    with listener(GRPC_HELLO) as head:  # stands in for the cluster's GCS port (only the handshake is made)
        monkeypatch.setenv("RAY_ADDRESS", head)
        record, _ = prepare_search(*args, str(tmp_path / "job"), None, None, str(data_dir), 0)
    assert record.resources_per_trial["gpu"] == gpus and record.address == "auto"
