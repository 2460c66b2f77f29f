"""bench/methods_mnist.py at a tiny size on real MNIST: every step runs (train, search at equal compute,
collect), and what it records obeys the verifiers' order and soundness."""
import json

import pytest
import yaml

from bench.methods_mnist import main, paper_points

TINY = ["epochs=5", "data.subset=256", "data.val_size=100"]


def test_paper_points_are_the_spaces_seeds_one_per_method():
    configs = paper_points({"eps": 0.1})
    assert set(configs) == {"fast", "vanilla", "crown-ibp", "sabr", "mtl-ibp", "cc-ibp", "exp-ibp", "taps", "staps"}
    assert all(c["method"] == m and c["eps"] == 0.1 for m, c in configs.items())


@pytest.mark.parametrize("item, says", [("not_a_knob=1", "not_a_knob: not a param"),
                                        ("batch_size", "expected KEY=VALUE"), ("batch_size=100", "batch_size"),
                                        ("schedule.length=9", "schedule.length")])
def test_bad_defaults_are_one_line_before_anything_is_written(tmp_path, item, says):
    with pytest.raises(SystemExit, match=f"^--defaults: .*{says}"):
        main(["train", "--eps", "0.1", "--work", str(tmp_path), "--defaults", item])  # 8 epochs: ramp <= 6
    assert list(tmp_path.iterdir()) == []


def test_train_search_collect_at_a_tiny_size(tmp_path, data_dir, capsys, ray_shut_down_after):
    common = ["--eps", "0.02", "--work", str(tmp_path), "--data-dir", str(data_dir), "--defaults", "batch_size=64",
              *TINY]
    main(["train", *common, "--methods", "sabr"])
    # at this size an epoch's seconds are mostly noise (a loaded machine stopped every trial at a third): no cap
    main(["search", *common, "--max-trial-share", "1"])
    from tuner.space.record import read_record

    record = read_record(str((tmp_path / "searches").resolve()), "methods_eps0.02")
    assert record.space["defaults"]["batch_size"] == 64  # the search read the space train did
    with pytest.raises(SystemExit, match="trained with other batch_size"):  # not without the same flags
        main(["search", *[a for a in common if a not in ("--defaults", "batch_size=64")]])
    out, again = tmp_path / "methods.json", tmp_path / "again.json"
    sizes = ["--test-n", "80", "--strong-n", "60", "--bab-n", "8", "--bab-time-limit", "0.5"]
    main(["collect", *common, *sizes, "--out", str(out)])
    result = json.loads(out.read_text())
    kept = {p: p.stat().st_mtime_ns for p in tmp_path.glob("eps0.02/*/collect.json")}
    main(["collect", *common, *sizes, "--out", str(again)])  # kept per run: the same figures, not recomputed
    assert json.loads(again.read_text())["runs"] == result["runs"]
    assert len(kept) == 2 and all(p.stat().st_mtime_ns == t for p, t in kept.items())
    main(["collect", *common, *sizes[:-1], "0.4", "--out", str(again)])  # another size: figured again
    assert all(p.stat().st_mtime_ns != t for p, t in kept.items())
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"sabr", "search-best"}
    assert yaml.safe_load((tmp_path / "eps0.02" / "sabr" / "config.yaml").read_text())["batch_size"] == 64
    for r in runs.values():
        t, s, b = r["test"], r["strong"], r["bab"]
        assert (t["n"], s["n"], b["n"]) == (80, 60, 8)
        # verified sets are nested (CROWN within α-CROWN within BaB) and sound (nothing PGD breaks is verified)
        assert s["alpha_crown_err"] <= s["crown_err"] and b["bab_err"] <= b["alpha_crown_err"]
        assert min(t["ibp_err"], t["crown_ibp_err"]) >= t["pgd_err"] >= t["clean_err"]
        assert s["alpha_crown_err"] >= s["pgd_err"] >= s["clean_err"]
        assert s["verified_err"] <= s["alpha_crown_err"] and b["verified_err"] == b["bab_err"]
        assert r["config"]["batch_size"] == 64
    search = result["search"]
    assert search["cpu_seconds"] >= search["budget_cpu_seconds"] > 0  # it spent its budget (the last trial may pass it)
    assert search["trials"] >= 1 and "| sabr |" in capsys.readouterr().out
