"""The GPU check (bench/gpu_check.py) at tiny sizes on the CPU, so that it cannot rot before a GPU is lent."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainers.bounds
from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
# A GPU machine may have only torch and torchvision: the check must not import any of these.
BLOCKED = ("yaml", "ray", "optuna", "wandb", "matplotlib", "pandas", "tqdm")


def test_tiny_cpu_run_writes_one_json_with_every_section_and_sound_bounds(tmp_path, data_dir):
    out = tmp_path / "gpu_check.json"
    code = (f"import sys; sys.modules.update(dict.fromkeys({BLOCKED!r})); "
            "from bench.gpu_check import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "--device", "cpu", "--tiny", "--out", str(out),
                           "--data-dir", str(data_dir), "--compile-methods", "natural"],
                          cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[gpu_check" in proc.stderr and "all checks passed" in proc.stderr  # progress lines on stderr
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["tiny"] is True
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert env["tf32"] == {"matmul": False, "cudnn": False}
    assert report["started_utc"] <= report["finished_utc"]
    assert set(report["wall_s"]) == {"soundness", "step_cost", "training", "compile", "total"}
    assert all(v > 0 for v in report["wall_s"].values())

    sound = report["soundness"]
    assert sound["passed"] is True
    assert set(sound["per_model"]) == {"cnn7", "wrn8", "resnext", "cnn_small"}
    cases = {(c["model"], c["mode"], c["bound"]) for c in sound["cases"]}
    assert len(cases) == 4 * 2 * 2  # every model kind, train and eval mode, IBP and CROWN-IBP
    for c in sound["cases"]:
        assert c["passed"] and 0 <= c["max_violation"] <= c["tolerance"] and c["mean_width"] > 0

    rows = {r["method"]: r for r in report["step_cost"]["rows"]}
    assert list(rows) == ["natural", "vanilla", "fast", "crown-ibp"]
    for r in rows.values():
        assert r["step_s"] > 0 and r["peak_mem_mb"] is None  # no per-step peak on the CPU
        assert r["ratio"] == pytest.approx(r["step_s"] / r["natural_step_s"], rel=1e-2)

    train = report["training"]
    assert train["train_images"] == 256 and train["config"]["method"] == "fast"
    assert train["config"]["dataset"] == "cifar10" and len(train["epochs"]) == 1
    assert train["s_per_epoch_50k"] == pytest.approx(train["s_per_epoch"] * 50_000 / 256, rel=1e-3)
    assert train["paper"]["s_per_epoch"] == 64.0 and train["paper"]["gpu"] == "RTX 2080 Ti"
    assert 0 <= train["val_after"]["ibp_err"] <= 1

    # torch.compile's path runs on the CPU too (one method here: compiling takes 5-220 s a method on this CPU)
    (row,) = report["compile"]["rows"]
    assert row["method"] == "natural" and "error" not in row, row
    assert row["matches_eager"] is True and row["grad_max_rel_diff"] < 1e-3  # same loss and gradients
    assert row["compile_s"] > 0 and row["eager_step_s"] > 0 and row["compiled_step_s"] > 0
    assert {s["method"] for s in report["compile"]["skipped"]} == set()


def broken_ibp_spec_layer(original):
    """IBP without its radius at the last layer: both bounds collapse to the center, which is unsound."""
    def spec_layer(layer, s, C):
        lower, upper = original(layer, s, C)
        mid = (lower + upper) / 2
        return mid, mid
    return spec_layer


def test_a_broken_bound_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.setattr(trainers.bounds, "ibp_spec_layer", broken_ibp_spec_layer(trainers.bounds.ibp_spec_layer))
    out = tmp_path / "broken.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--sections", "soundness",
                           "--models", "cnn_small"])
    assert code == 1
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["soundness"]["passed"] is False
    failed = {(c["mode"], c["bound"]) for c in report["soundness"]["cases"] if not c["passed"]}
    assert failed == {("train", "ibp"), ("eval", "ibp")}  # CROWN-IBP does not use the broken layer
    assert report["soundness"]["per_model"]["cnn_small"]["max_violation"] > 1e-3


@pytest.mark.parametrize("args, message", [
    (["--sections", "soundness,speed"], "--sections: unknown speed"),
    (["--compile-methods", "sabr"], "--compile-methods: unknown sabr"),
    (["--models", "vgg"], "--models: unknown vgg"),
    (["--device", "tpu"], "--device"),
    (["--data-dir", "/nonexistent/data"], "--data-dir: CIFAR-10 not found"),
    (["--budget-s", "0"], "--budget-s: must be > 0"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_compute(tmp_path, capsys, args, message):
    out = tmp_path / "x.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_check: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_missing_cuda_device_is_a_usage_error(tmp_path, capsys):
    # Without a GPU any cuda device is missing; with one, the device one past the last is.
    device, message = (f"cuda:{torch.cuda.device_count()}", "CUDA device(s)") if torch.cuda.is_available() \
        else ("cuda", "no CUDA device is available")
    assert gpu_check.main(["--device", device, "--out", str(tmp_path / "x.json")]) == 2
    assert message in capsys.readouterr().err
