"""The study in Optuna's own storage, read back with Optuna itself; warm starts and enqueued points.

Two real searches on one local Ray instance with real MNIST trials (256 images, 2 epochs, one at a time):
- "first" keeps its study in SQLite (--optuna-storage sqlite:///...). Its space's defaults run first, then
  two --enqueue points: one with lr=1e30, which diverges (FAIL with the reason), and one that the
  trial-epoch budget stops after its first epoch (PRUNED). `optuna.load_study` shows the same trials and
  states as `certtune report` reads from Ray's files, with each param's real distribution and the resolved
  training config as user attrs;
- "warm" keeps its study in the default journal file and is warm-started from "first": its study starts
  with first's finished and pruned trials (not the failed one), marked as copied.
Resume after kill -9 of the driver is checked against the storage in tests/test_search_resume.py.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from raycluster import own_ray

from tuner.space.record import SearchError, read_record
from tuner.results.experiment import load_search, load_study
from tuner.run.driver import prepare_search, run_search
from tuner.study.journal import JOURNAL_FILE, WARM_START_FROM, distributions_at

REPO = Path(__file__).resolve().parents[1]
SPACE = {
    "base": {"dataset": "mnist", "model": "cnn_small", "eps": 0.02, "epochs": 2, "lr": 1.0e-3, "grad_clip": 0,
             "lr_milestones": [2], "schedule": {"start": 1, "length": 1},
             "data": {"subset": 256, "val_size": 100}, "eval": {"metrics": ["clean", "ibp"], "batch_size": 500}},
    "params": {"lr": {"type": "categorical", "choices": [1.0e-3, 2.0e-3, 1.0e30]},
               "reg.lambda0": {"type": "loguniform", "low": 0.1, "high": 1.0},
               "init": {"type": "categorical", "choices": ["ibp", "default"]}},
    "defaults": {"lr": 1.0e-3, "reg.lambda0": 0.5, "init": "ibp"},
}
DIVERGING = {"lr": 1.0e30, "reg.lambda0": 0.5, "init": "ibp"}
STOPPED = {"lr": 2.0e-3, "reg.lambda0": 0.2, "init": "default"}
STATE_OF = {"finished": TrialState.COMPLETE, "stopped": TrialState.PRUNED, "failed": TrialState.FAIL}


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def search(tmp: Path, data_dir, name: str, space: Path, **kwargs):
    record, storage = prepare_search(str(space), {}, name, kwargs.pop("num_samples", 3), 1, "cpu=1", "none",
                                     "ibp_err", str(tmp / "results"), None, None, str(data_dir), 0, **kwargs)
    run_search(record, storage)
    return record, storage


@pytest.fixture(scope="module")
def searches(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("optuna_storage")
    space = write_yaml(tmp / "space.yaml", SPACE)
    enqueue = write_yaml(tmp / "points.yaml", [DIVERGING, STOPPED])
    url = f"sqlite:///{tmp / 'db' / 'studies.db'}"
    with own_ray():
        # Budget 4 trial-epochs: defaults 2 epochs, the diverging point 1, the last stopped after 1.
        first, storage = search(tmp, data_dir, "first", space, optuna_storage=url, enqueue=str(enqueue),
                                max_trial_epochs=4)
        warm, _ = search(tmp, data_dir, "warm", space, num_samples=1, warm_start="first")
    return {"tmp": tmp, "space": space, "storage": storage, "url": url, "first": first, "warm": warm,
            "data_dir": str(data_dir)}


def same_as_report(study, storage: str, name: str) -> dict:
    """Every Ray trial `certtune report` reads appears once in the study, with the matching state."""
    report = load_search(name, storage)
    ours = [t for t in study.trials if WARM_START_FROM not in t.user_attrs]
    by_ray = {t.user_attrs["ray_trial_id"]: t for t in ours}
    assert len(by_ray) == len(ours) == len(report.trials)
    for trial in report.trials:
        t = by_ray[trial.trial_id]
        assert t.state == STATE_OF[trial.status], (trial.status, t.state)
        assert t.params == trial.params
        if t.state == TrialState.COMPLETE:
            assert t.values == [trial.value("ibp_err")]
        if t.state == TrialState.FAIL:
            assert t.user_attrs["fail_reason"] == f"diverged: {trial.diverged}"
    return by_ray


def test_sqlite_study_matches_the_report(searches):
    study = optuna.load_study(study_name="first", storage=searches["url"])
    assert read_record(searches["storage"], "first").study_storage == searches["url"]
    assert not (Path(searches["storage"]) / "first" / JOURNAL_FILE).exists()
    assert study.metric_names == ["ibp_err"]
    same_as_report(study, searches["storage"], "first")
    # Defaults first, then the enqueued points in order; one trial per state.
    assert [t.params for t in study.trials] == [SPACE["defaults"], DIVERGING, STOPPED]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    # Stopped by the budget after epoch 1, still in its ramp (epoch 2 is the first at target): no values.
    assert study.trials[2].intermediate_values == {} and list(study.trials[0].intermediate_values) == [1]
    space = load_search("first", searches["storage"]).space()
    for t in study.trials:
        # The distributions are the space's own (log-uniform stays log), and the resolved config is attached.
        assert t.distributions == distributions_at(space, t.params)
        assert t.distributions["reg.lambda0"] == optuna.distributions.FloatDistribution(0.1, 1.0, log=True)
        assert t.user_attrs["config.lr"] == t.params["lr"] and t.user_attrs["config.epochs"] == 2
        assert t.user_attrs["config.init"] == t.params["init"] and t.user_attrs["config.method"] == "fast"
    assert study.best_trial.number == 0


def test_warm_started_study_starts_with_the_earlier_finished_and_pruned_trials(searches):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = Path(searches["storage"]) / "warm" / JOURNAL_FILE
    study = optuna.load_study(study_name="warm", storage=JournalStorage(JournalFileBackend(str(journal))))
    copied = [t for t in study.trials if WARM_START_FROM in t.user_attrs]
    assert [t.state for t in copied] == [TrialState.COMPLETE, TrialState.PRUNED]  # the FAIL one is left out
    assert [t.params for t in copied] == [SPACE["defaults"], STOPPED]
    first = optuna.load_study(study_name="first", storage=searches["url"])
    assert copied[0].values == first.trials[0].values
    assert copied[1].intermediate_values == first.trials[2].intermediate_values
    assert [t.user_attrs["warm_start_trial"] for t in copied] == [0, 2]
    assert all("ray_trial_id" not in t.user_attrs for t in copied)
    # The new trials come after the copied ones (the defaults point first) and match the report.
    by_ray = same_as_report(study, searches["storage"], "warm")
    assert len(by_ray) == 1 and study.trials[2].params == SPACE["defaults"]
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]


def test_warm_start_from_an_incompatible_space_names_the_first_mismatch(searches):
    other = json.loads(json.dumps(SPACE))
    other["params"]["reg.lambda0"]["high"] = 2.0
    space = write_yaml(searches["tmp"] / "other.yaml", other)
    proc = subprocess.run([sys.executable, "-m", "tuner.cli", "search", str(space), "--name", "mismatch",
                           "--storage", searches["storage"], "--warm-start", "first",
                           "--data-dir", searches["data_dir"]], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                            "HOME": str(searches["tmp"])})
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "--warm-start first: param 'reg.lambda0' of its trial 0 was sampled from" in proc.stderr
    assert "high=2.0" in proc.stderr
    assert not (Path(searches["storage"]) / "mismatch").exists()  # refused before anything was written
    # The same study given as STORAGE#STUDY (an RDB URL here) is read the same way.
    with pytest.raises(SearchError, match="param 'reg.lambda0'"):
        prepare_search(str(space), {}, "mismatch", 1, 1, "cpu=1", "none", "ibp_err", searches["storage"], None,
                       None, searches["data_dir"], 0, warm_start=f"{searches['url']}#first")


@pytest.mark.parametrize("kwargs, message", [
    ({"warm_start": "nosuch"}, "no search named 'nosuch'"),
    ({"warm_start": "sqlite:////nonexistent/x.db#first"}, "SQLite file /nonexistent/x.db not found"),
    ({"optuna_storage": "postgresql://me:secret@localhost/db"}, "the URL holds a password"),
    ({"optuna_storage": "not a url"}, "is not a database URL"),
    ({"enqueue": "points_bad.yaml"}, "point 1: param 'reg.lambda0': 5 is outside [0.1, 1.0]"),
    ({"enqueue": "points_unknown.yaml"}, "point 1: param 'momentum': not in this space"),
])
def test_bad_study_inputs_are_one_line_errors(searches, kwargs, message):
    tmp = searches["tmp"]
    write_yaml(tmp / "points_bad.yaml", [{**SPACE["defaults"], "reg.lambda0": 5}])
    write_yaml(tmp / "points_unknown.yaml", [{**SPACE["defaults"], "momentum": 0.9}])
    if "enqueue" in kwargs:
        kwargs = {"enqueue": str(tmp / kwargs["enqueue"])}
    with pytest.raises(SearchError) as e:
        prepare_search(str(searches["space"]), {}, "bad", 1, 1, "cpu=1", "none", "ibp_err", searches["storage"],
                       None, None, searches["data_dir"], 0, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_experiment_from_before_the_storage_still_exports_and_says_why_it_has_no_study(searches, tmp_path):
    from tuner.results.export import export_search

    old = tmp_path / "results"
    shutil.copytree(Path(searches["storage"]) / "warm", old / "warm")
    (old / "warm" / JOURNAL_FILE).unlink()
    record = json.loads((old / "warm" / "certtune_search.json").read_text())
    for key in ("study_storage", "warm_start", "enqueue"):
        del record[key]  # a record written before these fields existed
    (old / "warm" / "certtune_search.json").write_text(json.dumps(record))
    summary = export_search("warm", str(old), tmp_path / "export", 5, None)
    assert (tmp_path / "export" / "best.yaml").is_file() and summary
    with pytest.raises(SearchError, match="predates certtune's Optuna storage"):
        load_study(old / "warm")


# ---- a killed driver: Ray's snapshot older than the storage (no Ray runtime needed) ---------------------
def finished(value: float) -> dict:
    return {"epoch": 2, "epochs": 2, "at_target": True, "ibp_err": value}


def test_restore_reconciles_a_snapshot_older_than_the_storage(tmp_path):
    """What a kill -9 can leave: trial `a` told after the last snapshot, trial `c` asked after it. The
    restored searcher tells nothing twice and hands `c`'s Optuna trial to the next new Ray trial."""
    from tuner.study.searcher import HonestOptunaSearch
    from tuner.space.search_space import SearchSpace
    from tuner.study.journal import open_journal

    space = SearchSpace.from_dict(SPACE, name="s")
    journal = tmp_path / JOURNAL_FILE

    def searcher():
        s = HonestOptunaSearch(space=space.define_by_run, metric="ibp_err", mode="min", seed=0,
                               storage=open_journal(journal), study_name="s")
        s.set_search_properties(None, None, {})
        return s

    before = searcher()
    before.suggest("a"), before.suggest("b")
    before.save(str(tmp_path / "snapshot.pkl"))  # Ray's last snapshot: a and b running
    c_params = before.suggest("c")
    before.on_trial_complete("a", finished(0.5))
    # The driver dies here. Ray restores a, b (a rerun ends at once) and asks for a new trial.
    after = HonestOptunaSearch()
    after.restore(str(tmp_path / "snapshot.pkl"))
    assert after.suggest("d") == c_params  # c's trial, taken over
    after.on_trial_complete("a", finished(0.5))  # Ray's rerun of a: ignored, a was told already
    after.on_trial_complete("b", finished(0.4))
    after.on_trial_complete("d", finished(0.3))
    study = optuna.load_study(study_name="s", storage=open_journal(journal))
    assert [(t.state, t.values, t.user_attrs["ray_trial_id"]) for t in study.trials] == [
        (TrialState.COMPLETE, [0.5], "a"), (TrialState.COMPLETE, [0.4], "b"), (TrialState.COMPLETE, [0.3], "d")]


