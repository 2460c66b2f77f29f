"""The search-quality benchmark's bookkeeping: best-so-far curves and the per-arm summary."""
from types import SimpleNamespace

from bench.search_quality import best_so_far, summary_rows


def trial(status, rows):
    return SimpleNamespace(status=status, history=[{"timestamp": t, "ibp_err": v} for t, v in rows])


def test_best_so_far_counts_every_epoch_and_only_finished_trials_can_be_best():
    search = SimpleNamespace(trials=[
        trial("finished", [(1, 0.9), (3, 0.5)]),           # finishes at trial-epoch 3 with 0.5
        trial("stopped", [(2, 0.1)]),                      # early-stopped: its 0.1 never counts
        trial("finished", [(4, 0.7), (5, 0.6), (6, 0.4)]),  # finishes at trial-epoch 6 with 0.4
    ])
    assert best_so_far(search) == [[3, 0.5], [6, 0.4], [6, 0.4]]


def test_summary_rows_average_over_seeds_per_eps_and_arm():
    def entry(arm, seed, val, test):
        return {"eps": 0.1, "arm": arm, "seed": seed, "budget": 64, "val_ibp_err": val, "trial_epochs": 64, "wall_s": 10.0,
                "trials": 8, "test": {"clean_err": 0.0, "ibp_err": test, "pgd_err": 0.0}}
    rows = summary_rows([entry("tpe", 0, 0.2, 0.3), entry("tpe", 1, 0.4, 0.5), entry("paper", 0, 0.6, 0.7)])
    assert [(r["arm"], r["budget"]) for r in rows] == [("paper", None), ("tpe", 64)]
    tpe = rows[1]
    assert tpe["seeds"] == 2 and abs(tpe["val_ibp_err"][0] - 0.3) < 1e-12
    assert abs(tpe["test_ibp_err"][0] - 0.4) < 1e-12 and abs(tpe["test_ibp_err"][1] - 0.1414213562) < 1e-9
