"""`certtune export`: a finished search → the best config as a YAML `certtune train` runs, the top-k configs,
a table of all trials, the Pareto front (several objectives) and plots. Guide: docs/export.md.

The experiment directory `<storage>/<name>/` is read as plain files, so no Ray runtime (and not the original
trainable) is needed:
- `certtune_search.json`: the search record (space file contents, base overrides, objectives);
- the newest `experiment_state-<time>.json`: Ray's status of every trial (TERMINATED, ERROR, RUNNING, ...);
- per trial directory: `result.json` (one JSON line per reported epoch: the trainer metrics plus Ray's keys),
  `params.json` (the sampled params) and, for an errored trial, `error.txt`.

Only trials that ran all their epochs are eligible as "best": an early-stopped trial's last value belongs to a
shorter budget (ray-project/ray#10113), and a diverged or errored one has none.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers.config import ConfigError
from trainers.schedules import EpsSchedule, first_target_epoch, last_reg_epoch, reg_weight
from tuner.search import (RECORD_FILE, SearchRecord, experiment_path, is_uri, normalize_storage,
                          space_with_overrides)
from tuner.spaces import SearchSpace

EXPORT_DIR = "export"
STATUSES = ("finished", "stopped", "failed", "running", "pending")
NO_RESULT = "ended without reporting a result"
# Final metrics in trials.csv, in this order (design.md names; those no trial reported are left out).
METRICS = ("epoch", "epochs", "eps", "loss", "clean_err", "ibp_err", "crown_ibp_err", "pgd_err", "relu_active",
           "relu_inactive", "relu_unstable", "bound_tightness", "best_ibp_err", "train_seconds")
TRIAL_FILES = ("params.json", "result.json", "error.txt")  # what a remote experiment copy needs per trial
MIN_TRIALS_FOR_IMPORTANCE = 3
NOMINAL_STEPS_PER_EPOCH = 100


class ExportError(ConfigError):
    """A search that cannot be exported or reported (unknown name, nothing finished). A ConfigError, hence a
    ValueError, so the CLI prints it as one line and exits with code 2."""


# ---- reading a search --------------------------------------------------------------------------------
@dataclass
class TrialRecord:
    """One Ray trial as export sees it. `history` holds one result per epoch (a retried trial's replayed
    epochs replace the earlier ones); `last` is the latest result."""

    trial_id: str
    status: str
    params: dict[str, Any]
    history: list[dict] = field(default_factory=list)
    order: int = 0  # creation order
    ended_at: float | None = None  # time of the last result (completion order for the history plot)
    diverged: str | None = None
    error: str | None = None

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}

    def value(self, name: str) -> float | None:
        v = self.last.get(name)
        return float(v) if _is_number(v) else None


@dataclass
class Search:
    name: str
    path: Path  # the experiment directory read (a temporary copy for remote storage, gone after loading)
    record: SearchRecord
    trials: list[TrialRecord]
    location: str = ""  # where the experiment lives: local path or URI

    @property
    def objectives(self) -> list[str]:
        return list(self.record.objective)

    @property
    def modes(self) -> list[str]:
        return list(self.record.modes)

    def space(self) -> SearchSpace:
        return space_with_overrides(self.record.space, self.record.overrides, self.record.space_path)

    def searched_names(self) -> list[str]:
        return [str(n) for n in (self.record.space.get("params") or {})]

    def counts(self) -> dict[str, int]:
        return {s: sum(t.status == s for t in self.trials) for s in STATUSES}

    def sort_key(self, trial: TrialRecord) -> tuple:
        """Objectives in order (lexicographic, each minimised or maximised per its mode), then creation order."""
        signs = [1.0 if m == "min" else -1.0 for m in self.modes]
        values = [trial.value(o) for o in self.objectives]
        return tuple(math.inf if v is None else s * v for s, v in zip(signs, values)) + (trial.order,)

    def ranked(self, status: str = "finished") -> list[TrialRecord]:
        return sorted((t for t in self.trials if t.status == status), key=self.sort_key)


def load_search(name: str, storage: str | None) -> Search:
    """Read `<storage>/<name>/` (a local path or a URI such as s3://, file://). ExportError if it is not a search."""
    storage = normalize_storage(storage)
    where = experiment_path(storage, name)
    if is_uri(storage):
        local = Path(tempfile.mkdtemp(prefix="certtune-export-"))
        try:
            return _load_local(name, download_experiment(where, local), where)
        finally:
            shutil.rmtree(local, ignore_errors=True)
    return _load_local(name, Path(where), where)


def _load_local(name: str, path: Path, where: str) -> Search:
    """`where` names the experiment in messages (its URI when `path` is a local copy)."""
    record_file = path / RECORD_FILE
    if not record_file.is_file():
        raise ExportError(f"{where}: no certtune search there ({RECORD_FILE} not found); check the name and "
                          f"pass the --storage the search ran with")
    record = SearchRecord.from_json(record_file.read_text(), f"{where}/{RECORD_FILE}")
    trials = read_trials(path, record.objective)
    spent = sum(int(t.last.get("epoch") or 0) for t in trials)
    if record.max_trial_epochs is not None and spent >= record.max_trial_epochs:
        for t in trials:  # started just as the budget ran out, stopped before its first epoch: not a failure
            if t.status == "failed" and not t.history and t.error == NO_RESULT:
                t.status, t.error = "stopped", None
    return Search(name, path, record, trials, where)


def download_experiment(uri: str, local: Path) -> Path:
    """Copy the files export reads (not the checkpoints) from a remote experiment into `local`."""
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    except (OSError, ValueError) as e:
        raise ExportError(f"{uri}: cannot read the experiment ({str(e).splitlines()[0]})") from None
    for info in infos:
        rel = Path(info.path[len(root):].lstrip("/"))
        wanted = (len(rel.parts) == 1 and (rel.name == RECORD_FILE or rel.name.startswith("experiment_state-"))
                  or len(rel.parts) == 2 and rel.name in TRIAL_FILES)
        if info.type == pyarrow.fs.FileType.File and wanted:
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as f:
                (local / rel).write_bytes(f.read())
    return local


def read_trials(path: Path, objectives: list[str]) -> list[TrialRecord]:
    """Every trial of the experiment: those in Ray's newest experiment state, then any other trial directory."""
    state = read_experiment_state(path)
    trials, seen = [], set()
    for n, (info, runtime) in enumerate(state):
        logdir = path / info.get("relative_logdir", "") if info.get("relative_logdir") else None
        error_file = runtime.get("error_filename")
        trials.append(make_trial(
            info.get("trial_id", f"#{n}"), info.get("status"), info.get("config") or {}, logdir,
            runtime.get("last_result") or {}, (logdir / error_file) if logdir and error_file else None,
            creation_order(info, n), runtime.get("last_result_time"), objectives))
        if logdir is not None:
            seen.add(logdir.name)
    # Trial directories the state does not know yet (the driver died before its next snapshot).
    for d in sorted(p for p in path.iterdir() if p.is_dir() and p.name not in seen):
        if (d / "params.json").is_file() or (d / "result.json").is_file():
            error = d / "error.txt"
            trials.append(make_trial(d.name.removeprefix("trial_"), None, {}, d, {},
                                     error if error.is_file() else None, len(state) + len(trials), None,
                                     objectives))
    return sorted(trials, key=lambda t: t.order)


def read_experiment_state(path: Path) -> list[tuple[dict, dict]]:
    """(trial info, trial runtime) per trial from the newest experiment_state-<time>.json; [] if none."""
    files = sorted(path.glob("experiment_state-*.json"))  # names carry a sortable timestamp
    if not files:
        return []
    try:
        raw = json.loads(files[-1].read_text())
        return [(json.loads(info), json.loads(runtime)) for info, runtime in raw["trial_data"]]
    except (ValueError, KeyError, TypeError):
        return []  # a snapshot cut short: the trial directories still hold the results


def creation_order(info: dict, fallback: int) -> int:
    """Ray's experiment tag starts with the trial's 1-based creation counter (`3_lr=0.001,...`)."""
    head = str(info.get("experiment_tag", "")).split("_", 1)[0]
    return int(head) if head.isdigit() else 10**6 + fallback


def make_trial(trial_id: str, ray_status: str | None, config: dict, logdir: Path | None, state_last: dict,
               error_file: Path | None, order: int, ended_at: float | None, objectives: list[str]) -> TrialRecord:
    params = config
    if logdir is not None and (logdir / "params.json").is_file():
        params = _read_json(logdir / "params.json", config)
    rows = read_results(logdir / "result.json") if logdir is not None else []
    if not rows and state_last:
        rows = [state_last]
    history = epoch_history(rows)
    trial = TrialRecord(str(trial_id), "pending", dict(params), history, order,
                        ended_at if ended_at is not None else (history[-1].get("timestamp") if history else None))
    trial.diverged = str(trial.last["diverged"]) if trial.last.get("diverged") else None
    trial.status, reason = trial_status(ray_status, trial.last, objectives)
    if trial.status not in ("finished", "stopped") and not trial.diverged:
        # Ray keeps error.txt of an attempt it retried; it explains a failed trial or a retrying one.
        error = last_line(error_file) if error_file is not None and error_file.is_file() else None
        trial.error = error or reason
        if ray_status == "ERROR" and not trial.error:
            trial.error = "the trial raised (see error.txt in its trial directory)"
    return trial


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            row = None  # a line cut short by a crash
        if isinstance(row, dict):
            rows.append(row)
    return rows


def epoch_history(rows: list[dict]) -> list[dict]:
    """One result per epoch. A retried trial reports epochs again from its checkpoint (or from 1): a repeated
    epoch replaces that epoch and every later one, as the trainer's own metrics.jsonl does."""
    history: list[dict] = []
    for row in rows:
        epoch = row.get("epoch")
        if _is_number(epoch):
            history = [r for r in history if not (_is_number(r.get("epoch")) and r["epoch"] >= epoch)]
        history.append(row)
    return history


def trial_status(ray_status: str | None, last: dict, objectives: list[str]) -> tuple[str, str | None]:
    """(status, why it failed) per the contract: finished | stopped | failed | running | pending."""
    if last.get("diverged"):
        return "failed", f"diverged: {last['diverged']}"
    if ray_status == "ERROR":
        return "failed", None
    has_epochs = _is_number(last.get("epoch")) and _is_number(last.get("epochs"))
    done = has_epochs and last["epoch"] >= last["epochs"]
    if done or ray_status == "TERMINATED":
        if not last:
            return "failed", NO_RESULT
        if not has_epochs:
            return "failed", "last result lacks 'epoch'/'epochs'"
        bad = [o for o in objectives if not _is_finite(last.get(o))]
        if bad:
            return "failed", f"{', '.join(bad)} missing or not finite at epoch {last['epoch']}"
        return ("finished" if done else "stopped"), None
    if last or ray_status in ("RUNNING", "PAUSED"):
        return "running", None
    return "pending", None


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "error (empty error.txt)"


# ---- Pareto front ------------------------------------------------------------------------------------
def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """a is no worse than b everywhere and better somewhere (values already signed for minimisation)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(search: Search) -> list[TrialRecord]:
    """Finished trials no other finished trial dominates, best first objective first."""
    finished = search.ranked()
    n = len(search.objectives)
    points = {t.trial_id: search.sort_key(t)[:n] for t in finished}
    return [t for t in finished if not any(dominates(points[o.trial_id], points[t.trial_id]) for o in finished)]


# ---- export ------------------------------------------------------------------------------------------
def export_search(name: str, storage: str | None, out: Path | None = None, top_k: int = 5,
                  epochs: int | None = None) -> dict:
    """Write best.yaml, top_k/rank<i>.yaml, trials.csv, pareto.csv (several objectives) and the plots into `out`
    (default `<storage>/<name>/export/`); with `epochs`, also best_<epochs>ep.yaml, the best recipe scaled to
    that many epochs. Returns the paths written and a summary of the best trial."""
    if top_k < 1:
        raise ExportError(f"--top-k: must be an integer >= 1, got {top_k}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ExportError(f"--epochs: must be an integer >= 1, got {epochs!r}")
    if out is None and is_uri(normalize_storage(storage)):
        raise ExportError(f"search {name!r} is in remote storage {storage}; pass --out DIR")
    search = load_search(name, storage)
    ranked = search.ranked()
    if not ranked:
        raise ExportError(f"search {name!r}: no trial ran all its epochs ({_counts_text(search) or 'no trials'}); "
                          "only finished trials are exported (early-stopped values are truncated)")
    space = search.space()
    out = Path(out) if out is not None else search.path / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    best = ranked[0]
    written = {"best_yaml": write_config(search, space, best, 1, out / "best.yaml")}
    for stale in out.glob("best_*ep.yaml"):  # from an earlier export with another --epochs
        stale.unlink()
    if epochs is not None:
        written["best_scaled_yaml"] = write_config(search, space, best, 1, out / f"best_{epochs}ep.yaml", epochs)
    top_dir = out / "top_k"
    if top_dir.is_dir():
        shutil.rmtree(top_dir)  # a previous export's ranks would mix with these
    top_dir.mkdir()
    written["top_k"] = [write_config(search, space, t, i, top_dir / f"rank{i}.yaml")
                        for i, t in enumerate(ranked[:top_k], 1)]
    written["trials_csv"] = write_trials_csv(search, search.trials, out / "trials.csv")
    written["plots"] = [plot_history(search, out / "history.png"),
                        plot_importances(search, space, out / "importances.png"),
                        plot_schedules(search, space, best, out / "schedules.png")]
    for stale in ("pareto.csv", "pareto.png"):  # from an earlier export under other objectives
        (out / stale).unlink(missing_ok=True)
    if len(search.objectives) > 1:
        front = pareto_front(search)
        written["pareto_csv"] = write_trials_csv(search, front, out / "pareto.csv")
        written["plots"].append(plot_pareto(search, front, out / "pareto.png"))
    return {"out": str(out), **{k: _as_str(v) for k, v in written.items()}, "best": best_summary(search, best)}


def best_summary(search: Search, trial: TrialRecord) -> dict:
    return {"trial_id": trial.trial_id, **{o: trial.value(o) for o in search.objectives},
            "epochs": trial.last.get("epochs"), "params": trial.params,
            "finished_trials": search.counts()["finished"], "trials": len(search.trials)}


def write_config(search: Search, space: SearchSpace, trial: TrialRecord, rank: int, path: Path,
                 epochs: int | None = None) -> str:
    """The trial's complete TrainConfig (space base + overrides + sampled + derived, resolved), as `train` reads
    it; with `epochs`, the same recipe scaled to that many epochs (TrainConfig.scaled_to)."""
    point = {k: v for k, v in trial.params.items() if k in space.params}
    cfg = space.to_train_config(point)
    (cfg if epochs is None else cfg.scaled_to(epochs).resolve()).to_yaml(path)
    values = ", ".join(f"{o}={trial.value(o):.6g}" for o in search.objectives)
    run = (f"# reproduce: certtune train {path.name} --data-dir {search.record.data_dir}\n" if epochs is None else
           f"# scaled from {cfg.epochs} to {epochs} epochs (warmup, ramp and LR milestones keep their fractions);"
           f" the figures above are the {cfg.epochs}-epoch trial's\n"
           f"# train: certtune train {path.name} --data-dir {search.record.data_dir}\n")
    header = (f"# certtune export of search '{search.name}': rank {rank} of "
              f"{search.counts()['finished']} trials that ran all epochs\n"
              f"# trial {trial.trial_id}: {values} (validation split, final epoch {trial.last.get('epoch')})\n"
              + run)
    path.write_text(header + path.read_text())
    return str(path)


def metric_columns(trials: list[TrialRecord], objectives: list[str]) -> list[str]:
    names = list(METRICS) + [o for o in objectives if o not in METRICS]
    return [n for n in names if any(n in t.last for t in trials)]


def write_trials_csv(search: Search, trials: list[TrialRecord], path: Path) -> str:
    """One row per trial: id, status, rank among finished, each searched param (blank when inactive), final
    metrics, Ray's wall seconds, and why it failed."""
    rank = {t.trial_id: i for i, t in enumerate(search.ranked(), 1)}
    params = search.searched_names()
    metrics = metric_columns(search.trials, search.objectives)
    header = ["trial_id", "status", "rank", *[f"param.{p}" for p in params], *metrics, "wall_seconds",
              "diverged", "error"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for t in trials:
            writer.writerow([t.trial_id, t.status, rank.get(t.trial_id, ""), *[_cell(t.params.get(p)) for p in params],
                             *[_cell(t.last.get(m)) for m in metrics], _cell(t.last.get("time_total_s")),
                             t.diverged or "", "" if t.diverged else (t.error or "")])
    return str(path)


# ---- schedule curves (for the schedules plot) --------------------------------------------------------
def steps_per_epoch(cfg, history: list[dict]) -> tuple[int, bool]:
    """Batches per epoch of the trial: from its measured samples/s × epoch time when reported, else from
    data.subset; (steps, exact). Falls back to a nominal count (the curve's shape in epochs barely depends on it)."""
    for row in history:
        if _is_number(row.get("samples_per_s")) and _is_number(row.get("time_epoch_s")):
            samples = round(row["samples_per_s"] * row["time_epoch_s"])
            if samples > 0:
                return math.ceil(samples / cfg.batch_size), True
    if cfg.data.subset > 0:
        return math.ceil(cfg.data.subset / cfg.batch_size), True
    return NOMINAL_STEPS_PER_EPOCH, False


def schedule_curves(cfg, steps: int) -> tuple[list[float], list[float], list[float]]:
    """(x in epochs at the end of each batch, scheduled ε, regularizer weight λ) for every training batch,
    with the trainer's own rules: λ = reg_weight(ε) while the regularizers run, 0 after the ramp."""
    schedule = EpsSchedule.from_config(cfg.schedule, cfg.eps, steps)
    reg_until = last_reg_epoch(cfg.schedule) if cfg.uses_reg else 0
    x, eps, lam = [], [], []
    for s in range(cfg.epochs * steps):
        e = schedule(s)
        x.append((s + 1) / steps)
        eps.append(e)
        lam.append(reg_weight(e, cfg.eps, cfg.reg.lambda0, cfg.reg.decay) if s // steps + 1 <= reg_until else 0.0)
    return x, eps, lam


# ---- plots (matplotlib Figure objects, no pyplot state, so no display backend is needed) --------------
def plot_history(search: Search, path: Path) -> str:
    """First objective of each ended trial in completion order, and the best finished value so far."""
    objective, mode = search.objectives[0], search.modes[0]
    ended = sorted((t for t in search.trials if t.status in ("finished", "stopped") and t.value(objective) is not None),
                   key=lambda t: (t.ended_at if t.ended_at is not None else math.inf, t.order))
    title = f"{search.name}: optimization history ({_counts_text(search)})"
    if not ended:
        return _message_plot(path, title, "no trial has ended with a value yet")
    fig, ax = _figure()
    for status, style in (("finished", dict(color="C0", label="finished (all epochs)")),
                          ("stopped", dict(facecolors="none", edgecolors="C1",
                                           label="stopped early (truncated value, not eligible)"))):
        pts = [(i, t.value(objective)) for i, t in enumerate(ended, 1) if t.status == status]
        if pts:
            ax.scatter(*zip(*pts), s=36, zorder=3, **style)
    best_x, best_y, best = [], [], None
    for i, t in enumerate(ended, 1):
        v = t.value(objective)
        if t.status == "finished" and (best is None or (v < best if mode == "min" else v > best)):
            best = v
        if best is not None:
            best_x.append(i)
            best_y.append(best)
    if best_x:
        ax.step(best_x, best_y, where="post", color="C2", lw=2, label=f"best finished so far ({mode})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial, in completion order")
    ax.set_ylabel(f"final {objective} (validation)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_importances(search: Search, space: SearchSpace, path: Path) -> str:
    """Optuna's parameter importances (PED-ANOVA, which handles conditional params) for the first objective,
    from the finished trials only."""
    finished = search.ranked()
    objective = search.objectives[0]
    title = f"{search.name}: parameter importances for final {objective} ({len(finished)} finished trials)"
    if len(finished) < MIN_TRIALS_FOR_IMPORTANCE:
        return _message_plot(path, title, f"not enough trials: {len(finished)} finished, importances need at "
                                          f"least {MIN_TRIALS_FOR_IMPORTANCE}")
    try:
        importances = param_importances(search, space, finished)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return _message_plot(path, title, f"importances could not be computed: {str(e).splitlines()[0][:120]}")
    if not importances:
        return _message_plot(path, title, "no searched parameter varies among the finished trials")
    names = sorted(importances, key=importances.get)  # most important on top
    labels = [f"{n} (conditional)" if space.params[n].conditional else n for n in names]
    fig, ax = _figure(height=max(3.0, 0.45 * len(names) + 1.5))
    ax.barh(labels, [importances[n] for n in names], color="C0")
    for y, n in enumerate(names):
        ax.text(importances[n], y, f" {importances[n]:.3f}", va="center", fontsize=9)
    ax.set_xlabel("importance (Optuna PED-ANOVA, normalised to sum 1)")
    ax.set_xlim(0, max(importances.values()) * 1.18 or 1)
    ax.set_title(title)
    return _save(fig, path)


def param_importances(search: Search, space: SearchSpace, trials: list[TrialRecord]) -> dict[str, float]:
    """Rebuild the finished trials as an in-memory Optuna study and ask Optuna for importances."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    points = [space.active_values({k: v for k, v in t.params.items() if k in space.params}) for t in trials]
    dists = {n: distribution(space, n, points) for n in space.params if any(n in p for p in points)}
    study = optuna.create_study(direction="minimize" if search.modes[0] == "min" else "maximize")
    for trial, point in zip(trials, points):
        study.add_trial(optuna.trial.create_trial(params=point, distributions={k: dists[k] for k in point},
                                                  value=trial.value(search.objectives[0])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PED-ANOVA is marked experimental
        return optuna.importance.get_param_importances(study)


def distribution(space: SearchSpace, name: str, points: list[dict]):
    """The Optuna distribution of a param, from its definition in the space. A bound that is an expression
    (`high: epochs - schedule.start`) differs between trials; the union of their ranges is used."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from tuner.spaces import ExprError

    p = space.params[name]
    if p.type == "categorical":
        return CategoricalDistribution(p.choices)
    values = [pt[name] for pt in points if name in pt]
    lows, highs = [], []
    for pt in points:
        if name in pt:
            try:
                low, high = p.bounds({**space.base_values, **pt})
            except ExprError:
                continue
            lows.append(low)
            highs.append(high)
    low, high = min(lows + values), max(highs + values)
    if p.type == "int":
        step = p.step or 1
        if p.log or len(set(lows)) > 1 or (high - low) % step:
            step = 1
        return IntDistribution(int(low), int(high), log=p.log, step=step)
    return FloatDistribution(float(low), float(high), log=p.type == "loguniform")


def plot_schedules(search: Search, space: SearchSpace, trial: TrialRecord, path: Path) -> str:
    """Left: the best trial's ε and λ per training batch (from its config, with the trainer's schedule code).
    Right: its validation errors per epoch (from its results)."""
    cfg = space.to_train_config({k: v for k, v in trial.params.items() if k in space.params})
    steps, exact = steps_per_epoch(cfg, trial.history)
    x, eps, lam = schedule_curves(cfg, steps)
    fig, (ax_eps, ax_err) = _figure(width=13.0, cols=2)
    ax_eps.plot(x, eps, color="C0", lw=2, label="ε scheduled (per batch)")
    reported = [(r["epoch"], r["eps"]) for r in trial.history
                if _is_number(r.get("epoch")) and _is_number(r.get("eps"))]
    if reported:
        ax_eps.plot(*zip(*reported), "o", color="C0", ms=5, label="ε reported at epoch end")
    ax_eps.axhline(cfg.eps, color="grey", ls=":", label=f"target ε = {cfg.eps:g}")
    ax_lam = ax_eps.twinx()
    reg = "" if cfg.uses_reg else " (regularizers off)"
    ax_lam.plot(x, lam, color="C3", lw=2, ls="--", label=f"λ regularizer weight{reg}")
    ax_eps.set_xlabel("epoch")
    ax_eps.set_ylabel("ε")
    ax_lam.set_ylabel("λ")
    ax_eps.set_xlim(0, cfg.epochs)
    ax_lam.set_ylim(bottom=0, top=max(max(lam, default=0), cfg.reg.lambda0, 1e-9) * 1.1)
    handles = ax_eps.get_legend_handles_labels()
    more = ax_lam.get_legend_handles_labels()
    ax_eps.legend(handles[0] + more[0], handles[1] + more[1], loc="center right", fontsize=9)
    ax_eps.set_title(f"trial {trial.trial_id}: schedules ({cfg.schedule.kind}, start {cfg.schedule.start}, "
                     f"length {cfg.schedule.length}; {steps} batches/epoch{'' if exact else ', nominal'})",
                     fontsize=10)
    errors = [m for m in ("ibp_err", "clean_err", "crown_ibp_err", "pgd_err")
              if any(_is_finite(r.get(m)) for r in trial.history)]
    for i, m in enumerate(errors):
        pts = [(r["epoch"], r[m]) for r in trial.history if _is_finite(r.get(m)) and _is_number(r.get("epoch"))]
        ax_err.plot(*zip(*pts), "o-", color=f"C{i}", lw=2 if m == "ibp_err" else 1, label=f"{m} (validation)")
    first = first_target_epoch(cfg.schedule)
    if first <= cfg.epochs:
        ax_err.axvline(first, color="grey", ls=":", label=f"first epoch at target ε ({first})")
    from matplotlib.ticker import MaxNLocator

    ax_err.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_err.set_xlim(0, cfg.epochs + 0.5)
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("error (fraction)")
    ax_err.set_title(f"trial {trial.trial_id}: validation errors per epoch", fontsize=10)
    ax_err.grid(alpha=0.3)
    ax_err.legend(fontsize=9)
    return _save(fig, path)


def plot_pareto(search: Search, front: list[TrialRecord], path: Path) -> str:
    """Finished trials over the first two objectives, the Pareto front highlighted."""
    o0, o1 = search.objectives[:2]
    finished = search.ranked()
    fig, ax = _figure()
    ax.scatter([t.value(o0) for t in finished], [t.value(o1) for t in finished], color="C7", s=30,
               label=f"finished trials ({len(finished)})")
    pts = sorted((t.value(o0), t.value(o1)) for t in front)
    ax.plot(*zip(*pts), "o-", color="C3", ms=8, lw=1.5, label=f"Pareto front ({len(front)})")
    ax.scatter([front[0].value(o0)], [front[0].value(o1)], marker="*", s=260, color="C2", zorder=4,
               label=f"best by {o0} (best.yaml)")
    ax.set_xlabel(f"final {o0} ({search.modes[0]})")
    ax.set_ylabel(f"final {o1} ({search.modes[1]})")
    extra = f"; front over all {len(search.objectives)} objectives" if len(search.objectives) > 2 else ""
    ax.set_title(f"{search.name}: Pareto front{extra}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _figure(width: float = 8.0, height: float = 5.0, cols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, cols)


def _message_plot(path: Path, title: str, message: str) -> str:
    fig, ax = _figure()
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, wrap=True)
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110)
    return str(path)


def _counts_text(search: Search) -> str:
    return ", ".join(f"{n} {s}" for s, n in search.counts().items() if n)


# ---- small helpers -----------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


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


def _read_json(path: Path, default: dict) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return default
    return data if isinstance(data, dict) else default

