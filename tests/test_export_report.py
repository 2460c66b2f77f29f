"""`certtune export` and `certtune report` on a real Ray experiment.

One real Ray Tune run (local Ray, HonestOptunaSearch over the mnist_tiny space) for the module. Its points are
sampled from the space by a real Optuna study and enqueued; a synthetic trainable reports per-epoch metrics of
the trainer contract (ε from the real schedule of the trial's config) and ends each trial as its role says:
ran all epochs, returned early (as a scheduler stop leaves it), raised (Ray ERROR), or diverged (a last
result with `diverged` and NaN). The experiment is then copied under a second name whose search record
has two objectives, for the Pareto front.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

import optuna  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402
from raycluster import own_ray  # noqa: E402

from trainers.config import TrainConfig  # noqa: E402
from trainers.schedules import EpsSchedule, first_target_epoch  # noqa: E402
from tuner.results.export import export_search  # noqa: E402
from tuner.results.plots import param_importances, plot_importances  # noqa: E402
from tuner.space.record import read_space_file, space_with_overrides  # noqa: E402
from tuner.results.report import report_search  # noqa: E402
from tuner.results.experiment import ExportError, epoch_history, load_search, trial_status  # noqa: E402
from tuner.run.driver import trial_dirname  # noqa: E402
from tuner.study.searcher import HonestOptunaSearch  # noqa: E402

NAME = "exp"
MULTI = "exp_multi"
OVERRIDES = {"data.val_size": 300}
# How each sampled point's trial ends; `ibp`/`clean` are the final errors it would reach at its last epoch.
ROLES = [
    {"end": "finished", "ibp": 0.30, "clean": 0.10},
    {"end": "finished", "ibp": 0.25, "clean": 0.20},
    {"end": "stopped", "at": 3, "ibp": 0.02, "clean": 0.01},  # lowest value of all, but only 3 epochs
    {"end": "raise", "at": 2, "ibp": 0.20, "clean": 0.10},
    {"end": "finished", "ibp": 0.40, "clean": 0.05},
    {"end": "diverged", "at": 3, "ibp": 0.10, "clean": 0.10},
    {"end": "finished", "ibp": 0.35, "clean": 0.15},  # dominated by the first on both objectives
]
PNG_MIN_BYTES = 5000


def epoch_rows(cfg: TrainConfig, role: dict) -> list[dict]:
    """The metrics the trainer would report, epoch by epoch; errors fall linearly to the role's final values."""
    steps = math.ceil(cfg.data.subset / cfg.batch_size)
    schedule = EpsSchedule.from_config(cfg.schedule, cfg.eps, steps)
    rows, best = [], None
    for e in range(1, cfg.epochs + 1):
        ibp = role["ibp"] + 0.3 * (cfg.epochs - e) / cfg.epochs
        at_target = e >= first_target_epoch(cfg.schedule)
        best = min(best, ibp) if at_target and best is not None else (ibp if at_target else best)
        rows.append({"epoch": e, "epochs": cfg.epochs, "eps": schedule(e * steps - 1), "eps_target": cfg.eps,
                     "at_target": at_target, "loss": 2 * ibp, "loss_robust": 2 * ibp, "loss_reg": 0.0,
                     "clean_err": role["clean"] + 0.1 * (cfg.epochs - e) / cfg.epochs, "ibp_err": ibp,
                     "relu_active": 0.3, "relu_inactive": 0.5, "relu_unstable": 0.2, "bound_tightness": 0.1,
                     "time_epoch_s": 0.5, "samples_per_s": cfg.data.subset / 0.5, "lr": cfg.lr,
                     "train_seconds": 0.6 * e, "best_ibp_err": best})
    return rows


def make_trainable(plans: dict[float, tuple[dict, list[dict]]]):
    def trainable(config: dict) -> None:
        role, rows = plans[config["lr"]]
        for row in rows:
            if role["end"] == "raise" and row["epoch"] == role["at"]:
                raise RuntimeError(f"synthetic failure in epoch {row['epoch']}")
            if role["end"] == "stopped" and row["epoch"] > role["at"]:
                return
            if role["end"] == "diverged" and row["epoch"] == role["at"]:
                keep = ("epoch", "epochs", "eps_target", "at_target", "train_seconds")
                tune.report({**{k: row[k] for k in keep}, "diverged": "loss is nan", "ibp_err": math.nan,
                             "fail_reason": "diverged: loss is nan"})
                return
            tune.report(row)
    return trainable


