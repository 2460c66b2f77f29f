"""The plots of `certtune export`: optimization history, parameter importances, the best trial's schedules
and errors, the Pareto front. matplotlib Figure objects only (no pyplot state, so no display backend)."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

from trainers.schedules import EpsSchedule, first_target_epoch, last_reg_epoch, reg_weight
from trainers.verifiers import per_epoch_metrics
from tuner.results.experiment import Search, TrialResult, counts_text, is_finite, is_number
from tuner.space.search_space import SearchSpace
from tuner.study.verdict import FINISHED, STOPPED

MIN_TRIALS_FOR_IMPORTANCE = 3
NOMINAL_STEPS_PER_EPOCH = 100


# ---- schedule curves (for the schedules plot) --------------------------------------------------------
def steps_per_epoch(cfg, history: list[dict]) -> tuple[int, bool]:
    """Batches per epoch of the trial: from its measured samples/s × epoch time when reported, else from
    data.subset; (steps, exact). Falls back to a nominal count (the curve's shape in epochs barely depends on it)."""
    for row in history:
        if is_number(row.get("samples_per_s")) and is_number(row.get("time_epoch_s")):
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
    ended = sorted((t for t in search.trials if t.status in (FINISHED, STOPPED) and t.value(objective) is not None),
                   key=lambda t: (t.ended_at if t.ended_at is not None else math.inf, t.order))
    title = f"{search.name}: optimization history ({counts_text(search)})"
    if not ended:
        return _message_plot(path, title, "no trial has ended with a value yet")
    fig, ax = _figure()
    for status, style in ((FINISHED, dict(color="C0", label="finished (all epochs)")),
                          (STOPPED, dict(facecolors="none", edgecolors="C1",
                                           label="stopped early (truncated value, not eligible)"))):
        pts = [(i, t.value(objective)) for i, t in enumerate(ended, 1) if t.status == status]
        if pts:
            ax.scatter(*zip(*pts), s=36, zorder=3, **style)
    best_x, best_y, best = [], [], None
    for i, t in enumerate(ended, 1):
        v = t.value(objective)
        if t.status == FINISHED and (best is None or (v < best if mode == "min" else v > best)):
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


def param_importances(search: Search, space: SearchSpace, trials: list[TrialResult]) -> dict[str, float]:
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

    from tuner.space.search_space import ExprError

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


def plot_schedules(search: Search, space: SearchSpace, trial: TrialResult, path: Path) -> str:
    """Left: the best trial's ε and λ per training batch (from its config, with the trainer's schedule code).
    Right: its validation errors per epoch (from its results)."""
    cfg = space.config_of(trial.params)
    steps, exact = steps_per_epoch(cfg, trial.history)
    x, eps, lam = schedule_curves(cfg, steps)
    fig, (ax_eps, ax_err) = _figure(width=13.0, cols=2)
    ax_eps.plot(x, eps, color="C0", lw=2, label="ε scheduled (per batch)")
    reported = [(r["epoch"], r["eps"]) for r in trial.history
                if is_number(r.get("epoch")) and is_number(r.get("eps"))]
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
    errors = [m for m in sorted(per_epoch_metrics(), key=lambda m: m != "ibp_err")  # ibp_err: the first colour
              if any(is_finite(r.get(m)) for r in trial.history)]
    for i, m in enumerate(errors):
        pts = [(r["epoch"], r[m]) for r in trial.history if is_finite(r.get(m)) and is_number(r.get("epoch"))]
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


def plot_pareto(search: Search, front: list[TrialResult], path: Path) -> str:
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
    import io

    from trainers.files import write_atomic

    image = io.BytesIO()
    fig.savefig(image, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    write_atomic(path, image.getvalue())  # never through a link (trainers/files.py)
    return str(path)