def test_a_restored_searcher_does_not_draw_again_what_the_killed_driver_drew_after_its_snapshot(tmp_path):
    """Issue 21 §8: the sampler's random state is the snapshot's. Trial `c`, asked and told after the last
    snapshot, is finished in the storage; without reseeding, the restored searcher's next new trial drew c's
    params again (the same point trained twice, two COMPLETE trials)."""
    from tuner.study.searcher import HonestOptunaSearch
    from tuner.space.search_space import SearchSpace
    from tuner.study.journal import open_journal

    space = SearchSpace.from_dict(SPACE, name="s")
    before = HonestOptunaSearch(space=space.define_by_run, metric="ibp_err", mode="min", seed=0,
                                storage=open_journal(tmp_path / JOURNAL_FILE), study_name="s")
    before.set_search_properties(None, None, {})
    before.suggest("a")
    before.save(str(tmp_path / "snapshot.pkl"))
    c_params = before.suggest("c")
    before.on_trial_complete("c", finished(0.5))
    after = HonestOptunaSearch()
    after.restore(str(tmp_path / "snapshot.pkl"))
    assert after.suggest("d") != c_params


def test_a_trial_rays_newer_state_resumes_keeps_its_optuna_trial_and_is_not_trained_again(tmp_path):
    """Ray syncs its experiment state and the searcher's snapshot one after the other, so a kill can leave a
    state that knows trial `c` beside a snapshot that does not. Ray resumes `c` itself; it keeps its Optuna
    trial, and the next new trial `d` is a new point (before: `d` took over c's Optuna trial and trained its
    params again, and c's result then had no Optuna trial)."""
    from tuner.study.searcher import HonestOptunaSearch
    from tuner.space.search_space import SearchSpace
    from tuner.study.journal import open_journal

    space = SearchSpace.from_dict(SPACE, name="s")
    journal = tmp_path / JOURNAL_FILE
    before = HonestOptunaSearch(space=space.define_by_run, metric="ibp_err", mode="min", seed=0,
                                storage=open_journal(journal), study_name="s")
    before.set_search_properties(None, None, {})
    before.suggest("a")
    before.save(str(tmp_path / "searcher-state-x.pkl"))  # the searcher's snapshot: only a
    c_params = before.suggest("c")
    state = {"trial_data": [[json.dumps({"trial_id": t}), "{}"] for t in ("a", "c")]}  # Ray's newer state: a, c
    (tmp_path / "experiment_state-x.json").write_text(json.dumps(state))
    after = HonestOptunaSearch()
    after.restore(str(tmp_path / "searcher-state-x.pkl"))
    assert after.suggest("d") != c_params
    for trial_id, value in (("a", 0.5), ("c", 0.4), ("d", 0.3)):
        after.on_trial_complete(trial_id, finished(value))
    study = optuna.load_study(study_name="s", storage=open_journal(journal))
    assert [(t.state, t.values, t.user_attrs["ray_trial_id"]) for t in study.trials] == [
        (TrialState.COMPLETE, [0.5], "a"), (TrialState.COMPLETE, [0.4], "c"), (TrialState.COMPLETE, [0.3], "d")]
    assert study.trials[1].params == c_params


def test_a_torn_last_journal_line_is_cut_before_the_next_append(tmp_path):
    from tuner.study.journal import open_journal

    journal = tmp_path / JOURNAL_FILE
    optuna.create_study(study_name="s", storage=open_journal(journal)).add_trial(
        optuna.trial.create_trial(value=1.0))
    with open(journal, "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"x","study_id":0,"datet')  # a crash mid-write
    study = optuna.load_study(study_name="s", storage=open_journal(journal))
    study.add_trial(optuna.trial.create_trial(value=2.0))
    again = optuna.load_study(study_name="s", storage=open_journal(journal))
    assert [t.value for t in again.trials] == [1.0, 2.0]
