"""Real wandb 0.31 offline runs are written, then read back with tests/wandb_offline.py."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import wandb

from wandb_offline import OfflineRunError, find_offline_runs, read_offline_run

FAKE_KEY = "certtunefakekey" + "x" * 25  # 40 chars, like a real key, and easy to grep for

RUNS = {
    "alpha": dict(group="sweep-a", config={"lr": 1e-3, "method": "fast", "schedule": {"length": 10, "mid": 0.25},
                                           "widths": [64, 128], "bn": True},
                  history=[{"loss": 2.5 / (i + 1), "ibp_err": 0.9 - 0.1 * i, "epoch": i + 1} for i in range(5)]),
    "beta": dict(group="sweep-a", config={"lr": 0.2, "method": "crown-ibp", "schedule": {"length": 3, "mid": 0.5},
                                          "widths": [], "bn": False},
                 history=[{"loss": 1.0 / 3 + i, "eps": [0.0, 0.5, 1.0][i], "stats": {"relu_active": 0.1 * i}}
                          for i in range(3)]),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Write the two runs offline, with every wandb directory and HOME inside tmp, and a fake API key set."""
    root = tmp_path_factory.mktemp("wb")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": root, "WANDB_SILENT": "true", "WANDB_API_KEY": FAKE_KEY,
           "WANDB_CONFIG_DIR": root / "config", "WANDB_CACHE_DIR": root / "cache", "WANDB_DATA_DIR": root / "data",
           "WANDB_ARTIFACT_DIR": root / "artifacts", "HOME": root / "home"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, str(v))
        wandb.teardown()  # forget settings from any earlier wandb use in this process
        ids = {}
        for name, spec in RUNS.items():
            run = wandb.init(project="certtune-test", group=spec["group"], name=name, config=spec["config"])
            for row in spec["history"]:
                run.log(row)
            run.summary["best_ibp_err"] = 0.123
            ids[name] = run.id
            run.finish()
        wandb.teardown()
    return root, ids


def test_runs_read_back_exactly(written):
    root, ids = written
    dirs = find_offline_runs(root)
    assert len(dirs) == 2  # `latest-run` symlink not counted twice
    runs = {r.name: r for r in map(read_offline_run, dirs)}
    assert set(runs) == set(RUNS)
    for name, spec in RUNS.items():
        run = runs[name]
        assert (run.id, run.project, run.group, run.exit_code) == (ids[name], "certtune-test", spec["group"], 0)
        assert run.config == spec["config"]
        assert [{k: v for k, v in row.items() if not k.startswith("_")} for row in run.history] == spec["history"]
        assert [row["_step"] for row in run.history] == list(range(len(spec["history"])))
        last = spec["history"][-1]
        assert {k: run.summary[k] for k in last} == last
        assert run.summary["best_ibp_err"] == 0.123


def test_api_key_never_written(written):
    root, _ = written
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".wandb" for p in files)
    leaked = [p for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []


def test_torn_tail_is_tolerated_and_corruption_is_not(written, tmp_path):
    root, _ = written
    src = next(p for d in find_offline_runs(root) for p in d.glob("run-*.wandb"))
    data = src.read_bytes()
    run_dir = tmp_path / "offline-run-x"
    run_dir.mkdir()
    torn = run_dir / src.name
    torn.write_bytes(data[:-3])  # killed mid-write: the exit record is cut
    run = read_offline_run(run_dir)
    assert run.exit_code is None and len(run.history) >= 3

    flipped = bytearray(data)
    flipped[data.index(b"sweep-a")] ^= 0xFF  # inside the run record's payload
    torn.write_bytes(bytes(flipped))
    with pytest.raises(OfflineRunError, match="CRC mismatch"):
        read_offline_run(run_dir)

    torn.write_bytes(b"not a wandb file")
    with pytest.raises(OfflineRunError, match="not a W&B run log"):
        read_offline_run(run_dir)


def test_values_are_plain_python(written):
    root, _ = written
    run = next(r for r in map(read_offline_run, find_offline_runs(root)) if r.name == "beta")
    assert run.history[1]["stats"] == {"relu_active": 0.1}
    assert math.isclose(run.history[0]["loss"], 1.0 / 3)
    assert isinstance(run.config["schedule"], dict) and run.config["widths"] == []