def write_record(exp: Path, name: str, space_path: str, raw: dict, objective: list[str], data_dir) -> None:
    record = {"name": name, "space_path": space_path, "space": raw, "objective": objective,
              "modes": ["min"] * len(objective), "scheduler": "none", "num_samples": len(ROLES),
              "max_concurrent": 2, "resources_per_trial": {"cpu": 1, "gpu": 0}, "data_dir": str(data_dir),
              "overrides": OVERRIDES, "seed": 0, "wandb_project": None, "address": None}
    (exp / "certtune_search.json").write_text(json.dumps(record, indent=2))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, data_dir):
    storage = tmp_path_factory.mktemp("storage")
    space_path, raw = read_space_file("mnist_tiny")
    space = space_with_overrides(raw, OVERRIDES, space_path)
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7))
    points = [space.suggest(sampler.ask()) for _ in ROLES]
    configs = [space.to_train_config(p) for p in points]
    plans = {p["lr"]: (role, epoch_rows(cfg, role)) for p, cfg, role in zip(points, configs, ROLES)}
    assert len(plans) == len(ROLES)  # the trainable tells the trials apart by lr

    exp = storage / NAME
    exp.mkdir()
    write_record(exp, NAME, space_path, raw, ["ibp_err"], data_dir)
    # Ray workers cannot import this test module (tests/ is not on their path): ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with own_ray():
        searcher = HonestOptunaSearch(space=space.define_by_run, metric="ibp_err", mode="min",
                                      points_to_evaluate=points, seed=0)
        tune.Tuner(make_trainable(plans),
                   tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(ROLES), max_concurrent_trials=2,
                                               reuse_actors=True, trial_dirname_creator=trial_dirname),
                   run_config=tune.RunConfig(name=NAME, storage_path=str(storage), verbose=0)).fit()
    shutil.copytree(exp, storage / MULTI)
    write_record(storage / MULTI, MULTI, space_path, raw, ["ibp_err", "clean_err"], data_dir)

    by_lr = {p["lr"]: (p, cfg, role, plans[p["lr"]][1]) for p, cfg, role in zip(points, configs, ROLES)}
    out = tmp_path_factory.mktemp("exports")
    return {"storage": storage, "space": space, "by_lr": by_lr, "out": out,
            "single": export_search(NAME, str(storage), None, top_k=3),
            "multi": export_search(MULTI, str(storage), out / MULTI, top_k=10)}


def trials_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def finished_finals(experiment) -> dict[float, dict]:
    """lr → last reported row, for the trials that ran all epochs."""
    return {lr: rows[-1] for lr, (_, _, role, rows) in experiment["by_lr"].items() if role["end"] == "finished"}


def test_export_writes_every_file_into_the_experiment_by_default(experiment):
    single = experiment["single"]
    out = experiment["storage"] / NAME / "export"
    assert Path(single["out"]) == out
    names = {p.name for p in out.iterdir()}
    assert {"best.yaml", "trials.csv", "history.png", "importances.png", "schedules.png", "top_k"} <= names
    assert "pareto.csv" not in names and "pareto.png" not in names  # one objective
    assert sorted(p.name for p in (out / "top_k").iterdir()) == ["rank1.yaml", "rank2.yaml", "rank3.yaml"]
    assert single["best_yaml"] == str(out / "best.yaml") and len(single["top_k"]) == 3


def test_best_is_the_best_finished_trial_and_its_yaml_trains_as_is(experiment):
    finals = finished_finals(experiment)
    best_lr = min(finals, key=lambda lr: finals[lr]["ibp_err"])
    stopped = [rows[r["at"] - 1] for _, _, r, rows in experiment["by_lr"].values() if r["end"] == "stopped"]
    assert stopped[0]["ibp_err"] < finals[best_lr]["ibp_err"]  # the truncated value would have won
    best = experiment["single"]["best"]
    assert best["params"]["lr"] == best_lr and best["ibp_err"] == finals[best_lr]["ibp_err"]
    point, cfg, _, _ = experiment["by_lr"][best_lr]
    assert best["params"] == point
    exported = TrainConfig.from_yaml(experiment["single"]["best_yaml"])
    assert exported.to_dict() == cfg.to_dict() == experiment["space"].to_train_config(point).to_dict()
    assert exported.resolve().to_dict() == exported.to_dict()  # already resolved
    assert exported.data.val_size == OVERRIDES["data.val_size"]  # the search's base overrides are kept
    # top_k: the best finished trials in order of their final ibp_err, rank 1 = best.yaml
    ranked = sorted(finals, key=lambda lr: finals[lr]["ibp_err"])[:3]
    for lr, path in zip(ranked, experiment["single"]["top_k"]):
        assert TrainConfig.from_yaml(path).to_dict() == experiment["by_lr"][lr][1].to_dict()


