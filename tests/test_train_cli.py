"""The training loop on real MNIST: metrics, checkpoints, exact resume, the CLI, bad input, verify."""
import json
import subprocess
import sys

import pytest
import torch

from trainers.bounds import margin_spec
from trainers.config import ConfigError, TrainConfig
from trainers.evaluate import evaluate
from trainers.input_box import InputBox
from trainers.train import TIMING_METRICS, Trainer
from trainers.verify import load_model
from tuner.cli import main

SMALL = {"dataset": "mnist", "model": "cnn_small", "method": "fast", "eps": 0.1, "epochs": 3, "batch_size": 64,
         "lr": 1e-3, "lr_milestones": [3], "schedule": {"start": 1, "length": 1},
         "data": {"subset": 512, "val_size": 256}, "eval": {"metrics": ["clean", "ibp"], "batch_size": 256}}


def small_config(**overrides) -> TrainConfig:
    return TrainConfig.from_dict(SMALL).with_overrides(overrides)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["fast", "crown-ibp", "vanilla"])
def test_each_method_trains_and_reports_design_metrics(tmp_path, data_dir, method):
    cfg = small_config(method=method, epochs=2, **{"schedule.start": 1, "schedule.length": 1})
    final = Trainer(cfg, data_dir, tmp_path).fit()
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("eps", "loss", "loss_robust", "loss_reg", "clean_err", "ibp_err", "relu_active", "relu_inactive",
                "relu_unstable", "bound_tightness", "time_epoch_s", "samples_per_s"):
        assert key in final, key
    assert 0 <= final["ibp_err"] <= 1 and final["clean_err"] <= final["ibp_err"]
    assert rows[-1]["at_target"] and rows[-1]["eps"] == pytest.approx(0.1)
    assert (rows[0]["loss_reg"] > 0) == (method == "fast")
    assert (tmp_path / "last.pt").exists() and (tmp_path / "best.pt").exists()
    saved = TrainConfig.from_yaml(tmp_path / "config.yaml")
    assert saved == cfg.resolve()


