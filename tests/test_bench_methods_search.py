"""bench/methods_search.py (issue 20's benchmark) at a tiny size on real MNIST: every step runs, the search gets
the baseline's seconds and selects by α-CROWN on validation, both winners are retrained on fresh seeds, and the
JSON has the issue's entries with sound, nested certificates."""
import json
import shutil

from bench.methods_search import RETRAIN_SEEDS, main

TINY = ["epochs=5", "data.subset=256", "data.val_size=60"]


def test_baseline_search_retrain_collect_at_a_tiny_size(tmp_path, data_dir, capsys, ray_shut_down_after):
    common = ["--eps", "0.02", "--work", str(tmp_path / "runs"), "--data-dir", str(data_dir), "--defaults",
              "batch_size=64", "--steps", str(tmp_path / "steps.json"), *TINY,
              # at this size an epoch's seconds are mostly noise: no cap, so the first trial can finish
              "--max-trial-share", "1"]
    # three methods: the search's budget (their seconds) holds its first trial (`fast`) on a loaded machine too
    main(["baseline", *common, "--methods", "fast,vanilla,crown-ibp"])
    main(["search", *common])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["budget_device_seconds"] > 0 and summary["trials"] >= 1
    assert 0 < summary["largest_trial_share"] <= 1.5  # one thread, one trial at a time: a trial may pass the end
    assert summary["selection"]["verifier"] == "alpha-crown"  # the winner was picked by α-CROWN on validation
    sizes = ["--test-n", "60", "--strong-n", "60", "--bab-n", "6", "--bab-time-limit", "0.5"]
    main(["retrain", *common, *sizes])
    out = tmp_path / "methods_search.json"
    main(["collect", *common, *sizes, "--out", str(out)])
    found = json.loads(out.read_text())
    assert sorted((e["arm"], e["seed"]) for e in found) == sorted(
        (arm, s) for arm in ("best-single", "search") for s in RETRAIN_SEEDS)
    single = {e["method"] for e in found if e["arm"] == "best-single"}
    assert len(single) == 1 and single <= {"fast", "vanilla", "crown-ibp"}
    for e in found:
        t = e["test"]
        assert set(t) == {"clean_err", "ibp_err", "alpha_crown_err", "bab_err", "pgd_err", "verified_err"}
        assert e["eps"] == 0.02 and e["device_seconds"] > 0
        # sound (nothing PGD breaks is verified) and nested (BaB starts from what the cheaper ones proved)
        assert t["bab_err"] <= e["alpha_crown_err_on_bab_images"]
        assert e["n"]["test"] == e["n"]["alpha_crown"] == 60  # the same images: PGD bounds both from below
        assert min(t["ibp_err"], t["alpha_crown_err"]) >= t["pgd_err"] >= t["clean_err"]
    printed = capsys.readouterr().out
    assert "| 0.02 | best-single |" in printed and "| 0.02 | search |" in printed
    # The steps file outlives the run directories (a later session has none): every step is found there, and
    # nothing is trained, searched or certified again.
    shutil.rmtree(tmp_path / "runs")
    main(["baseline", *common, "--methods", "fast,vanilla,crown-ibp"])
    main(["search", *common])
    main(["retrain", *common, *sizes])
    assert not (tmp_path / "runs" / "eps0.02").exists() and not (tmp_path / "runs" / "searches").exists()
    again = tmp_path / "again.json"
    main(["collect", *common, *sizes, "--out", str(again)])
    assert json.loads(again.read_text()) == found
    # Another certificate size is another step: collect finds no entry for it rather than mislabelled figures.
    main(["collect", *common, "--test-n", "50", "--strong-n", "60", "--bab-n", "6", "--out", str(again)])
    assert json.loads(again.read_text()) == []
    # The arm whose rungs rank by CROWN-IBP: its trials measure CROWN-IBP each epoch and the search ranks by it;
    # the winner is still picked by α-CROWN on validation, and collect then holds three arms.
    main(["search", *common, "--arm", "search-crown-ibp"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["search"] == "methods_search_crown_ibp_eps0.02" and summary["selection"]["verifier"] == "alpha-crown"
    from tuner.results.experiment import load_search
    search = load_search("methods_search_crown_ibp_eps0.02", str((tmp_path / "runs" / "searches").resolve()))
    assert search.record.objective == ["crown_ibp_err"]
    assert all("crown_ibp_err" in r for t in search.trials for r in t.history)
    main(["retrain", *common, *sizes, "--arms", "search-crown-ibp"])
    main(["collect", *common, *sizes, "--out", str(again)])
    assert {e["arm"] for e in json.loads(again.read_text())} == {"best-single", "search", "search-crown-ibp"}