def test_export_with_epochs_scales_the_best_recipe_and_keeps_best_yaml(experiment, tmp_path):
    written = export_search(NAME, str(experiment["storage"]), tmp_path, top_k=1, epochs=30)
    best = TrainConfig.from_yaml(written["best_yaml"])
    scaled = TrainConfig.from_yaml(tmp_path / "best_30ep.yaml")
    assert written["best_scaled_yaml"] == str(tmp_path / "best_30ep.yaml")
    assert best.to_dict() == TrainConfig.from_yaml(experiment["single"]["best_yaml"]).to_dict()  # unchanged
    f = 30 / best.epochs
    assert scaled.epochs == 30 and scaled.schedule.length == max(1, round(best.schedule.length * f))
    assert scaled.lr_milestones == [round(m * f) for m in best.lr_milestones]
    assert scaled.schedule.start == 1 + round((best.schedule.start - 1) * f)
    assert {k: v for k, v in scaled.to_dict().items() if k not in ("epochs", "schedule", "lr_milestones")} == \
        {k: v for k, v in best.to_dict().items() if k not in ("epochs", "schedule", "lr_milestones")}
    assert "scaled from" in (tmp_path / "best_30ep.yaml").read_text().splitlines()[2]
    export_search(NAME, str(experiment["storage"]), tmp_path, top_k=1)  # without --epochs: no stale scaled file
    assert not (tmp_path / "best_30ep.yaml").exists()
    with pytest.raises(ExportError, match="--epochs"):
        export_search(NAME, str(experiment["storage"]), tmp_path, epochs=0)


def test_trials_csv_has_one_row_per_trial_with_status_params_and_final_metrics(experiment):
    rows = trials_csv(Path(experiment["single"]["out"]) / "trials.csv")
    assert len(rows) == len(ROLES)
    names = experiment["space"].searched_names()
    assert {f"param.{n}" for n in names} <= set(rows[0])
    assert {"trial_id", "status", "epoch", "epochs", "eps", "clean_err", "ibp_err", "relu_unstable",
            "bound_tightness", "best_ibp_err", "train_seconds", "wall_seconds", "diverged", "error"} <= set(rows[0])
    expected_status = {"finished": "finished", "stopped": "stopped", "raise": "failed", "diverged": "failed"}
    by_lr = {float(r["param.lr"]): r for r in rows}
    assert set(by_lr) == set(experiment["by_lr"])
    for lr, (point, _, role, plan) in experiment["by_lr"].items():
        row = by_lr[lr]
        assert row["status"] == expected_status[role["end"]]
        for n in names:  # blank exactly where the param was inactive
            assert (row[f"param.{n}"] == "") == (n not in point)
        last = {"finished": plan[-1], "stopped": plan[role.get("at", 0) - 1], "raise": plan[0]}.get(role["end"])
        if last is not None:
            assert int(row["epoch"]) == last["epoch"] and float(row["ibp_err"]) == last["ibp_err"]
            assert float(row["wall_seconds"]) >= 0
        if role["end"] == "diverged":
            assert row["diverged"] == "loss is nan" and row["epoch"] == str(role["at"])
        elif role["end"] == "raise":
            assert "synthetic failure in epoch 2" in row["error"]
        else:
            assert row["diverged"] == row["error"] == ""
    finished = sorted((r for r in rows if r["status"] == "finished"), key=lambda r: float(r["ibp_err"]))
    assert [r["rank"] for r in finished] == [str(i) for i in range(1, len(finished) + 1)]
    assert all(r["rank"] == "" for r in rows if r["status"] != "finished")


