"""Selection by the certificate users quote: `certtune search --select-by VERIFIER`.

A search ranks its trials by what they measured every epoch, usually the IBP-verified error on validation:
cheap, and loose for methods that α-CROWN or BaB certify far better (docs/benchmarks.md: by IBP `fast` wins;
by α-CROWN and BaB at ε = 0.1 the newer methods do). A user who will certify with α-CROWN wants the winner by
α-CROWN. So, when the trials have ended, the search certifies its top `select_top` points on the validation
split with that verifier (their best.pt, as `export --verify` does: tuner/results/rerank.py), every seed of a point
when it was re-evaluated (tuner/study/reeval.py), and picks the winner by the verified error, the mean over seeds.
The choice is written to `certtune_selection.json` in the experiment; `report` shows both figures, `export`
follows it, and the summary names it. The test split is never read here.
"""
from __future__ import annotations

import json
import math

from trainers.verifiers import metric_of
from tuner.space.record import SearchError, experiment_path, write_text
from tuner.study.reeval import Score
from tuner.results.rerank import RERANK_VERIFIERS, rerank
from tuner.results.experiment import SELECTION_FILE, Search
from tuner.study.verdict import FINISHED

MAX_TOP = 100


def check_selection(verifier: str | None, top, n) -> tuple[str | None, int, int | None]:
    """--select-by, --select-top and --select-n, checked (one line at the first problem)."""
    if verifier in (None, ""):
        return None, 0, None
    if verifier not in RERANK_VERIFIERS:
        raise SearchError(f"--select-by: {str(verifier)[:40]!r} is not one of {', '.join(RERANK_VERIFIERS)}")
    values = []
    for flag, value, low in (("--select-top", top, 1), ("--select-n", n, 1)):
        if value in (None, "") and flag == "--select-n":
            values.append(None)
            continue
        try:
            number = int(str(value).strip())
        except ValueError:
            raise SearchError(f"{flag}: must be a whole number >= {low}, got {str(value)[:40]!r}") from None
        if not low <= number <= (MAX_TOP if flag == "--select-top" else 10**7):
            raise SearchError(f"{flag}: must be a whole number >= {low}, got {number}")
        values.append(number)
    return verifier, values[0], values[1]


def select(search: Search, device: str = "cpu", options=None) -> dict | None:
    """Certify the search's top points with its --select-by verifier on validation; the selection, best first."""
    record = search.record
    points = search.ranked()[:record.select_top]
    if not record.select_by or not points:
        return None
    trials = [t for p in points for t in search.seeds_of(p) if t.status == FINISHED]
    verified = rerank(search, trials, record.select_by, None, record.select_n, options, device)
    by_point: dict[str, list] = {p.trial_id: [] for p in points}
    for v in verified:
        by_point[v.trial.config_of].append(v)
    metric = f"val_{metric_of(record.select_by)}"  # e.g. val_alpha_crown_err (trainers/verifiers.py)
    rows = []
    for rank, point in enumerate(points, 1):
        seeds = sorted(by_point[point.trial_id], key=lambda v: v.trial.seed_offset)
        score = Score.of([v.verifier_err for v in seeds])
        rows.append({"trial_id": point.trial_id, "search_rank": rank, metric: score.mean,
                     "se": None if math.isnan(score.se) else score.se, "seeds": score.n,
                     "feasible": search.feasible(point),
                     "per_seed": [{"trial_id": v.trial.trial_id, "seed_offset": v.trial.seed_offset,
                                   metric: v.verifier_err, "checkpoint": v.checkpoint} for v in seeds]})
    rows.sort(key=lambda r: (not r["feasible"], -r["seeds"], r[metric], r["search_rank"]))
    n = verified[0].result["n"] if verified else 0
    return {"verifier": record.select_by, "split": "val", "n": n, "metric": metric, "points": rows}


def select_and_record(search: Search, storage: str, device: str = "cpu") -> dict | None:
    """`select` and write its result into the experiment (SELECTION_FILE), for report and export."""
    chosen = select(search, device)
    if chosen is not None:
        write_text(f"{experiment_path(storage, search.record.name)}/{SELECTION_FILE}", json.dumps(chosen, indent=1) + "\n")
    return chosen


def selection_lines(search: Search) -> list[str]:
    """What report and the summary say about the selection (nothing without one)."""
    chosen = search.selection
    if not chosen or not chosen.get("points"):
        return []
    metric, first = chosen["metric"], chosen["points"][0]
    lines = [f"selected by {chosen['verifier']} on {chosen['n']} validation images (--select-by): trial "
             f"{first['trial_id']}, {metric} {first[metric]:.4f}, rank {first['search_rank']} in the search"]
    for row in chosen["points"]:
        se = f" ± {row['se']:.4f}" if row.get("se") is not None else ""
        lines.append(f"  {row['trial_id']}: {metric} {row[metric]:.4f}{se} ({row['seeds']} seed(s)), search rank "
                     f"{row['search_rank']}")
    return lines
