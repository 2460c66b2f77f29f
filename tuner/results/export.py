"""`certtune export`: a finished search → the best config as a YAML `certtune train` runs, the top-k configs,
a table of all trials, the Pareto front (several objectives) and plots. Guide: docs/export.md.

The search is read by tuner/results/experiment.py (plain files, no Ray runtime); the plots are tuner/results/plots.py. Only
trials that ran all their epochs are eligible as "best": an early-stopped trial's last value belongs to a
shorter budget (ray-project/ray#10113), and a diverged or errored one has none. The best is
`Search.best()`, the same trial the search summary and `report` name (ties: the earlier-created trial); with
--constraint it is the best trial satisfying every constraint, and the export says so when none does.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from trainers.files import UnsafeFileError, check_own_files, read_regular, write_atomic
from trainers.verifiers import per_epoch_metrics
from tuner.results.plots import plot_history, plot_importances, plot_pareto, plot_schedules
from tuner.space.record import is_uri, normalize_storage
from tuner.results.rerank import RERANK_VERIFIERS, rerank, verified_rows
from tuner.results.experiment import ExportError, Search, TrialResult, counts_text, load_search, seed_notes, seed_summary
from tuner.space.search_space import SearchSpace
from tuner.study.verdict import FINISHED

EXPORT_DIR = "export"
TOP_DIR = "top_k"
MANIFEST = ".certtune_export.json"  # in an export folder: the files that export wrote (claim_out_dir)
OUT_FILES = ("best.yaml", "trials.csv", "verified.csv", "pareto.csv", "history.png", "importances.png",
             "schedules.png", "pareto.png")  # written under these names by every export that needs them
# Final metrics in trials.csv, in this order (docs/method.md §5 names; those no trial reported are left out).
METRICS = ("epoch", "epochs", "eps", "loss", *per_epoch_metrics(), "relu_active",
           "relu_inactive", "relu_unstable", "bound_tightness", "best_ibp_err", "train_seconds")


# ---- Pareto front ------------------------------------------------------------------------------------
def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """a is no worse than b everywhere and better somewhere (values already signed for minimisation)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(search: Search) -> list[TrialResult]:
    """Finished trials no other finished trial dominates, best first objective first."""
    finished = search.ranked()
    n = len(search.objectives)
    points = {t.trial_id: search.sort_key(t)[1:n + 1] for t in finished}  # the objectives' means
    return [t for t in finished if not any(dominates(points[o.trial_id], points[t.trial_id]) for o in finished)]