def test_plots_are_real_images(experiment):
    import matplotlib.image

    for export in ("single", "multi"):
        plots = experiment[export]["plots"]
        assert len(plots) == (3 if export == "single" else 4)
        for path in plots:
            assert Path(path).stat().st_size > PNG_MIN_BYTES, path
            image = matplotlib.image.imread(path)
            assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500, (path, image.shape)
            assert image[..., :3].std() > 0.05  # not a blank canvas


def test_importances_come_from_the_finished_trials(experiment):
    search = load_search(NAME, str(experiment["storage"]))
    importances = param_importances(search, search.space(), search.ranked())
    assert set(importances) <= set(experiment["space"].searched_names()) and len(importances) >= 5
    assert math.isclose(sum(importances.values()), 1.0, rel_tol=1e-6)


def test_too_few_finished_trials_give_an_importance_image_that_says_so(experiment, tmp_path):
    import matplotlib.image

    search = load_search(NAME, str(experiment["storage"]))
    search.trials = [t for t in search.trials if t.status != "finished"] + search.ranked()[:2]
    path = plot_importances(search, search.space(), tmp_path / "importances.png")
    assert Path(path).stat().st_size > PNG_MIN_BYTES and matplotlib.image.imread(path).ndim == 3


def test_multi_objective_export_writes_exactly_the_pareto_front(experiment):
    out = experiment["out"] / MULTI
    rows = trials_csv(out / "trials.csv")
    finished = [(r["trial_id"], float(r["ibp_err"]), float(r["clean_err"])) for r in rows if r["status"] == "finished"]
    brute = {a[0] for a in finished
             if not any(b[1] <= a[1] and b[2] <= a[2] and (b[1] < a[1] or b[2] < a[2]) for b in finished)}
    front = trials_csv(out / "pareto.csv")
    assert {r["trial_id"] for r in front} == brute and len(front) == len(brute)
    assert 1 < len(brute) < len(finished)  # the roles make a real front: not everything, not one point
    assert (out / "pareto.png").stat().st_size > PNG_MIN_BYTES
    best = experiment["multi"]["best"]
    assert best["ibp_err"] == min(f[1] for f in finished) and best["trial_id"] in brute
    assert len(experiment["multi"]["top_k"]) == len(finished)  # top-k is capped by the finished trials


def test_report_counts_and_ranks_the_trials(experiment):
    text = report_search(NAME, str(experiment["storage"]))
    n = {s: sum(expected == s for expected in
                ({"raise": "failed", "diverged": "failed"}.get(r["end"], r["end"]) for r in ROLES))
         for s in ("finished", "stopped", "failed")}
    assert (f"{len(ROLES)} trials of {len(ROLES)} planned; {n['finished']} finished, {n['stopped']} stopped, "
            f"{n['failed']} failed, 0 running, 0 pending") in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    assert lines[header + 1].split()[:3] == ["1", experiment["single"]["best"]["trial_id"], "finished"]
    assert "stopped early" in text and "diverged: loss is nan" in text and "synthetic failure" in text
    assert sum(line.split()[2:3] == ["stopped"] for line in lines[header + 1:]) == n["stopped"]


@pytest.mark.parametrize("ray_status, last, expected", [
    ("TERMINATED", {"epoch": 6, "epochs": 6, "ibp_err": 0.2}, "finished"),
    ("RUNNING", {"epoch": 6, "epochs": 6, "ibp_err": 0.2}, "finished"),  # snapshot taken before it returned
    ("TERMINATED", {"epoch": 4, "epochs": 6, "ibp_err": 0.2}, "stopped"),
    ("TERMINATED", {"epoch": 4, "epochs": 6, "ibp_err": float("nan")}, "failed"),  # ASHA stops a NaN trial
    ("TERMINATED", {"epoch": 6, "epochs": 6}, "failed"),  # the objective was never reported
    ("TERMINATED", {"ibp_err": 0.2}, "failed"),  # cannot tell finished from stopped
    ("TERMINATED", {}, "failed"),
    ("ERROR", {"epoch": 6, "epochs": 6, "ibp_err": 0.2}, "failed"),
    ("RUNNING", {"epoch": 2, "epochs": 6, "diverged": "bounds are inf", "ibp_err": float("nan")}, "failed"),
    ("RUNNING", {"epoch": 2, "epochs": 6, "ibp_err": float("nan")}, "running"),  # not over yet
    ("PAUSED", {}, "running"),
    ("PENDING", {"epoch": 2, "epochs": 6, "ibp_err": 0.5}, "running"),  # waiting for a retry
    ("PENDING", {}, "pending"),
    (None, {"epoch": 2, "epochs": 6, "ibp_err": 0.5}, "running"),  # directory not yet in the state snapshot
])
def test_trial_status_rules(ray_status, last, expected):
    assert trial_status(ray_status, last, ["ibp_err"])[0] == expected


