"""bench/search_pays.py's fidelity study at a tiny size on real MNIST, so the full-scale run cannot rot: every
point trains at the target run and each fidelity (resuming skips what finished), and collect writes the rank
correlations and the costs, computed from the runs' configs."""
import json

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
        rho = result["fidelities"][name]["spearman"]
        assert rho is None or -1 <= rho <= 1
