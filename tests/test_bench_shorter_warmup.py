"""bench/shorter_warmup.py at a tiny size on real MNIST, so the full-scale run cannot rot: each arm trains,
the search runs and exports its recipe, and collect writes the entries the issue asks for and a plot."""
import json
import os

import pytest

from bench.shorter_warmup import main

TINY = ["data.subset=256", "data.val_size=100", "data.test_subset=500", "eval.batch_size=100"]


def test_every_step_at_a_tiny_size(tmp_path, data_dir, capsys, monkeypatch, ray_shut_down_after):
    common = ["--work", str(tmp_path / "work"), "--data-dir", str(data_dir)]
    main(["paper", "--eps", "0.02", "--seed", "0", *common, *TINY, "epochs=3", "schedule.length=1",
          "lr_milestones=[2]"])
    # 12 epochs: the space's base ramp (10 epochs) must fit in the trials before --defaults shortens it
    main(["search", "--eps", "0.02", *common, "--trials", "2", "--trial-epochs", "12", "--subset", "256",
          "--defaults", "schedule.length=2", "data.val_size=100"])
    from tuner.space.record import read_record

    record = read_record(str((tmp_path / "work").resolve()), "search_eps0.02")
    assert record.space["defaults"]["schedule.length"] == 2  # the space searched has the changed defaults point
    main(["searched", "--eps", "0.02", "--seed", "0", "--epochs", "3", *common, *TINY])
    out, plot = tmp_path / "sw.json", tmp_path / "sw.png"
    (tmp_path / "work" / "paper_eps0.02_seed0.log").write_text("a run's log beside its directory\n")
    main(["collect", *common, "--out", str(out), "--plot", str(plot)])
    entries = {e["arm"]: e for e in json.loads(out.read_text())}
    assert set(entries) == {"paper", "searched"}
    assert entries["paper"]["epochs"] == 3 and entries["searched"]["epochs"] == 3
    for e in entries.values():
        assert e["eps"] == 0.02 and e["seed"] == 0
        assert set(e["test"]) == {"n", "clean_err", "ibp_err", "crown_ibp_err", "pgd_err"}
        assert e["test"]["n"] == 500 and e["test"]["ibp_err"] >= e["test"]["pgd_err"] >= e["test"]["clean_err"]
    cost = entries["searched"]
    assert 2 <= cost["search_trial_epochs"] <= 24 and cost["search_full_epoch_equivalents"] > 0
    assert plot.stat().st_size > 5000 and "| 0.02 | searched | 3 |" in capsys.readouterr().out

    # collect again: the same checkpoints keep their figures; a changed last.pt is verified again
    from tuner import api

    def verify_again(*args, **kwargs):
        raise RuntimeError("verified again")

    monkeypatch.setattr(api, "verify", verify_again)
    first = out.read_text()
    main(["collect", *common, "--out", str(out), "--plot", str(plot)])
    assert out.read_text() == first
    last = tmp_path / "work" / "paper_eps0.02_seed0" / "last.pt"
    os.utime(last, ns=(last.stat().st_atime_ns, last.stat().st_mtime_ns + 1_000_000_000))  # coarse clocks too
    with pytest.raises(RuntimeError, match="verified again"):
        main(["collect", *common, "--out", str(out), "--plot", str(plot)])
