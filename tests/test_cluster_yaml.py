"""ray_cluster.yaml passes Ray's own cluster-config validation, offline, and has the shape certtune needs.

Validation is what `ray up` does before touching a cloud: prepare_config (merge the provider's
defaults.yaml) then validate_config (jsonschema against ray/autoscaler/ray-schema.json plus Ray's
cross-field checks). Neither needs credentials or a network; the socket guard below proves it.
The workflow in the file's header (`ray up`, `ray job submit`, ..., `ray down`), which docs/search.md shows
too, is parsed by Ray's own CLI and certtune's (nothing runs); tests/test_ray_jobs.py runs the job part.
"""
from __future__ import annotations

import copy
import shlex
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


# ---- the workflow in the header and in docs/search.md: commands Ray's and certtune's CLIs accept -------------
DOC = CLUSTER_YAML.parent / "docs" / "search.md"


def joined_lines(lines: list[str]) -> list[list[str]]:
    """Shell lines (backslash continuations joined, comments dropped) split into argv lists."""
    commands, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        argv = shlex.split(pending + line, comments=True)
        pending = ""
        if argv:
            commands.append(argv)
    return commands


def yaml_workflow() -> list[list[str]]:
    lines = CLUSTER_YAML.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Run a search on it")) + 1
    block = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        block.append(line[4:])
    return joined_lines(block)


def doc_workflow() -> list[list[str]]:
    text = DOC.read_text()
    section = text[text.index("## On a Ray cluster"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    return joined_lines(block[:block.index("```")].splitlines())


def ray_command(argv: list[str]):
    """Parse `ray ...` with Ray's own click CLI (nothing runs); returns the parsed parameters."""
    import click
    from ray.scripts.scripts import cli

    command, args = cli, argv[1:]
    while isinstance(command, click.Group):
        name, args = args[0], args[1:]
        command = command.get_command(click.Context(command), name)
        assert command is not None, f"`ray` has no command {name!r}: {shlex.join(argv)}"
    return command.make_context(shlex.join(argv), list(args)).params


def certtune_command(argv: list[str]):
    from tuner.cli import build_parser

    return build_parser().parse_args(argv[1:])  # SystemExit (a test failure) on an unknown option


def test_header_and_doc_show_the_same_workflow():
    assert yaml_workflow() == doc_workflow()
    assert [a[:3] if a[:2] == ["ray", "job"] else a[:2] for a in yaml_workflow() if a[0] == "ray"] == [
        ["ray", "up"], ["ray", "dashboard"], ["ray", "job", "submit"], ["ray", "job", "logs"], ["ray", "down"]]


def test_readme_shows_commands_of_the_workflow():
    text = (CLUSTER_YAML.parent / "README.md").read_text()
    section = text[text.index("**On a Ray cluster**"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    commands = joined_lines([line.strip() for line in block[:block.index("```")].splitlines()])
    assert len(commands) >= 3 and all(c in yaml_workflow() for c in commands), commands


def test_every_workflow_command_parses():
    import tomllib

    from ray import __version__ as ray_version

    for argv in yaml_workflow():
        if argv[0] == "ray":
            params = ray_command(argv)
            if argv[1:3] == ["job", "submit"]:
                # The entrypoint after `--` is a certtune search; the job's RAY_ADDRESS names the cluster.
                entrypoint = list(params["entrypoint"])
                assert entrypoint[:2] == ["certtune", "search"] and "--address" not in entrypoint
                args = certtune_command(entrypoint)
                assert args.storage.startswith("s3://") and args.data_dir.startswith("/")
                assert params["working_dir"] == "."
            if "cluster_config_file" in params:
                assert params["cluster_config_file"] == CLUSTER_YAML.name
        elif argv[0] == "certtune":
            args = certtune_command(argv)
            assert args.storage.startswith("s3://")
        elif argv[:2] == ["pip", "install"]:
            extras = tomllib.loads((CLUSTER_YAML.parent / "pyproject.toml").read_text())["project"][
                "optional-dependencies"]
            assert "search" in extras and '-e .[search]' in shlex.join(argv).replace("'", "")
            assert f"ray[default]=={ray_version}" in argv  # the version the nodes install (setup_commands)
        else:
            raise AssertionError(f"unexpected command in the workflow: {shlex.join(argv)}")


def test_nodes_install_the_local_ray_version(raw):
    from ray import __version__ as ray_version

    assert f'"ray[default]=={ray_version}"' in " ; ".join(raw["setup_commands"])