def test_resume_after_crash_gives_identical_metrics(tmp_path, data_dir):
    cfg = small_config(**{"data.subset": 384})
    full = tmp_path / "full"
    Trainer(cfg, data_dir, full).fit()

    class Crash(Exception):
        pass

    def crash_after_first(metrics, _):
        if metrics["epoch"] == 1:
            raise Crash

    part = tmp_path / "part"
    with pytest.raises(Crash):
        Trainer(cfg, data_dir, part).fit(on_epoch=crash_after_first)
    assert len(read_metrics(part)) == 1
    Trainer(cfg, data_dir, part).fit()  # a new process would do exactly this
    drop = TIMING_METRICS
    strip = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(full)]
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(part)] == strip
    a = torch.load(full / "last.pt", weights_only=False)["model"]
    b = torch.load(part / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_config(tmp_path, data_dir):
    Trainer(small_config(epochs=1, **{"schedule.length": 1}), data_dir, tmp_path).fit()
    with pytest.raises(ValueError, match="different config"):
        Trainer(small_config(epochs=2, **{"schedule.length": 1}), data_dir, tmp_path).fit()


def test_trained_model_certificates_hold_against_pgd_and_samples(tmp_path, data_dir):
    """After brief training (real MNIST, fast method), every IBP- or CROWN-IBP-verified validation example
    survives PGD, and sampled points stay inside the bounds (evaluate raises UnsoundCertificateError)."""
    cfg = small_config(epochs=3, **{"data.subset": 1024})
    trainer = Trainer(cfg, data_dir, tmp_path)
    trainer.fit()
    model = trainer.model.eval()
    out = evaluate(model, trainer.val_loader, 0.1, trainer.box, 10, ("clean", "ibp", "crown-ibp", "pgd"),
                   pgd_steps=20, pgd_restarts=2)
    assert out["ibp_err"] < 1 and out["pgd_err"] <= min(out["ibp_err"], out["crown_ibp_err"])
    x01, y = next(iter(trainer.val_loader))
    x, lower, upper = trainer.box.box(x01[:32], 0.1)
    from trainers.bounds import crown_ibp_bounds, ibp_bounds
    C = margin_spec(y[:32], 10)
    gen = torch.Generator().manual_seed(0)
    for fn in (ibp_bounds, crown_ibp_bounds):
        lo, up = fn(model, lower, upper, C)
        with torch.no_grad():
            for _ in range(200):
                z = torch.where(torch.rand(x.shape, generator=gen) < 0.5, lower, upper)
                m = torch.einsum("bsk,bk->bs", C, model(z))
                assert (m >= lo - 1e-4).all() and (m <= up + 1e-4).all()


def test_cli_train_and_verify(tmp_path, data_dir, capsys):
    cfg_path = tmp_path / "c.yaml"
    small_config(epochs=2, **{"schedule.length": 1}).to_yaml(cfg_path)
    out = tmp_path / "run"
    assert main(["train", str(cfg_path), "--data-dir", str(data_dir), "--out", str(out), "data.subset=256",
                 "data.test_subset=1000", "eval.pgd_steps=5", "--no-progress"]) == 0
    assert TrainConfig.from_yaml(out / "config.yaml").data.subset == 256
    capsys.readouterr()
    assert main(["verify", str(out / "best.pt"), "--data-dir", str(data_dir), "--methods", "ibp,crown-ibp,pgd"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"n", "clean_err", "ibp_err", "crown_ibp_err", "pgd_err"}
    assert result["n"] == 1000  # data.test_subset of the real MNIST test set
    model, cfg = load_model(out / "best.pt")
    assert cfg.data.subset == 256 and not model.training
    assert main(["verify", str(out / "best.pt"), "--data-dir", str(data_dir), "--methods", "ibp",
                 "--split", "val"]) == 0
    val = json.loads(capsys.readouterr().out)
    assert set(val) == {"n", "clean_err", "ibp_err"} and val["n"] == 256


@pytest.mark.parametrize("args, message", [
    (["bogus=1"], "unknown config key 'bogus'"),
    (["eps=0"], "eps: must be > 0"),
    (["eps=-0.1"], "eps: must be > 0"),
    (["schedule.length=5"], "schedule.length: the ramp"),
    (["model=vgg"], "model: unknown value 'vgg'"),
    (["dataset=imagenet"], "dataset: unknown value 'imagenet'"),
    (["reg.bogus=1"], "unknown config key 'reg.bogus'"),
    (["lr=abc"], "lr: expected a number"),
    (["--data-dir", "/nonexistent/certtune-data"], "/nonexistent/certtune-data"),
])
def test_bad_input_is_one_line_exit_2_before_training(tmp_path, args, message):
    cfg_path = tmp_path / "c.yaml"
    small_config().to_yaml(cfg_path)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tuner.cli", "train", str(cfg_path), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "CERTTUNE_DATA": "/nonexistent/certtune-data"}
                          if "--data-dir" in args else None)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (out / "metrics.jsonl").exists()


def test_missing_config_file_and_checkpoint(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert main(["verify", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "nope.pt" in err


def test_config_round_trip_and_method_presets():
    cfg = TrainConfig.from_dict({"method": "crown-ibp"}).resolve()
    assert cfg.bound == "crown-ibp" and cfg.init == "default" and not cfg.reg.relu
    fast = TrainConfig.from_dict({"method": "fast"}).resolve()
    assert fast.init == "ibp" and fast.reg.relu and fast.reg.tightness and fast.bound == "ibp"
    custom = TrainConfig.from_dict({"method": "fast", "init": "default", "reg": {"relu": False}}).resolve()
    assert custom.init == "default" and not custom.reg.relu and custom.reg.tightness
    assert TrainConfig.from_dict(fast.to_dict()) == fast
    with pytest.raises(ConfigError, match="grad_accum"):
        TrainConfig.from_dict({"batch_size": 10, "grad_accum": 3}).resolve()


def test_gradient_accumulation_equals_the_full_batch_step_without_bn(data_dir, tmp_path):
    """Without BN the loss is a mean over examples, so two half-batches accumulate the full-batch gradient."""
    params = []
    for accum in (1, 2):
        cfg = small_config(bn="none", optimizer="sgd", grad_accum=accum, grad_clip=0.0,
                           **{"data.subset": 64, "reg.relu": False})
        trainer = Trainer(cfg, data_dir, None)
        x01, y = next(iter(trainer.train_loader))
        trainer.step = trainer.eps_schedule.s1  # at the target ε: the robust loss
        trainer.train_step(x01, y)
        params.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