# ---- export ------------------------------------------------------------------------------------------
def export_search(name: str, storage: str | None, out: Path | None = None, top_k: int = 5,
                  epochs: int | None = None, verify: str | None = None, verify_n: int | None = None,
                  verifier_options=None, data_dir: str | None = None, device: str = "cpu") -> dict:
    """Write best.yaml, top_k/rank<i>.yaml, trials.csv, pareto.csv (several objectives) and the plots into `out`
    (default `<storage>/<name>/export/`); with `epochs`, also best_<epochs>ep.yaml, the best recipe scaled to
    that many epochs. With `verify` (a verifier, tuner/results/rerank.py), the top-k trials' best checkpoints are
    certified by it on the validation split (its first `verify_n` examples) and best.yaml and top_k/ follow that
    ranking; verified.csv holds it. Returns the paths written and a summary of the best trial."""
    if verify is not None and verify not in RERANK_VERIFIERS:
        raise ExportError(f"--verify: {verify!r} is not one of {', '.join(RERANK_VERIFIERS)}")
    if verify_n is not None and (isinstance(verify_n, bool) or not isinstance(verify_n, int) or verify_n < 1):
        raise ExportError(f"--verify-n: must be an integer >= 1, got {verify_n!r}")
    if top_k < 1:
        raise ExportError(f"--top-k: must be an integer >= 1, got {top_k}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ExportError(f"--epochs: must be an integer >= 1, got {epochs!r}")
    if out is None and is_uri(normalize_storage(storage)):
        raise ExportError(f"search {name!r} is in remote storage {storage}; pass --out DIR")
    search = load_search(name, storage)
    ranked = search.ranked()
    if not ranked:
        raise ExportError(f"search {name!r}: no trial ran all its epochs ({counts_text(search) or 'no trials'}); "
                          "only finished trials are exported (early-stopped values are truncated)")
    space = search.space()
    out = Path(out) if out is not None else search.path / EXPORT_DIR
    earlier = claim_out_dir(out)  # before any work: a folder export may write into
    verified = None
    if verify is not None:
        verified = rerank(search, ranked[:top_k], verify, data_dir, verify_n, verifier_options, device)
        ranked = [v.trial for v in verified] + ranked[top_k:]
    notes = verified_notes(verified, verify)
    if verify is None and search.selection:  # the search's --select-by choice: its order first
        ranked, notes = selected_order(search, ranked)
    best = ranked[0]
    constraints = constraints_note(search, best)
    written = {"best_yaml": write_config(search, space, best, 1, out / "best.yaml", note=notes.get(best.trial_id))}
    if epochs is not None:
        written["best_scaled_yaml"] = write_config(search, space, best, 1, out / f"best_{epochs}ep.yaml", epochs)
    written["top_k"] = [write_config(search, space, t, i, out / TOP_DIR / f"rank{i}.yaml", note=notes.get(t.trial_id))
                        for i, t in enumerate(ranked[:top_k], 1)]
    if verified is not None:
        written["verified_csv"] = write_table(*verified_rows(verified, verify, search.objectives),
                                              out / "verified.csv")
    written["trials_csv"] = write_trials_csv(search, search.trials, out / "trials.csv")
    written["plots"] = [plot_history(search, out / "history.png"),
                        plot_importances(search, space, out / "importances.png"),
                        plot_schedules(search, space, best, out / "schedules.png")]
    if len(search.objectives) > 1:
        front = pareto_front(search)
        written["pareto_csv"] = write_trials_csv(search, front, out / "pareto.csv")
        written["plots"].append(plot_pareto(search, front, out / "pareto.png"))
    # an earlier export's files this one did not write again (other ranks, --epochs, --verify, objectives)
    record_export(out, [p for v in written.values() for p in (v if isinstance(v, list) else [v])], earlier)
    summary = {"out": str(out), **{k: _as_str(v) for k, v in written.items()}, "best": best_summary(search, best),
               **({"constraints": constraints} if constraints else {})}
    seeds = seed_summary(search) if verified is None else None  # a verifier's ranking has no seeds behind it
    if seeds is not None:
        summary["seeds"] = seeds
        summary["notes"] = seed_notes(seeds)
    if verify is None and search.selection:
        summary["selection"] = search.selection
    if verified is not None:
        summary["verified"] = {"verifier": verify, "split": "val", "n": verified[0].result["n"],
                               "ranking": [{"trial_id": v.trial.trial_id, "search_rank": v.search_rank,
                                            f"val_{verify}_err": v.verifier_err} for v in verified]}
    return summary


def selected_order(search: Search, ranked: list[TrialResult]) -> tuple[list[TrialResult], dict[str, str]]:
    """The points the search certified (--select-by), in its order, then the rest; and their header lines."""
    chosen = search.selection
    order = [row["trial_id"] for row in chosen["points"]]
    first = [t for i in order for t in ranked if t.trial_id == i]
    metric = chosen["metric"]
    notes = {row["trial_id"]: f"# selected by the search's --select-by {chosen['verifier']}: {metric} "
                              f"{row[metric]:.6g} on {chosen['n']} validation images ({row['seeds']} seed(s)); rank "
                              f"{i} of {len(order)} by it, rank {row['search_rank']} in the search"
             for i, row in enumerate(chosen["points"], 1)}
    return first + [t for t in ranked if t.trial_id not in order], notes


# ---- the --out folder: only what an export wrote is replaced or removed --------------------------------
def claim_out_dir(out: Path) -> list[str]:
    """Make `out` an export folder: created if missing, used if empty or written by an earlier export (its
    MANIFEST lists what it wrote), else refused in one line, so an export never overwrites or deletes a file
    it did not write. Returns the earlier export's files (relative names)."""
    if out.is_symlink() and not out.is_dir() or out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        entries = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    if not entries:
        return []
    if MANIFEST not in entries:
        raise ExportError(f"--out {out}: the folder is not empty and was not written by `certtune export` "
                          f"(no {MANIFEST}); export never replaces files it did not write: choose a new or empty "
                          f"folder")
    try:
        earlier = json.loads(read_regular(out / MANIFEST))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        earlier = None
    if not isinstance(earlier, list) or not all(isinstance(f, str) for f in earlier):
        raise ExportError(f"--out {out}: {MANIFEST} there is not an export manifest; choose a new or empty "
                          f"folder")
    top = out / TOP_DIR
    if top.is_symlink() or top.exists() and not top.is_dir():
        raise ExportError(f"--out {out}: {TOP_DIR} there is not a plain folder; export never writes through a "
                          f"link: remove it or choose a new folder")
    try:  # before writing anything: every name this export may write is absent or a plain file
        check_own_files(out, {*earlier, *OUT_FILES, MANIFEST})
    except UnsafeFileError as e:
        raise ExportError(f"--out: {e}") from None
    return earlier


def record_export(out: Path, paths: list, earlier: list[str]) -> None:
    """Write the MANIFEST of this export, then remove the earlier export's files it did not write again (a
    name that leaves `out` or is not a plain file or link is left alone)."""
    files = sorted(str(Path(p).relative_to(out)) for p in paths)
    write_atomic(out / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")
    for name in set(earlier) - set(files):
        stale = out / name
        if ".." in Path(name).parts or Path(name).is_absolute() or stale.is_dir() and not stale.is_symlink():
            continue
        stale.unlink(missing_ok=True)  # a link is removed itself, never its target


def verified_notes(verified, verifier: str | None) -> dict[str, str]:
    """trial id → the header line a --verify export adds to its YAML."""
    if not verified:
        return {}
    return {v.trial.trial_id: f"# {verifier}-verified error {v.verifier_err:.6g} on the first {v.result['n']} "
                              f"validation examples ({Path(v.checkpoint).name}); rank {i} of {len(verified)} "
                              f"by it, rank {v.search_rank} in the search" for i, v in enumerate(verified, 1)}


def constraints_note(search: Search, best: TrialResult) -> str | None:
    """What the constraints did to the choice of best (None without constraints)."""
    record = search.record
    if not record.constraints:
        return None
    feasible = sum(search.feasible(t) for t in search.ranked())
    if search.feasible(best):
        return (f"best is the best of the {feasible} finished trials satisfying every constraint "
                f"({', '.join(record.constraints)})")
    return (f"no finished trial satisfies every constraint ({', '.join(record.constraints)}); best is the best "
            f"finished trial regardless")


def best_summary(search: Search, trial: TrialResult) -> dict:
    scores = {o: search.score(trial, o) for o in search.objectives}
    return {"trial_id": trial.trial_id, **{o: trial.value(o) for o in search.objectives},
            **{f"{o}_mean": s.mean for o, s in scores.items()}, **{f"{o}_se": s.se for o, s in scores.items()},
            "seeds": scores[search.objectives[0]].n, "epochs": trial.last.get("epochs"), "params": trial.params,
            "finished_trials": search.counts()[FINISHED], "trials": len(search.trials)}


def write_config(search: Search, space: SearchSpace, trial: TrialResult, rank: int, path: Path,
                 epochs: int | None = None, note: str | None = None) -> str:
    """The trial's complete TrainConfig (space base + overrides + sampled + derived, resolved), as `train` reads
    it; with `epochs`, the same recipe scaled to that many epochs (TrainConfig.scaled_to)."""
    cfg = space.config_of(trial.params)
    values = ", ".join(f"{o}={trial.value(o):.6g}" for o in search.objectives)
    scores = [search.score(trial, o) for o in search.objectives]
    if scores[0].n > 1:
        values += "; over seeds: " + ", ".join(f"{o} {s.text(6)}" for o, s in zip(search.objectives, scores))
    run = (f"# reproduce: certtune train {path.name} --data-dir {search.record.data_dir}\n" if epochs is None else
           f"# scaled from {cfg.epochs} to {epochs} epochs (warmup, ramp and LR milestones keep their fractions);"
           f" the figures above are the {cfg.epochs}-epoch trial's\n"
           f"# train: certtune train {path.name} --data-dir {search.record.data_dir}\n")
    constraints = search.record.constraints
    verdict = "all satisfied" if search.feasible(trial) else "NOT all satisfied"
    ranking = (f"rank {rank} of {len(search.ranked())} points that ran all epochs" if note is None else
               f"rank {rank} of the top trials re-ranked by a verifier (below)")
    header = (f"# certtune export of search '{search.name}': {ranking}\n"
              f"# trial {trial.trial_id}: {values} (validation split, final epoch {trial.last.get('epoch')})\n"
              + (f"# constraints {', '.join(constraints)}: {verdict}\n" if constraints else "")
              + (f"{note}\n" if note else "")
              + run)
    path.parent.mkdir(exist_ok=True)  # top_k/ (claim_out_dir refused a link there)
    (cfg if epochs is None else cfg.scaled_to(epochs).resolve()).write_yaml(path, header)
    return str(path)


def metric_columns(trials: list[TrialResult], objectives: list[str]) -> list[str]:
    names = list(METRICS) + [o for o in objectives if o not in METRICS]
    return [n for n in names if any(n in t.last for t in trials)]


def trial_table(search: Search, trials: list[TrialResult]) -> tuple[list[str], list[list[Any]]]:
    """One row per trial: id, status, the rule that stopped it (Search.stop_rule), rank among finished (None if not
    finished), each searched param (None when inactive), final metrics, Ray's wall seconds, and why it failed.
    trials.csv and `certtune.report()` show it."""
    rank = {t.trial_id: i for i, t in enumerate(search.ranked(), 1)}
    params = search.searched_names()
    metrics = metric_columns(search.trials, search.objectives)
    constrained = bool(search.record.constraints)
    seeds = bool(search.record.reeval_top)
    objective = search.objectives[0]
    header = ["trial_id", "status", "stopped_by", "rank", *[f"param.{p}" for p in params], *metrics, "wall_seconds",
              *(["constraints_ok"] if constrained else []),
              *(["config_of", "seed_offset", f"{objective}_mean", f"{objective}_se", "seeds"] if seeds else []),
              "diverged", "error"]
    rows = [[t.trial_id, t.status, search.stop_rule(t), rank.get(t.trial_id), *[t.params.get(p) for p in params],
             *[t.last.get(m) for m in metrics], t.last.get("time_total_s"),
             *([search.feasible(t) if t.last else None] if constrained else []),
             *(point_cells(search, t, objective) if seeds else []),
             t.diverged, None if t.diverged else t.error] for t in trials]
    return header, rows


def point_cells(search: Search, trial: TrialResult, objective: str) -> list[Any]:
    """config_of, seed_offset, and for a point's own trial its score over seeds (blank on re-evaluations)."""
    if trial.is_rerun:
        return [trial.config_of, trial.seed_offset, None, None, None]
    score = search.score(trial, objective)
    return [trial.config_of, trial.seed_offset, score.mean if score.n else None,
            score.se if score.n > 1 else None, score.n]


def write_trials_csv(search: Search, trials: list[TrialResult], path: Path) -> str:
    """trial_table as CSV (blank cells for missing values)."""
    return write_table(*trial_table(search, trials), path)


def write_table(header: list[str], rows: list[list[Any]], path: Path) -> str:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows([_cell(v) for v in row] for row in rows)
    write_atomic(path, text.getvalue())
    return str(path)


# ---- small helpers -----------------------------------------------------------------------------------
def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def _as_str(v: Any) -> Any:
    return [str(p) for p in v] if isinstance(v, list) else str(v)
