"""Fuzzing configs and search spaces (issue 9): seeded mutations of valid files at every level (wrong types,
NaN/inf, huge numbers, long lists, unknown keys, hostile expressions) must either load as a valid, finite
config or fail with one short ConfigError line; nothing else may escape. A sample of the refused mutants
goes through the real CLI, which must say the same thing with exit code 2 and touch nothing."""
from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import pytest
import yaml

from test_hostile_input import assert_refused, certtune
from trainers.config import ConfigError, TrainConfig
from tuner.space.search_space import SearchSpace, SpaceError

REPO = Path(__file__).resolve().parents[1]
HOSTILE = [None, True, "x", "", -1, 0, 2**70, -(2**70), 1e308, -1e308, float("inf"), float("-inf"), float("nan"),
           1e-320, [], [1] * 50, [[1]], {}, {"unknown": 1}, "1e-3", "!!python/object:os.system"]
HOSTILE_EXPRESSIONS = ["max([1]*100000000)", "[1]*10**12", "1e308*10", "((10**64)**64)**64", "__import__('os')",
                       "lr.__class__", "(lambda: 1)()", "[x for x in [1]]", "'a' * 10", "1/0", "(" * 300 + ")" * 300,
                       "epochs ** 100", "min()", "round(1, 2, 3)", "lr if lr else"]


def node_paths(tree, prefix=()):
    """Every path into a nested dict/list config: the mapping levels and each leaf."""
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from node_paths(value, prefix + (key,))


def get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def mutate(tree: dict, rng: random.Random, values: list) -> tuple[dict, str]:
    tree = copy.deepcopy(tree)
    path = rng.choice(list(node_paths(tree)))
    target = get(tree, path)
    kind = rng.choice(["replace", "replace", "unknown", "delete"]) if path else "unknown"
    if kind == "unknown" or (kind == "delete" and not path):
        node = target if isinstance(target, dict) else get(tree, path[:-1])
        node[f"zz_{rng.randrange(1000)}"] = rng.choice(values)
    elif kind == "delete":
        del get(tree, path[:-1])[path[-1]]
    else:
        get(tree, path[:-1])[path[-1]] = rng.choice(values)
    return tree, f"{kind} {'.'.join(map(str, path)) or '<root>'}"


def one_line(e: Exception) -> None:
    text = str(e)
    assert "\n" not in text and 0 < len(text) < 600, text[:2000]


def all_finite(tree) -> bool:
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, list):
        return all(all_finite(v) for v in tree)
    if isinstance(tree, float):
        return math.isfinite(tree)
    if isinstance(tree, int):
        return abs(tree) <= 10**12
    return True


def fuzz_configs(n: int, seed: int = 0):
    valid = TrainConfig.from_yaml(REPO / "configs/mnist_small.yaml").resolve().to_dict()
    rng = random.Random(seed)
    for _ in range(n):
        raw, what = mutate(valid, rng, HOSTILE)
        try:
            cfg = TrainConfig.from_dict(raw).resolve()
        except ConfigError as e:
            one_line(e)
            yield raw, what, str(e)
            continue
        except Exception as e:  # noqa: BLE001 - the point: nothing but ConfigError may escape
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
        assert all_finite(cfg.to_dict()), what
        yield raw, what, None


def test_fuzzed_configs_load_or_fail_with_one_line():
    outcomes = list(fuzz_configs(600))
    refused = [o for o in outcomes if o[2] is not None]
    assert 0.5 * len(outcomes) < len(refused) < len(outcomes)  # the mutations do reach both sides


def test_fuzzed_spaces_load_or_fail_with_one_line():
    valid = yaml.safe_load((REPO / "search_spaces/mnist_tiny.yaml").read_text())
    rng = random.Random(1)
    refused = 0
    start = time.monotonic()
    for _ in range(400):
        raw, what = mutate(valid, rng, HOSTILE + HOSTILE_EXPRESSIONS)
        try:
            SearchSpace.from_dict(raw, source="fuzz.yaml")
        except (SpaceError, ConfigError) as e:
            one_line(e)
            refused += 1
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
    assert refused > 100
    assert time.monotonic() - start < 120  # no mutant hangs the loader (`[1]*10**12` once took minutes)


