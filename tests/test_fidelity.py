"""Fidelities (tuner/space/fidelity.py): a cheap trial is the target run compressed, and the trainer puts every phase
at the step the plan says (trainers/schedules.py StepPlan).

The property: for points sampled from every shipped space, at every fidelity, the ε warmup's end, the ramp's
end, the regularizer window's end and every LR decay fall at the same fraction of the run's steps as in the
target run, within one step; the subset fidelity keeps the step count too.
"""
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from trainers.config import ConfigError, TrainConfig
from trainers.schedules import EpsSchedule, StepPlan, first_target_epoch
from trainers.train import Trainer
from tuner.space.fidelity import Fidelity, compressed
from tuner.space.search_space import SpaceError, load_space

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted(p.stem for p in (REPO / "search_spaces").glob("*.yaml"))
TRAIN_IMAGES = {"mnist": 59_000, "cifar10": 49_000, "tinyimagenet": 99_000}  # full splits less a validation set


def plan(cfg: TrainConfig, train_images: int) -> StepPlan:
    images = cfg.data.subset or train_images
    return StepPlan.of(cfg, math.ceil(images / cfg.batch_size))  # the loader keeps the last partial batch


def phases(p: StepPlan) -> list[int]:
    return [p.ramp_start, p.ramp_end, p.reg_end, *p.lr_decays]


def sampled_points(space, n: int, seed: int) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = space.start_points()
    for _ in range(n):
        trial = study.ask()
        points.append(space.suggest(trial))
        study.tell(trial, 0.0)
    return points