def test_a_retried_trial_keeps_one_result_per_epoch():
    rows = [{"epoch": 1, "v": "a"}, {"epoch": 2, "v": "a"}, {"epoch": 3, "v": "a"},
            {"epoch": 2, "v": "b"}, {"epoch": 3, "v": "b"}]  # retried from its epoch-1 checkpoint
    assert [(r["epoch"], r["v"]) for r in epoch_history(rows)] == [(1, "a"), (2, "b"), (3, "b")]
    restarted = rows[:3] + [{"epoch": 1, "v": "c"}]  # retried from scratch, one epoch so far
    assert [(r["epoch"], r["v"]) for r in epoch_history(restarted)] == [(1, "c")]


def test_export_reads_remote_storage_through_pyarrow(experiment, tmp_path):
    remote = export_search(NAME, "file://" + str(experiment["storage"]), tmp_path / "remote", top_k=2)
    assert remote["best"] == experiment["single"]["best"]
    assert Path(remote["best_yaml"]).read_text() == Path(experiment["single"]["best_yaml"]).read_text()
    assert (tmp_path / "remote" / "trials.csv").read_text() == \
        (Path(experiment["single"]["out"]) / "trials.csv").read_text()


def test_bad_input_is_one_clear_error(experiment, tmp_path):
    storage = experiment["storage"]
    with pytest.raises(ExportError, match=re.escape(f"{storage / 'nope'}: no certtune search there")):
        export_search("nope", str(storage), None)
    with pytest.raises(ExportError, match="no certtune search there"):
        report_search("nope", str(storage))
    with pytest.raises(ExportError, match="--top-k"):
        export_search(NAME, str(storage), tmp_path, top_k=0)
    # A search whose objective no trial reported: every trial failed, nothing to export.
    shutil.copytree(storage / NAME, tmp_path / "pgd", ignore=shutil.ignore_patterns("export"))
    record = json.loads((tmp_path / "pgd" / "certtune_search.json").read_text())
    (tmp_path / "pgd" / "certtune_search.json").write_text(json.dumps({**record, "objective": ["pgd_err"]}))
    with pytest.raises(ExportError, match=r"no trial ran all its epochs \(7 failed\)"):
        export_search("pgd", str(tmp_path), None)
    assert "0 finished, 0 stopped, 7 failed" in report_search("pgd", str(tmp_path))


def test_cli_report_and_export(experiment, tmp_path, capsys):
    from tuner.cli import main

    assert main(["report", NAME, "--storage", str(experiment["storage"])]) == 0
    assert f"search {NAME}: {len(ROLES)} trials of {len(ROLES)} planned" in capsys.readouterr().out
    assert main(["export", NAME, "--storage", str(experiment["storage"]), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out  # strict JSON: a one-seed standard error is null, not NaN
    summary = json.loads(printed, parse_constant=lambda c: pytest.fail(f"{c} in the printed summary"))
    assert summary["best"] and "NaN" not in printed
    assert TrainConfig.from_yaml(tmp_path / "cli" / "best.yaml").to_dict() == \
        TrainConfig.from_yaml(experiment["single"]["best_yaml"]).to_dict()
    assert main(["export", "nope", "--storage", str(experiment["storage"])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no certtune search there" in err


def test_report_and_export_build_the_space_once(experiment, tmp_path):
    # The space is parsed and validated once per process, however many readers ask for it (tuner/space/record.py).
    from tuner.space import record as record

    record._BUILT.clear()
    before = record.SPACE_BUILDS["count"]
    report_search(NAME, str(experiment["storage"]))
    export_search(NAME, str(experiment["storage"]), tmp_path / "again", top_k=3)
    report_search(NAME, str(experiment["storage"]))
    assert record.SPACE_BUILDS["count"] - before == 1
