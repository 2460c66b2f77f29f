"""`certtune report NAME`: a terminal summary of a search, finished or still running.

Reads the experiment with tuner/results/experiment.py, as `certtune export` and the search summary do; writes nothing.
Shows how many trials are running, finished, stopped and failed, then a table of the top trials: finished
ones ranked by their final objective(s) (ties: the earlier-created trial first), then running, early-stopped
(their values are truncated, marked *), failed and pending ones. Also both budgets (spent, of their limits),
and with --constraint a column `ok` (the trial's last result satisfies every constraint); feasible trials
rank first.
"""
from __future__ import annotations

import math
from typing import Any

from tuner.results.experiment import STATUSES, Search, TrialResult, load_search, seed_notes, seed_summary
from tuner.results.selection import selection_lines
from tuner.space.record import OPTUNA_STARTUP_TRIALS
from tuner.study.verdict import FAILED, FINISHED, PENDING, RUNNING, STOPPED, failure_reason

TOP = 10
ROW_ORDER = (FINISHED, RUNNING, STOPPED, FAILED, PENDING)
MAX_REASONS = 5
STOP_RULES = ("(rung): lost at an ASHA rung; (share): could not reach its next rung or its end within its share of "
              "the seconds budget; (budget): the search's budget ran out")


def report_search(name: str, storage: str | None) -> str:
    """The report text of search `name`; ExportError if there is no such search."""
    return format_report(load_search(name, storage))


def format_report(search: Search, top: int = TOP) -> str:
    counts = search.counts()
    record = search.record
    objectives = ", ".join(f"{o} ({m})" for o, m in zip(search.objectives, search.modes))
    lines = [f"search {search.name}: {len(search.trials)} trials of {search.planned_trials()} planned; "
             + ", ".join(f"{counts[s]} {s}" for s in STATUSES),
             f"objective: {objectives}; sampler: {sampler_text(record)}; scheduler: {record.scheduler}"
             + (f" (rungs in {record.rungs} at target)" if record.scheduler == "asha" else "")
             + f"; fidelity: {record.fidelity}; "
             f"experiment: {search.location}",
             f"budget: {search.budget_text()}"]
    if record.method_costs:
        from tuner.space.costs import cost_line
        lines.append(cost_line(record.method_costs))
    if record.reeval_top:
        reruns = search.reruns()
        lines.append(f"re-evaluation: the best {record.reeval_top} points and the space's defaults, "
                     f"{record.reeval_seeds} more seeds each: {len(reruns)} trials, "
                     f"{sum(t.status == FINISHED for t in reruns)} finished; points are ranked by their mean "
                     f"over seeds (column mean±se), more seeds first")
    if record.constraints:
        feasible = sum(search.feasible(t) for t in search.ranked())
        lines.append(f"constraints: {', '.join(record.constraints)}; {feasible} of {counts[FINISHED]} finished "
                     f"trials satisfy all (column ok: yes/no; feasible trials rank first)")
    lines.append("")
    rows = ordered_trials(search)
    lines += table(*trial_rows(search, rows[:top]))
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more trials (all of them: `certtune export {search.name}` → trials.csv)")
    lines += seed_notes(seed_summary(search))
    lines += selection_lines(search)
    if counts[STOPPED]:
        named = any(search.stop_rule(t) for t in search.trials)  # none with Ray's plain ASHA or an older search
        lines.append("* stopped early: the value is from its last epoch, not a final one" + (f". {STOP_RULES}" if named else ""))
    failed = [t for t in search.trials if t.status == FAILED]
    for t in failed[:MAX_REASONS]:
        lines.append(f"failed {t.trial_id}: {failure_reason(t.diverged, t.error)}")
    if len(failed) > MAX_REASONS:
        lines.append(f"... {len(failed) - MAX_REASONS} more failed trials (reasons in trials.csv)")
    return "\n".join(lines)


def sampler_text(record) -> str:
    """`tpe (its first N trials at random)` or `random`."""
    if record.sampler != "tpe":
        return record.sampler
    return f"tpe (its first {record.startup_trials or OPTUNA_STARTUP_TRIALS} trials at random)"


def ordered_trials(search: Search) -> list[TrialResult]:
    """Finished points ranked by objective(s) (their mean over seeds), then the other points by status, each
    group by objective, then the re-evaluation trials in the order they were created."""
    return [t for status in ROW_ORDER for t in search.ranked(status)] + search.reruns()


def trial_rows(search: Search, trials: list[TrialResult]) -> tuple[list[str], list[list[str]]]:
    shown = list(search.objectives) + (["clean_err"] if "clean_err" not in search.objectives else [])
    constrained = bool(search.record.constraints)
    seeds = bool(search.record.reeval_top)
    header = ["rank", "trial_id", "status", *shown, *(["mean±se", "seeds"] if seeds else []), "epochs",
              *(["ok"] if constrained else []), "params"]
    rank = {t.trial_id: i for i, t in enumerate(search.ranked(), 1)}
    names = search.searched_names()
    rows = []
    for t in trials:
        mark = "*" if t.status == STOPPED else ""
        epoch, epochs = t.last.get("epoch"), t.last.get("epochs")
        rows.append([str(rank.get(t.trial_id, "-")), t.trial_id, status_cell(search, t),
                     *[fmt(t.last.get(m)) + (mark if m in search.objectives and m in t.last else "") for m in shown],
                     *(score_cells(search.score(t, search.objectives[0])) if seeds else []),
                     f"{fmt(epoch)}/{fmt(epochs)}" if epoch is not None else "-",
                     *([("yes" if search.feasible(t) else "no") if t.last else "-"] if constrained else []),
                     " ".join(f"{n}={fmt(t.params[n])}" for n in names if n in t.params)])
    return header, rows


def status_cell(search: Search, trial: TrialResult) -> str:
    """The trial's status, and for a stopped one the rule that stopped it: `stopped (rung)`."""
    rule = search.stop_rule(trial)
    return trial.status + (f" ({rule})" if rule else "")


def score_cells(score) -> list[str]:
    """mean±se and seeds of a point's first objective."""
    if not score.n:
        return ["-", "0"]
    se = "" if score.n < 2 else f"±{score.se:.2g}"
    return [f"{score.mean:.4g}{se}", str(score.n)]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; the last (params) column is left ragged."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in [header, *rows]]


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)