def test_fuzzed_configs_through_the_cli(tmp_path):
    refused = [(raw, what, message) for raw, what, message in fuzz_configs(600) if message is not None]
    for i, (raw, what, message) in enumerate(refused[::len(refused) // 6][:6]):
        path = tmp_path / f"mutant{i}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        out = tmp_path / f"run{i}"
        # The field the in-process check named (the value may print differently after a YAML round trip).
        assert_refused(certtune("train", path, "--out", out), message.split(":")[0] + ":")
        assert not out.exists(), what


# ---- issue 21: state files and checkpoints read back --------------------------------------------------
STATE_VALUES = HOSTILE + [float("nan")] * 3 + ["2", -1000000, 10**30, [[[[[]]]]]]


def text_mutants(text: str, rng: random.Random, n: int):
    """Byte-level damage to a JSON text: cut anywhere, a byte changed, a span duplicated, deep brackets."""
    for _ in range(n):
        kind = rng.choice(["cut", "byte", "dup", "deep"])
        at = rng.randrange(len(text))
        if kind == "cut":
            yield text[:at]
        elif kind == "byte":
            yield text[:at] + rng.choice('{}[]",:0-eNI\\') + text[at + 1:]
        elif kind == "dup":
            yield text[:at] + text[at:at + rng.randrange(1, 40)] + text[at:]
        else:
            yield text[:at] + "[" * 5000 + text[at:]


def test_fuzzed_search_records_load_or_fail_with_one_line():
    from tuner.space.record import SearchError, SearchRecord

    valid = {"name": "s", "space_path": "s.yaml", "space": {"base": {}, "params": {}}, "objective": ["ibp_err"],
             "modes": ["min"], "scheduler": "none", "num_samples": 2, "max_concurrent": 1,
             "resources_per_trial": {"cpu": 1, "gpu": 0}, "data_dir": "/data", "seed": 0}
    rng = random.Random(2)
    refused = 0
    mutants = [json.dumps(mutate(valid, rng, STATE_VALUES)[0]) for _ in range(300)]
    mutants += list(text_mutants(json.dumps(valid), rng, 300))
    for text in mutants:
        try:
            record = SearchRecord.from_json(text, "certtune_search.json")
        except SearchError as e:
            one_line(e)
            assert "certtune_search.json" in str(e)
            refused += 1
            continue
        except Exception as e:  # noqa: BLE001 - nothing but a SearchError may escape
            pytest.fail(f"{text[:200]}: {type(e).__name__}: {e}")
        assert isinstance(record.objective, list) and isinstance(record.num_samples, int)
    assert refused > 250


def test_fuzzed_result_lines_parse_or_fail_with_one_line():
    from tuner.results.experiment import ExportError, parse_result_lines

    valid = "".join(json.dumps({"epoch": e, "epochs": 3, "ibp_err": 0.5, "clean_err": 0.1}) + "\n"
                    for e in (1, 2, 3))
    rng = random.Random(3)
    for text in text_mutants(valid, rng, 600):
        try:
            rows = parse_result_lines(text, "result.json")
        except ExportError as e:
            one_line(e)
            assert str(e).startswith("result.json: line ")
            continue
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{text[:200]!r}: {type(e).__name__}: {e}")
        for row in rows:  # what is read is what a trial reports: integer epochs, finite numbers
            assert all(isinstance(row[k], int) for k in ("epoch", "epochs") if k in row), row
            assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row


def test_fuzzed_yaml_nesting_and_size_fail_with_one_line():
    from trainers.safe_yaml import parse_yaml

    rng = random.Random(4)
    for _ in range(60):
        depth = rng.randrange(1, 3000)
        opener, closer = rng.choice([("[", "]"), ("{a: ", "}"), ("- ", "")])
        text = ("lr_milestones: " + opener * depth + "1" + closer * depth) if opener != "- " else \
            "".join("  " * i + "- \n" for i in range(depth))
        start = time.monotonic()
        try:
            parse_yaml(text, "fuzz.yaml")
            refused = False
        except ConfigError as e:
            one_line(e)
            assert "nesting deeper than 50" in str(e) and depth >= 48, (depth, str(e))
            refused = True
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"depth {depth} {opener!r}: {type(e).__name__}: {e}")
        assert refused or depth <= 51, depth
        assert time.monotonic() - start < 5