def fidelities(target: TrainConfig, train_images: int) -> list[Fidelity]:
    images = target.data.subset or train_images
    out = [Fidelity("epochs", e) for e in {max(1, target.epochs // 4), max(1, target.epochs // 2)} if e < target.epochs]
    return out + [Fidelity("subset", n) for n in (images // 3, images // 2) if n >= 2]


@pytest.mark.parametrize("name", SPACES)
def test_every_fidelity_keeps_the_target_runs_shape_in_steps(name):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(name)
    checked = 0
    for point in sampled_points(space, 12, seed=len(name)):
        try:
            target = space.to_train_config(point)
        except SpaceError:
            continue  # a sampled combination the config rejects never trains
        images = TRAIN_IMAGES[target.dataset]
        goal = plan(target, images)
        for fidelity in fidelities(target, images):
            cfg = fidelity.trial_config(target, images)
            cheap = plan(cfg, images)
            for want, got in zip(phases(goal), phases(cheap)):
                # a phase past the run's end never happens in either
                expected = min(want, goal.total) / goal.total * cheap.total
                assert abs(min(got, cheap.total) - expected) <= 1, (name, point, str(fidelity), phases(goal), phases(cheap))
            assert cheap.total <= goal.total or fidelity.kind == "subset"
            if fidelity.kind == "subset":  # the same steps, each on a smaller batch
                assert abs(cheap.total - goal.total) <= cfg.epochs + 0.05 * goal.total, (name, str(fidelity))
                assert cfg.epochs == target.epochs and cfg.batch_size < target.batch_size
            else:
                assert cfg.epochs == fidelity.size and cfg.batch_size == target.batch_size
            checked += 1
    assert checked >= 12


def test_compression_by_hand():
    target = TrainConfig.from_dict({"epochs": 35, "lr_milestones": [25, 30],
                                    "schedule": {"start": 2, "length": 10}}).resolve()
    cfg = compressed(target, 7)
    # every phase times 7/35 = 0.2: warmup 1 epoch -> 0.2, ramp 10 -> 2, milestones 25, 30 -> 5, 6
    assert cfg.epochs == 7 and cfg.schedule.start == pytest.approx(1.2) and cfg.schedule.length == 2
    assert cfg.lr_milestones == [5, 6] and isinstance(cfg.lr_milestones[0], int)
    p = StepPlan.of(cfg, 100)
    assert (p.ramp_start, p.ramp_end, p.lr_decays, p.total) == (20, 220, (500, 600), 700)
    assert p.first_target_epoch == 4 == first_target_epoch(cfg.schedule)


def test_subset_scales_the_batch_to_keep_steps_by_hand():
    target = TrainConfig.from_dict({"batch_size": 256, "data": {"subset": 0}}).resolve()
    cfg = Fidelity.parse("subset:20000").trial_config(target, 55_000)
    assert cfg.data.subset == 20_000 and cfg.batch_size == round(256 * 20_000 / 55_000) == 93
    assert math.ceil(20_000 / 93) == 216 and math.ceil(55_000 / 256) == 215  # one step per epoch apart
    accum = TrainConfig.from_dict({"batch_size": 256, "grad_accum": 4}).resolve()
    assert Fidelity("subset", 20_000).trial_config(accum, 55_000).batch_size % 4 == 0


def test_the_target_fidelity_is_the_target_run():
    target = TrainConfig().resolve()
    assert Fidelity.parse("target").trial_config(target, 50_000) is target
    assert Fidelity("epochs", 10).cost(target) == pytest.approx(10 / 70)
    assert Fidelity("subset", 20_000).cost(target, 50_000) == pytest.approx(0.4)


@pytest.mark.parametrize("text", ["", "epochs", "epochs:", "epochs:0", "epochs:-3", "epochs:2.5", "subset:x",
                                  "target:3", "half", "epochs:9999999999"])
def test_bad_fidelity_text_is_one_line(text):
    with pytest.raises(ConfigError, match="--fidelity") as e:
        Fidelity.parse(text)
    assert "\n" not in str(e.value)


def test_a_fidelity_must_be_cheaper_than_the_target():
    target = TrainConfig.from_dict({"epochs": 8, "lr_milestones": [6], "schedule": {"length": 2},
                                    "data": {"subset": 1000}}).resolve()
    with pytest.raises(ConfigError, match="not fewer than the target run's 8 epochs"):
        Fidelity("epochs", 8).trial_config(target)
    with pytest.raises(ConfigError, match="not fewer than the target run's 1000 training images"):
        Fidelity("subset", 1000).trial_config(target, 50_000)


def test_a_space_names_its_fidelity_and_a_bad_one_is_one_line():
    raw = {"base": {"dataset": "mnist", "model": "cnn_small", "epochs": 8, "schedule": {"start": 1, "length": 2}},
           "params": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
    from tuner.space.search_space import SearchSpace
    assert str(SearchSpace.from_dict({**raw, "fidelity": "epochs:4"}).fidelity) == "epochs:4"
    assert str(SearchSpace.from_dict(raw).fidelity) == "target"
    # not cheaper than the target: refused by the search that would use it (test_cli_refuses_...), so a base
    # override with --fidelity target keeps the space usable
    assert str(SearchSpace.from_dict({**raw, "fidelity": "epochs:8"}).fidelity) == "epochs:8"
    with pytest.raises(SpaceError, match="fidelity"):
        SearchSpace.from_dict({**raw, "fidelity": {"kind": "epochs"}})


def test_the_trainer_follows_a_fractional_plan(data_dir):
    """A compressed run on real MNIST: the ramp ends, the regularizers stop and the LR decays mid-epoch, at the
    steps of the plan; the reported epochs say at_target and reg_on as the plan does."""
    cfg = TrainConfig.from_dict({"dataset": "mnist", "model": "cnn_small", "epochs": 3, "batch_size": 50,
                                 "lr": 1e-3, "lr_milestones": [2.5], "lr_decay": 0.1, "eps": 0.1,
                                 "schedule": {"start": 1, "length": 1.5},
                                 "data": {"subset": 200, "val_size": 100}, "eval": {"batch_size": 100}})
    trainer = Trainer(cfg, data_dir, None)
    p = trainer.plan
    assert (p.batches_per_epoch, p.ramp_end, p.lr_decays, p.first_target_epoch) == (4, 6, (10,), 3)
    assert trainer.eps_schedule == EpsSchedule.from_config(trainer.cfg.schedule, 0.1, 4)
    lrs = []
    trainer.train_step = record_lr(trainer.train_step, trainer, lrs)
    rows = []
    trainer.fit(on_epoch=lambda m, _: rows.append(m))
    assert lrs == [1e-3] * 10 + [pytest.approx(1e-4)] * 2
    assert [r["at_target"] for r in rows] == [False, False, True]
    assert [r["reg_on"] for r in rows] == [True, True, False]
    assert [r["lr"] for r in rows] == [1e-3, 1e-3, pytest.approx(1e-4)]
    assert rows[1]["eps"] == 0.1 and rows[0]["eps"] < 0.1  # the last batch of epoch 2 (step 7) is past step 6
    assert rows[2]["target_seconds"] > 0 and rows[1]["target_seconds"] == 0


def record_lr(step, trainer, lrs):
    def wrapped(x01, y):
        out = step(x01, y)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])  # the rate the step just used
        return out
    return wrapped


@pytest.mark.parametrize("args, says", [
    (["--fidelity", "epochs:6"], "not fewer than the target run's 6 epochs"),
    (["data.subset=300"], "subset:20000 is not fewer than the target run's 300 training images")])
def test_cli_refuses_a_fidelity_not_cheaper_before_ray(tmp_path, args, says):
    space = "mnist_tiny" if "--fidelity" in args else "mnist_short_warmup"  # the latter's own fidelity: subset:20000
    proc = subprocess.run([sys.executable, "-m", "tuner.cli", "search", space, *args, "--storage", str(tmp_path),
                           "--name", "f"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "f").exists()
