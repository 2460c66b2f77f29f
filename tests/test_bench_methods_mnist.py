"""bench/methods_mnist.py at a tiny size on real MNIST: every step runs (train, search at equal compute,
collect), and what it records obeys the verifiers' order and soundness."""
import json

from bench.methods_mnist import main, paper_points

TINY = ["epochs=5", "data.subset=256", "data.val_size=100"]


def test_paper_points_are_the_spaces_seeds_one_per_method():
    configs = paper_points({"eps": 0.1})
    assert set(configs) == {"fast", "vanilla", "crown-ibp", "sabr", "mtl-ibp", "cc-ibp", "exp-ibp", "taps", "staps"}
    assert all(c["method"] == m and c["eps"] == 0.1 for m, c in configs.items())


def test_train_search_collect_at_a_tiny_size(tmp_path, data_dir, capsys, ray_shut_down_after):
    common = ["--eps", "0.02", "--work", str(tmp_path), "--data-dir", str(data_dir), *TINY]
    main(["train", *common, "--methods", "fast,sabr"])
    main(["search", *common])
    out = tmp_path / "methods.json"
    main(["collect", *common, "--test-n", "60", "--bab-n", "8", "--bab-time-limit", "0.5", "--out", str(out)])
    result = json.loads(out.read_text())
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"fast", "sabr", "search-best"}
    for r in runs.values():
        t, b = r["test"], r["bab"]
        assert t["n"] == 60 and b["n"] == 8
        # verified sets are nested (CROWN within α-CROWN within BaB) and sound (nothing PGD breaks is verified)
        assert t["alpha_crown_err"] <= t["crown_err"] and b["bab_err"] <= b["alpha_crown_err"]
        assert min(t["ibp_err"], t["crown_ibp_err"], t["alpha_crown_err"]) >= t["pgd_err"] >= t["clean_err"]
    search = result["search"]
    assert search["cpu_seconds"] >= search["budget_cpu_seconds"] > 0  # it spent its budget (the last trial may pass it)
    assert search["trials"] >= 1 and "| fast |" in capsys.readouterr().out
