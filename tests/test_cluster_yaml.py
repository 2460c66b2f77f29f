"""ray_cluster.yaml passes Ray's own cluster-config validation, offline, and has the shape certtune needs.

Validation is what `ray up` does before touching a cloud: prepare_config (merge the provider's
defaults.yaml) then validate_config (jsonschema against ray/autoscaler/ray-schema.json plus Ray's
cross-field checks). Neither needs credentials or a network; the socket guard below proves it.
"""
from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster config validation tried to open a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(cfg: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_file_passes_ray_validation(raw):
    prepared = ray_validate(raw)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_trials_land_on_gpu_workers(raw):
    types = ray_validate(raw)["available_node_types"]
    head = raw["head_node_type"]
    assert types[head]["resources"].get("CPU") == 0 and types[head]["max_workers"] == 0
    gpu_types = {name: t for name, t in types.items() if name != head and t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no worker node type advertises a GPU"
    for name, t in gpu_types.items():
        for key, value in t["resources"].items():
            assert isinstance(value, int) and not isinstance(value, bool), f"{name}.resources.{key} = {value!r}"
        assert t["resources"]["CPU"] >= 1 and t["max_workers"] >= 1


def test_nodes_install_certtune(raw):
    assert raw["file_mounts"].get("~/certtune") == "."
    setup = " ; ".join(raw["setup_commands"])
    assert 'pip install -e "$HOME/certtune[search]"' in setup
    assert 'ray[default]==' in setup  # nodes pin the Ray version of the launching machine


@pytest.mark.parametrize("break_it, message", [
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), "is not of type 'integer'"),
    (lambda c: c.update(gpu_count=1), "Additional properties are not allowed"),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("resources"), "'resources' is a required property"),
    (lambda c: c.update(head_node_type="nope"), "must be one of `available_node_types`"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=99), "smaller than the sum of `min_workers`"),
])
def test_validator_rejects_broken_variants(raw, break_it, message):
    broken = copy.deepcopy(raw)
    break_it(broken)
    with pytest.raises(Exception, match=message):
        ray_validate(broken)
