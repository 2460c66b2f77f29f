"""bench/search_pays.py's fidelity study at a tiny size on real MNIST, so the full-scale run cannot rot: every
point trains at the target run and each fidelity (resuming skips what finished), and collect writes the rank
correlations and the costs, computed from the runs' configs."""
import json
import shutil

import pytest

from bench.search_pays import main, run_dir, spearman


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3): ties share their mean rank
    assert spearman([0.1, 0.2, 0.2, 0.3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_fidelity_study_at_a_tiny_size(tmp_path, data_dir):
    common = ["--eps", "0.1", "--configs", "3", "--space", "mnist_tiny", "--fidelities", "today:300,subset:300,epochs:3",
              "--work", str(tmp_path), "--data-dir", str(data_dir), "data.subset=900", "data.val_size=300"]
    main(["fidelity", "--worker", "1", "--workers", "2", *common])  # point 1 only
    assert (run_dir(tmp_path, 0.1, 1, "target") / "last.pt").is_file()
    assert not run_dir(tmp_path, 0.1, 0, "target").exists()
    main(["fidelity", *common])  # the rest; point 1 is skipped as finished
    out = tmp_path / "f.json"
    main(["fidelity-collect", *common, "--out", str(out)])
    result = json.loads(out.read_text())
    full = 60_000 - 300  # MNIST's training split less the validation images
    assert result["points"] == [0, 1, 2] and result["target_cost_full_data_epochs"] == round(6 * 900 / full, 2)
    costs = {k: v["cost_full_data_epochs"] for k, v in result["fidelities"].items()}
    assert costs == {"today:300": round(6 * 300 / full, 2), "subset:300": round(6 * 300 / full, 2),
                     "epochs:3": round(3 * 900 / full, 2)}
    for name in ("today:300", "subset:300", "epochs:3"):
        cfg = (run_dir(tmp_path, 0.1, 0, name) / "config.yaml").read_text()
        assert ("batch_size: 43" in cfg) == (name == "subset:300")  # 128 x 300/900, steps kept
        quality = result["fidelities"][name]
        assert quality["spearman"] is None or -1 <= quality["spearman"] <= 1
        errors = {int(i): v for i, v in result["val_ibp_err"].items()}
        pick = min(errors, key=lambda i: (errors[i][name], i))  # the point this fidelity ranks first
        assert quality["picks_point"] == pick
        assert quality["regret"] == round(errors[pick]["target"] - min(e["target"] for e in errors.values()), 4)

    # The results file outlives the runs (a later session's checkout has no bench_runs): a point it holds is
    # neither trained again nor dropped; one whose recorded parameters no longer match is left out.
    for run in tmp_path.glob("fidelity_eps0.1/p00_*"):
        shutil.rmtree(run)
    main(["fidelity", *common, "--out", str(out)])
    assert not run_dir(tmp_path, 0.1, 0, "target").exists()
    main(["fidelity-collect", *common, "--out", str(out)])
    assert json.loads(out.read_text()) == result
    tampered = {**result, "point_params": {**result["point_params"], "0": {"lr": 123.0}}}
    out.write_text(json.dumps(tampered))
    main(["fidelity-collect", *common, "--out", str(out)])
    assert json.loads(out.read_text())["points"] == [1, 2]


def test_search_arms_retrain_and_collect_at_a_tiny_size(tmp_path, data_dir, ray_shut_down_after):
    """Both arms search at the same budget in full-data epochs, which is the search's own --max-trial-epochs (9
    trial-epochs here: a trial of 3 epochs on 600 of 59,700 images costs 0.03 full-data epochs), with room for the
    re-evaluation of the best point and the defaults; the best point retrains at the target run, collect certifies
    it on test and writes the issue's entries and the plot."""
    common = ["--work", str(tmp_path / "runs"), "--data-dir", str(data_dir), "--space", "mnist_tiny",
              "--steps", str(tmp_path / "steps.json"), "data.subset=600", "data.val_size=300"]
    for arm in ("certtune", "random"):
        main(["search", "--arm", arm, "--eps", "0.1", "--budget", "0.1", "--fidelity", "epochs:3",
              "--reeval-top", "1", "--reeval-seeds", "1", "--concurrent", "2", *common])
    from tuner.results.experiment import load_search

    search = load_search("certtune_eps0.1_s0", str(tmp_path / "runs" / "searches"))
    assert search.record.max_trial_epochs == int(0.1 * 3 / (3 * 600 / 59_700)) == 9  # the budget, in trial-epochs
    assert search.record.num_samples == 4 * int(0.1 // (3 * 600 / 59_700)) == 12  # a bound the budget reaches first
    assert search.trial_epochs() <= 9 + 1 and search.reruns()  # two trials at a time: one epoch past it at most
    assert search.record.sampler == "tpe" and load_search("random_eps0.1_s0", str(tmp_path / "runs" / "searches")).record.sampler == "random"
    main(["retrain", "--arm", "certtune", "--eps", "0.1", "--seeds", "1000", *common, "data.test_subset=200"])
    out, plot = tmp_path / "pays.json", tmp_path / "pays.png"
    main(["collect", *common, "--out", str(out), "--plot", str(plot)])
    entries = [e for e in json.loads(out.read_text()) if e["arm"] == "certtune"]
    assert len(entries) == 1 and entries[0]["seed"] == 1000 and entries[0]["epochs"] == 6  # the target run
    assert set(entries[0]["test"]) == {"clean_err", "ibp_err", "crown_ibp_err", "pgd_err"}
    assert 0 < entries[0]["search_cost_epochs"] <= 0.1 + 600 / 59_700 + 1e-9 and plot.stat().st_size > 0
    paper = [e for e in json.loads(out.read_text()) if e["arm"] in ("paper-70", "paper-halved")]
    assert {e["arm"] for e in paper} == {"paper-70", "paper-halved"} and all(e["search_seed"] is None for e in paper)

    # A search the steps file does not hold yet (its session ended before it was recorded) goes on from its
    # experiment: nothing is trained again and its record is the same; one started with other settings is refused.
    steps = json.loads((tmp_path / "steps.json").read_text())
    recorded = steps.pop("random_eps0.1_s0 search")
    (tmp_path / "steps.json").write_text(json.dumps(steps))

    def random_search(reeval_seeds):
        return ["search", "--arm", "random", "--eps", "0.1", "--budget", "0.1", "--fidelity", "epochs:3",
                "--reeval-top", "1", "--reeval-seeds", reeval_seeds, "--concurrent", "2", *common]

    trained = sorted(p.name for p in (tmp_path / "runs" / "searches" / "random_eps0.1_s0").glob("trial_*"))
    with pytest.raises(SystemExit, match="started with other settings .*reeval_seeds 1 here, 2 now"):
        main(random_search("2"))
    main(random_search("1"))
    assert json.loads((tmp_path / "steps.json").read_text())["random_eps0.1_s0 search"]["output"] == recorded["output"]
    assert sorted(p.name for p in (tmp_path / "runs" / "searches" / "random_eps0.1_s0").glob("trial_*")) == trained

    # The steps file outlives the run directories (a later session has none): nothing is searched, trained or
    # certified again, and collect writes the same entries.
    shutil.rmtree(tmp_path / "runs")
    main(["search", "--arm", "certtune", "--eps", "0.1", "--budget", "0.1", "--fidelity", "epochs:3",
          "--reeval-top", "1", "--reeval-seeds", "1", "--concurrent", "2", *common])
    main(["retrain", "--arm", "certtune", "--eps", "0.1", "--seeds", "1000", *common, "data.test_subset=200"])
    assert not (tmp_path / "runs" / "searches").exists() and not (tmp_path / "runs" / "retrain").exists()
    again = tmp_path / "again.json"
    main(["collect", *common, "--out", str(again), "--plot", str(plot)])
    assert json.loads(again.read_text()) == json.loads(out.read_text())
