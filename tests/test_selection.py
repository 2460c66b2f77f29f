"""Selection by the certificate (--select-by, tuner/results/selection.py): a real small search on real MNIST certifies its
top points by α-CROWN on validation when its trials end, and a constructed case shows the winner changes when
the verifier says so: the search's best point gets a checkpoint that certifies nothing."""
import json

import pytest
import torch
import yaml

from tuner.results.selection import check_selection


def test_bad_selection_flags_are_one_line():
    from tuner.space.record import SearchError

    for args, says in [(("beta-crown", "3", None), "--select-by: 'beta-crown' is not one of"),
                       (("crown", "0", None), "--select-top: must be a whole number >= 1"),
                       (("crown", "2", "x"), "--select-n: must be a whole number >= 1")]:
        with pytest.raises(SearchError, match=says) as e:
            check_selection(*args)
        assert "\n" not in str(e.value)
    assert check_selection(None, "3", None) == (None, 0, None)
    assert check_selection("alpha-crown", "2", "50") == ("alpha-crown", 2, 50)


def test_the_search_selects_by_alpha_crown_and_a_broken_best_loses(data_dir, tmp_path, ray_shut_down_after):
    import certtune
    from trainers.checkpoint import load_checkpoint, save_checkpoint
    from tuner.results.export import export_search
    from tuner.results.report import report_search
    from tuner.results.experiment import SELECTION_FILE, load_search
    from tuner.results.selection import select_and_record

    storage = tmp_path / "st"
    certtune.search("mnist_tiny", {"eps": 0.01, "data.subset": 1000, "data.val_size": 300}, name="sel",
                    num_samples=2, max_concurrent=2, data_dir=str(data_dir), storage=str(storage),
                    scheduler="none", select_by="alpha-crown", select_top=2, select_n=50, echo=False)
    search = load_search("sel", str(storage))
    chosen = json.loads((storage / "sel" / SELECTION_FILE).read_text())
    assert chosen["verifier"] == "alpha-crown" and chosen["split"] == "val" and chosen["n"] == 50
    assert {p["trial_id"] for p in chosen["points"]} == {t.trial_id for t in search.ranked()}
    first, second = search.ranked()
    # the constructed case: the search's best point now holds a model with every weight zero (all margins 0:
    # nothing is verified), so by α-CROWN the second point must win
    for ckpt in (storage / "sel" / first.dirname).glob("checkpoint_*/best.pt"):
        state = load_checkpoint(ckpt)
        state["model"] = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in state["model"].items()}
        save_checkpoint({k: v for k, v in state.items() if k != "format"}, ckpt)
    chosen = select_and_record(load_search("sel", str(storage)), str(storage))
    assert chosen["points"][0]["trial_id"] == second.trial_id
    assert chosen["points"][1]["val_alpha_crown_err"] == 1.0 > chosen["points"][0]["val_alpha_crown_err"]
    search = load_search("sel", str(storage))
    assert search.selected().trial_id == second.trial_id and search.best().trial_id == first.trial_id
    text = report_search("sel", str(storage))
    assert f"selected by alpha-crown on 50 validation images (--select-by): trial {second.trial_id}" in text
    summary = export_search("sel", str(storage), out=tmp_path / "export")
    assert summary["best"]["trial_id"] == second.trial_id and summary["selection"]["verifier"] == "alpha-crown"
    best = (tmp_path / "export" / "best.yaml").read_text()
    assert "selected by the search's --select-by alpha-crown" in best and yaml.safe_load(best)["eps"] == 0.01
