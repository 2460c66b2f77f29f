"""Reading a search back: its trials, their statuses, the best one, the trial-epochs spent.

Export, report, the search summary, the budget stopper and W&B tracking all read a search through this module,
so they agree. The experiment directory `<storage>/<name>/` is read as plain files (no Ray runtime needed):
- `certtune_search.json`: the search record (tuner/space/record.py);
- the newest `experiment_state-<time>.json`: Ray's status of every trial (TERMINATED, ERROR, RUNNING, ...);
- per trial directory: `result.json` (one JSON line per reported epoch: the trainer metrics plus Ray's keys;
  read by `parse_result_lines`, which skips a line torn by a crash), `params.json` (the sampled params) and,
  for an errored trial, `error.txt`.

Rules defined once here:
- status (`trial_status`, decided in tuner/study/verdict.py): finished | stopped | failed | running | pending;
- the best trial (`Search.sort_key`): objectives in order (each minimised or maximised per its mode), ties
  broken by the earlier creation order (Ray's trial counter), so every reader names the same best trial;
- trial-epochs (`furthest_epoch`, `trial_epochs`): per trial the furthest epoch it reported (a retried
  trial's replayed epochs count once), summed over trials;
- device-seconds (`trained_seconds`, `device_seconds`): per trial the largest `train_seconds` it reported
  (the trainer keeps it across a resume, so a replay does not add), times the GPUs it holds if any, else
  its CPUs (the record's `seconds_weight`), summed over trials;
- the spent budget of an experiment on any storage, local or URI (`spent_by_trial`), for tuner/run/budget.py;
- constraints (`Search.feasible`): a trial satisfies every `--constraint` on its last result; the best trial
  is the best feasible one when any finished trial is feasible (ranked first), with the tie-break above;
- points and seeds (`Search.score`, tuner/study/reeval.py): a re-evaluation trial trains an earlier trial's point
  with another seed; a point is ranked by its mean over its seeds (the trial's own value and its finished
  re-evaluations), points evaluated on more seeds first. Without re-evaluation that is the trial's value.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

from trainers.config import ConfigError
from trainers.errors import shown
from trainers.input_files import parse_json, read_bytes, read_text
from tuner.space.constraints import parse_constraints, satisfied
from tuner.study.keys import CONFIG_OF, DIVERGED, FAIL_REASON, SEED_OFFSET, STOP_REASON_FILE, STOP_REASONS
from tuner.space.record import (MAX_RECORD_BYTES, RECORD_FILE, SearchError, SearchRecord, check_name, experiment_path,
                          first_line, is_uri, normalize_storage)
from tuner.study.reeval import ReevalPlan, Score
from tuner.space.search_space import SearchSpace, SpaceError
# Re-exported for the readers of a search (report, export, plots): the status rules live in tuner.study.verdict.
from tuner.study.verdict import (ENDED, FAILED, FINISHED, NO_RESULT, PENDING, STATUSES, STOPPED,  # noqa: F401
                           after_spent_budget, is_finite, is_number, trial_status)

MAX_STATE_BYTES = 256 * 2**20  # one state file (Ray's experiment state, a trial's result.json): far above real ones
SUPERSEDED_FILE = "certtune_superseded.json"  # in a trial directory: trained again under another id (resume)
SELECTION_FILE = "certtune_selection.json"  # in the experiment: the --select-by choice (tuner/results/selection.py)
# what a remote copy needs per trial
TRIAL_FILES = ("params.json", "result.json", "error.txt", SUPERSEDED_FILE, STOP_REASON_FILE)
MAX_NOTE_BYTES = 2**16  # a marker certtune writes in a trial directory (a few dozen bytes)


class ExportError(SearchError):
    """A search that cannot be exported or reported (unknown name, nothing finished). A ConfigError, hence a
    ValueError, so the CLI prints it as one line and exits with code 2."""


@dataclass
class TrialResult:
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
    epochs_run: int = 0  # the furthest epoch it reported (furthest_epoch): its trial-epochs
    seconds_run: float = 0.0  # the largest train_seconds it reported (trained_seconds), not yet weighted
    dirname: str | None = None  # its directory in the experiment (where its checkpoints are)
    in_state: bool = True  # False: Ray's newest experiment state does not list it (started after that snapshot)
    superseded: bool = False  # set aside on resume (SUPERSEDED_FILE): its params were trained again as another trial
    config_of: str = ""  # the trial that first trained this point: itself, or the one a re-evaluation repeats
    seed_offset: int = 0  # added to the config's seed (re-evaluations: 1, 2, ...)
    stop_marker: str | None = None  # a stopped trial: the rule its STOP_REASON_FILE names (Search.stop_rule)

    @property
    def is_rerun(self) -> bool:
        return bool(self.config_of) and self.config_of != self.trial_id

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}

    def value(self, name: str) -> float | None:
        v = self.last.get(name)
        return float(v) if is_number(v) else None


@dataclass
class Search:
    name: str
    path: Path  # the experiment directory read (a temporary copy for remote storage, gone after loading)
    record: SearchRecord
    trials: list[TrialResult]
    location: str = ""  # where the experiment lives: local path or URI
    superseded: list[TrialResult] = field(default_factory=list)  # trained again under another id: compute only
    selection: dict | None = None  # the --select-by verifier's choice (tuner/results/selection.py), once made

    @property
    def objectives(self) -> list[str]:
        return list(self.record.objective)

    @property
    def modes(self) -> list[str]:
        return list(self.record.modes)

    def space(self) -> SearchSpace:
        return self.record.build_space()

    def searched_names(self) -> list[str]:
        return [str(n) for n in (self.record.space.get("params") or {})]

    def counts(self) -> dict[str, int]:
        return {s: sum(t.status == s for t in self.trials) for s in STATUSES}

    def stop_rule(self, trial: TrialResult) -> str | None:
        """Why a stopped trial stopped: "rung" or "share" (the marker the warmup-aware scheduler left), "budget" (a
        search with a budget, and no marker where the scheduler leaves them, or no scheduler); None when not
        stopped, or unknown (Ray's plain ASHA leaves no marker, nor did searches recorded before the markers)."""
        if trial.status != STOPPED:
            return None
        if trial.stop_marker:
            return trial.stop_marker
        record = self.record
        known = record.scheduler == "none" or (record.scheduler == "asha" and record.stop_markers)
        return "budget" if known and record.has_budget() else None

    def seeds_of(self, trial: TrialResult) -> list[TrialResult]:
        """The trial and the finished re-evaluations of its point (tuner/study/reeval.py)."""
        return [trial] + self._finished_reruns.get(trial.trial_id, [])

    @cached_property
    def _finished_reruns(self) -> dict[str, list[TrialResult]]:
        """{point's trial id: its finished re-evaluations}, grouped once: ranking reads it for every point."""
        groups: dict[str, list[TrialResult]] = {}
        for t in self.trials:
            if t.is_rerun and t.status == FINISHED:
                groups.setdefault(t.config_of, []).append(t)
        return groups

    def score(self, trial: TrialResult, objective: str) -> Score:
        """The point's mean over its seeds on `objective` (only the trial's value without re-evaluation)."""
        values = [t.value(objective) for t in self.seeds_of(trial)]
        return Score.of([v for v in values if v is not None and math.isfinite(v)])

    def sort_key(self, trial: TrialResult) -> tuple:
        """More seeds first (a point is compared with points raced as often), then the objectives' means in order
        (lexicographic, each minimised or maximised per its mode), then creation order."""
        signs = [1.0 if m == "min" else -1.0 for m in self.modes]
        scores = [self.score(trial, o) for o in self.objectives]
        return ((-scores[0].n,) + tuple(math.inf if not s.n else sign * s.mean for sign, s in zip(signs, scores))
                + (trial.order,))

    def points(self) -> list[TrialResult]:
        """The trials of the search's own points (re-evaluations left out)."""
        return [t for t in self.trials if not t.is_rerun]

    def feasible(self, trial: TrialResult) -> bool:
        """Every --constraint holds on the trial's last result (True when the search has none)."""
        return satisfied(parse_constraints(self.record.constraints), trial.last)

    def ranked(self, status: str = FINISHED) -> list[TrialResult]:
        """Points whose own trial has this status, those satisfying every constraint first, each group by
        sort_key (re-evaluations count in their point's score, not as points of their own)."""
        return sorted((t for t in self.points() if t.status == status),
                      key=lambda t: (not self.feasible(t),) + self.sort_key(t))

    def selected(self) -> TrialResult | None:
        """The search's winner: the --select-by verifier's first point once the selection is made, else best()."""
        if self.selection and self.selection.get("points"):
            by_id = {t.trial_id: t for t in self.points()}
            chosen = by_id.get(self.selection["points"][0].get("trial_id"))
            if chosen is not None:
                return chosen
        return self.best()

    def reruns(self) -> list[TrialResult]:
        return [t for t in self.trials if t.is_rerun]

    def planned_trials(self) -> int:
        """The trials the search will run: --num-samples, less the re-evaluation trials it will not need (the
        defaults point among the best needs no seeds of its own; few finished points need fewer) and, under a
        budget, the trials of its own it did not start once its race began."""
        record = self.record
        if not record.reeval_top:
            return record.num_samples
        baseline = self.space().default_point() or None
        plan = ReevalPlan(record.reeval_top, record.reeval_seeds, record.num_samples, baseline)
        own = self.points()
        # Its own trials are over when they all ended, or when the race began (under a budget the searcher ends
        # them early, to keep room for the race: tuner/study/searcher.py _reserve_reached).
        if sum(t.status in ENDED for t in own) < plan.main_trials and not self.reruns():
            return record.num_samples
        sign_mode = self.modes[0]
        finals = {t.trial_id: (t.value(self.objectives[0]), self.feasible(t)) for t in own if t.status == FINISHED}
        params = {t.trial_id: t.params for t in own}
        return len(own) + len(plan.reruns(finals, params, sign_mode))

    def best(self) -> TrialResult | None:
        """The best finished trial (feasible first, then sort_key: objectives, then creation order), or None.
        With constraints and no feasible finished trial it is the best infeasible one: check `feasible`."""
        ranked = self.ranked()
        return ranked[0] if ranked else None

    def trial_epochs(self) -> int:
        """Compute spent, superseded trials included (as the budget stopper counts it)."""
        return trial_epochs(t.epochs_run for t in self.trials + self.superseded)

    def device_seconds(self) -> float:
        return device_seconds((t.seconds_run for t in self.trials + self.superseded),
                              self.record.seconds_weight()[1])

    def largest_trial_share(self) -> float | None:
        """The most of the device-seconds budget one of the search's own trials took (None without that budget).
        Re-evaluations are left out: they train a point that already won, in full, outside the cap."""
        budget = self.record.max_trial_seconds
        if budget is None:
            return None
        weight = self.record.seconds_weight()[1]
        return max((weight * t.seconds_run for t in self.trials if not t.is_rerun), default=0.0) / budget

    def budget_spent(self) -> bool:
        """The trial-epoch or the device-seconds budget is spent."""
        return budget_spent(self.record, self.trial_epochs(), self.device_seconds())

    def budget_text(self) -> str:
        """`12 of 20 trial-epochs, 31.5 of 60 CPU-seconds (largest trial 25% of it, cap 33%)`: each budget spent,
        of its limit where there is one, and with a seconds budget the largest trial's share and the cap."""
        record = self.record
        epochs = f"{self.trial_epochs()}" + ("" if record.max_trial_epochs is None else f" of {record.max_trial_epochs}")
        seconds = f"{self.device_seconds():.4g}" + ("" if record.max_trial_seconds is None
                                                   else f" of {record.max_trial_seconds:g}")
        text = f"{epochs} trial-epochs, {seconds} {record.seconds_weight()[0].upper()}-seconds"
        share = self.largest_trial_share()
        if share is not None:
            cap = "no cap" if record.max_trial_share is None else f"cap {record.max_trial_share:.0%}"
            text += f" (largest trial {share:.0%} of it, {cap})"
        return text

    def is_complete(self) -> bool:
        """Every planned trial has ended, or a budget is spent (an interrupted search has open trials and
        budget left)."""
        if self.budget_spent():
            return True
        return sum(t.status in ENDED for t in self.trials) >= self.planned_trials()

    def all_failed(self) -> bool:
        return bool(self.trials) and all(t.status == FAILED for t in self.trials)


# ---- what the seeds say about the choice (report, export) ----------------------------------------------
VAL_SE_LIMIT = 0.006  # a score's sampling error on the validation split should stay within 0.6 points
UNSTABLE_SPREAD = 2.0  # a recipe whose spread over seeds is more than this times the defaults' is flagged


def seed_summary(search: Search) -> dict | None:
    """The best point's score over seeds and what qualifies it (None if nothing finished):
    - `close_call`: the runner-up is within one standard error (tuner/study/reeval.py within_one_se): the order of the
      two is not settled by the seeds run;
    - `val_se`: the binomial sampling error of the best's first objective on its validation split (an error rate
      measured on `val_images` images), `val_se_ok` when it is at most VAL_SE_LIMIT;
    - `spread` and `defaults_spread`: the standard deviation over seeds of the best point and of the space's
      defaults point (when both have seeds), `unstable` when the best's is more than UNSTABLE_SPREAD times it."""
    from tuner.study.reeval import binomial_se, within_one_se

    ranked = search.ranked()
    if not ranked:
        return None
    objective = search.objectives[0]
    best = ranked[0]
    score = search.score(best, objective)
    out = {"trial_id": best.trial_id, "objective": objective, "mean": score.mean, "se": score.se, "seeds": score.n,
           "close_call": None, "runner_up": None}
    if len(ranked) > 1:
        other = search.score(ranked[1], objective)
        out["runner_up"] = ranked[1].trial_id
        out["close_call"] = other.n == score.n and within_one_se(score, other)
    try:
        val_images = search.space().to_train_config(best.params).data.val_size
    except (SpaceError, ValueError):
        val_images = 0
    if objective.endswith("_err") and val_images:
        out["val_images"] = val_images
        out["val_se"] = binomial_se(score.mean, val_images)
        out["val_se_ok"] = out["val_se"] <= VAL_SE_LIMIT
    defaults = search.space().default_point()
    base = next((t for t in search.points() if defaults and t.params == defaults), None)
    out["spread"] = score.std
    if base is not None:
        out["defaults_trial"] = base.trial_id
        out["defaults_spread"] = search.score(base, objective).std
        out["unstable"] = (math.isfinite(out["spread"]) and math.isfinite(out["defaults_spread"])
                           and out["spread"] > UNSTABLE_SPREAD * out["defaults_spread"])
    return out


def seed_notes(summary: dict | None) -> list[str]:
    """The lines report and export print from seed_summary."""
    if not summary:
        return []
    o, lines = summary["objective"], []
    if summary["seeds"] > 1:
        lines.append(f"best point {summary['trial_id']}: {o} {summary['mean']:.4f} ± {summary['se']:.4f} (standard "
                     f"error over {summary['seeds']} seeds)")
    if summary["close_call"]:
        lines.append(f"warning: the best two points ({summary['trial_id']}, {summary['runner_up']}) are within one "
                     f"standard error of each other: more seeds would be needed to order them")
    if "val_se" in summary:
        verdict = "" if summary["val_se_ok"] else (f"; above {100 * VAL_SE_LIMIT:.1f} points: enlarge data.val_size "
                                                   f"to rank points by more than sampling noise")
        lines.append(f"validation: {summary['val_images']} images, sampling error of {o} about "
                     f"{100 * summary['val_se']:.2f} points{verdict}")
    if "defaults_spread" in summary and math.isfinite(summary["spread"]) and math.isfinite(summary["defaults_spread"]):
        flag = " (UNSTABLE: more than twice the defaults')" if summary["unstable"] else ""
        lines.append(f"spread over seeds (std of {o}): best {summary['spread']:.4f}, the space's defaults "
                     f"{summary['defaults_spread']:.4f}{flag}")
    return lines


def furthest_epoch(rows: Iterable[dict]) -> int:
    """The furthest `epoch` among a trial's results (0 if none): the trial-epochs it used."""
    return max((int(r["epoch"]) for r in rows if is_number(r.get("epoch"))), default=0)


def trial_epochs(furthest: Iterable[int]) -> int:
    """A search's compute in trial-epochs: the furthest epochs of its trials, summed."""
    return sum(furthest)


def trained_seconds(rows: Iterable[dict]) -> float:
    """The largest `train_seconds` among a trial's results (0 if none): its training seconds, unweighted."""
    return max((float(r["train_seconds"]) for r in rows if is_finite(r.get("train_seconds"))), default=0.0)


def device_seconds(seconds: Iterable[float], weight: float) -> float:
    """A search's compute in device-seconds: its trials' training seconds, summed, times the devices each holds
    (every trial of a search holds the same resources: SearchRecord.seconds_weight)."""
    return sum(seconds) * weight


def budget_spent(record: SearchRecord, epochs: int, seconds: float) -> bool:
    return ((record.max_trial_epochs is not None and epochs >= record.max_trial_epochs)
            or (record.max_trial_seconds is not None and seconds >= record.max_trial_seconds))


def spent_by_trial(experiment: str) -> dict[str, tuple[int, float]]:
    """{trial id: (furthest epoch, trained seconds)} from every `trial_*/result.json` of an experiment, a local
    directory or a URI (read through pyarrow.fs, as the record is); {} when there is nothing there yet."""
    texts: dict[str, str] = {}  # trial directory name → its result.json ("" if none yet)
    if not is_uri(experiment):
        root = Path(experiment)
        for d in (root.glob("trial_*") if root.is_dir() else []):
            texts[d.name] = (d / "result.json").read_text(errors="replace") if (d / "result.json").is_file() else ""
    else:
        import pyarrow.fs

        try:
            fs, path = pyarrow.fs.FileSystem.from_uri(experiment)
            for info in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)):
                name = info.path.rstrip("/").rsplit("/", 1)[-1]
                if info.type != pyarrow.fs.FileType.Directory or not name.startswith("trial_"):
                    continue
                texts[name] = ""
                result = fs.get_file_info(f"{info.path}/result.json")
                if result.type == pyarrow.fs.FileType.File:
                    with fs.open_input_stream(result.path) as f:
                        texts[name] = f.read().decode(errors="replace")
        except (OSError, ValueError) as e:
            raise SearchError(f"{experiment}: cannot read the budget spent so far ({first_line(e)})") from None
    return {name.removeprefix("trial_"): (furthest_epoch(rows), trained_seconds(rows))
            for name, rows in ((n, parse_result_lines(t)) for n, t in texts.items())}


def load_search(name: str, storage: str | None) -> Search:
    """Read `<storage>/<name>/` (a local path or a URI such as s3://, file://). ExportError if it is not a search."""
    storage = normalize_storage(storage)
    check_name(name, "search name")  # one path component: never outside --storage
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
    if record_file.is_symlink():
        inside(path, RECORD_FILE, record_file)
    if not record_file.is_file():
        raise ExportError(f"{where}: no certtune search there ({RECORD_FILE} not found); check the name and "
                          f"pass the --storage the search ran with")
    record = SearchRecord.from_json(read_text(record_file, MAX_RECORD_BYTES, RECORD_FILE), f"{where}/{RECORD_FILE}")
    every = read_trials(path, record.objective)
    check_trial_params(every, record.build_space(), path)
    trials = [t for t in every if not t.superseded]
    search = Search(name, path, record, trials, where, [t for t in every if t.superseded],
                    read_selection(path / SELECTION_FILE, where))
    if search.budget_spent():
        for t in trials:  # started just as the budget ran out, stopped before its first epoch: not a failure
            t.status, t.error = after_spent_budget(t.status, t.error, bool(t.history))
    return search


def read_selection(path: Path, where: str) -> dict | None:
    """The --select-by choice, if the search made one; a damaged file is named, not ignored."""
    if not path.is_file():
        return None
    try:
        chosen = json.loads(path.read_text())
        if not isinstance(chosen, dict) or not isinstance(chosen.get("points"), list):
            raise ValueError("expected an object with a list of points")
    except ValueError as e:
        raise ExportError(f"{where}/{SELECTION_FILE}: not certtune's selection ({first_line(e)}); delete it to "
                          f"report the search without it") from None
    return chosen


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
        wanted = (len(rel.parts) == 1 and (rel.name in (RECORD_FILE, SELECTION_FILE)
                                           or rel.name.startswith("experiment_state-"))
                  or len(rel.parts) == 2 and rel.name in TRIAL_FILES)
        if info.type == pyarrow.fs.FileType.File and wanted:
            if info.size is not None and info.size > MAX_STATE_BYTES:  # the largest any of them may be: not copied
                raise ExportError(f"{uri}/{rel}: {info.size / 2**20:.0f} MiB is too large for a file of a search "
                                  f"(at most {MAX_STATE_BYTES // 2**20} MiB); refused")
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as f:
                (local / rel).write_bytes(f.read())
    return local


def read_trials(path: Path, objectives: list[str]) -> list[TrialResult]:
    """Every trial of the experiment: those in Ray's newest experiment state, then any other trial directory.
    Every path read is inside the experiment (`inside`), whatever the state file or a link says."""
    state = read_experiment_state(path)
    state_file = newest_state_file(path)
    trials, seen = [], set()
    for n, (info, runtime) in enumerate(state):
        logdir = inside(path, str(info["relative_logdir"]), state_file) if info.get("relative_logdir") else None
        error_file = runtime.get("error_filename")
        if logdir is not None and error_file:
            inside(logdir, str(error_file), state_file)
        if logdir is not None:
            check_trial_files(path, logdir)
        trials.append(make_trial(
            info.get("trial_id", f"#{n}"), info.get("status"), info.get("config") or {}, logdir,
            runtime.get("last_result") or {}, (logdir / error_file) if logdir and error_file else None,
            creation_order(info, n), runtime.get("last_result_time"), objectives))
        if logdir is not None:
            seen.add(logdir.name)
    # Trial directories the state does not know yet (the driver died before its next snapshot).
    for d in sorted(p for p in path.glob("trial_*") if p.is_dir() and p.name not in seen):
        inside(path, d.name, d)
        check_trial_files(path, d)
        if (d / "params.json").is_file() or (d / "result.json").is_file():
            error = d / "error.txt"
            trials.append(make_trial(d.name.removeprefix("trial_"), None, {}, d, {},
                                     error if error.is_file() else None, len(state) + len(trials), None,
                                     objectives))
            trials[-1].in_state = False
    return sorted(trials, key=lambda t: t.order)


def inside(root: Path, relative: str, named_in: Path | str) -> Path:
    """`root / relative`, which must stay inside `root` once links are followed: a tampered state file (an
    absolute log dir, `../`) or a planted link never makes a reader open a file outside the experiment.
    ExportError naming the file that points outside."""
    target = root / relative
    if not target.resolve().is_relative_to(root.resolve()):
        named_in = target if target.is_symlink() else named_in  # the planted link, else the file naming it
        raise ExportError(f"{named_in}: points outside the experiment ({shown(relative)} from {root}); refused: "
                          f"certtune reads only the experiment's own files (was it edited, or a link planted?)")
    return target


def check_trial_files(root: Path, trial_dir: Path) -> None:
    """Each file read from a trial directory (params, results, error, marker) is inside the experiment."""
    for name in TRIAL_FILES:
        if (trial_dir / name).is_symlink():
            inside(root, str((trial_dir / name).relative_to(root)), trial_dir / name)


def newest_state_file(path: Path) -> Path | None:
    files = sorted(path.glob("experiment_state-*.json"))  # names carry a sortable timestamp
    return files[-1] if files else None


def read_experiment_state(path: Path) -> list[tuple[dict, dict]]:
    """(trial info, trial runtime) per trial from the newest experiment_state-<time>.json; [] if none."""
    newest = newest_state_file(path)
    if newest is None:
        return []
    inside(path, newest.name, newest)
    text = read_text(newest, MAX_STATE_BYTES, "experiment-state file")  # a FIFO or a huge file: one line
    try:
        raw = json.loads(text)
        return [(json.loads(info), json.loads(runtime)) for info, runtime in raw["trial_data"]]
    except RecursionError:
        raise ExportError(f"{newest}: nested too deeply to be Ray's experiment state; refused") from None
    except (ValueError, KeyError, TypeError):
        return []  # a snapshot cut short: the trial directories still hold the results


def creation_order(info: dict, fallback: int) -> int:
    """Ray's experiment tag starts with the trial's 1-based creation counter (`3_lr=0.001,...`)."""
    head = str(info.get("experiment_tag", "")).split("_", 1)[0]
    return int(head) if head.isdigit() else 10**6 + fallback


def make_trial(trial_id: str, ray_status: str | None, config: dict, logdir: Path | None, state_last: dict,
               error_file: Path | None, order: int, ended_at: float | None, objectives: list[str]) -> TrialResult:
    params = config
    if logdir is not None and (logdir / "params.json").is_file():
        params = read_params(logdir / "params.json", config)
    params = dict(params)
    config_of, seed_offset = params.pop(CONFIG_OF, None), params.pop(SEED_OFFSET, 0)
    rows, torn = read_result_file(logdir / "result.json") if logdir is not None else ([], False)
    if state_last and (not rows or _later(state_last, rows[-1])):
        rows, torn = rows + [state_last], False  # result.json lost its tail: Ray's state still knows the last result
    history = epoch_history(rows)
    trial = TrialResult(str(trial_id), PENDING, dict(params), history, order,
                        ended_at if ended_at is not None else (history[-1].get("timestamp") if history else None),
                        epochs_run=furthest_epoch(rows), seconds_run=trained_seconds(rows),
                        dirname=logdir.name if logdir is not None else None,
                        superseded=logdir is not None and (logdir / SUPERSEDED_FILE).is_file(),
                        config_of=str(config_of or trial_id), seed_offset=seed_offset if is_number(seed_offset) else 0)
    trial.diverged = str(trial.last[DIVERGED]) if trial.last.get(DIVERGED) else None
    trial.status, reason = trial_status(ray_status, trial.last, objectives,
                                        lost_tail=str(logdir / "result.json") if torn else None)
    if logdir is not None:  # read, hence checked, wherever it is; it counts only for a stopped trial (stop_rule)
        trial.stop_marker = read_stop_reason(logdir / STOP_REASON_FILE)
    if trial.last.get(FAIL_REASON) and not trial.diverged:
        trial.error = str(trial.last[FAIL_REASON])  # the trial's own reason (e.g. invalid config, no data)
    elif trial.status not in (FINISHED, STOPPED) and not trial.diverged:
        # Ray keeps error.txt of an attempt it retried; it explains a failed trial or a retrying one.
        error = last_line(error_file) if error_file is not None and error_file.is_file() else None
        trial.error = error or reason
        if ray_status == "ERROR" and not trial.error:
            trial.error = "the trial raised (see error.txt in its trial directory)"
    return trial


def read_results(path: Path) -> list[dict]:
    """The rows of a local trial's result.json ([] if there is none; a FIFO or a huge file is one line)."""
    if not path.exists():
        return []
    return parse_result_lines(read_text(path, MAX_STATE_BYTES, "result.json"), str(path))


def read_result_file(path: Path) -> tuple[list[dict], bool]:
    """(rows, whether its last line is torn) of a local trial's result.json (([], False) if there is none)."""
    if not path.exists():
        return [], False
    text = read_text(path, MAX_STATE_BYTES, "result.json")
    return parse_result_lines(text, str(path)), torn_tail(text)


def torn_tail(text: str) -> bool:
    """The last line of a result.json is not a whole JSON object: a crash cut it while Ray appended it."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return False
    try:
        return not isinstance(json.loads(lines[-1]), dict)
    except (ValueError, RecursionError):
        return True


def parse_result_lines(text: str, source: str = "result.json") -> list[dict]:
    """The one reader of Ray's result.json: one JSON object per line; a line torn by a crash (or anything
    that is not an object) is skipped. A whole line holding what certtune never reports is damage, named
    with the file and the line (ExportError): NaN/Infinity outside a failed or diverged trial's last result
    (a trial stops at its first non-finite metric), an epoch that is not an integer."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        constants: list[str] = []
        try:
            row = json.loads(line, parse_constant=lambda c: constants.append(c) or float(c)) if line.strip() else None
        except (ValueError, RecursionError):
            row = None
        if not isinstance(row, dict):
            continue
        if constants and not (row.get(DIVERGED) or row.get(FAIL_REASON)):
            raise ExportError(f"{source}: line {number} holds {constants[0]} in a result that is not a failure; "
                              "the file was altered")
        for key in ("epoch", "epochs"):
            if key in row and not (isinstance(row[key], int) and not isinstance(row[key], bool)):
                raise ExportError(f"{source}: line {number}: '{key}' is {shown(row[key])}, not an integer; "
                                  "the file was altered")
        rows.append(row)
    return rows


def _later(state_last: dict, last_row: dict) -> bool:
    """Ray's experiment state holds a later epoch than the last readable line of result.json."""
    return is_number(state_last.get("epoch")) and is_number(last_row.get("epoch")) \
        and state_last["epoch"] > last_row["epoch"]


def check_trial_params(trials: list[TrialResult], space: SearchSpace, path: Path) -> None:
    """Each trial's params (its params.json) are a point of the search's space: a tampered params.json is
    named here, not blamed later on the space file by a config built from it."""
    for t in trials:
        point = {k: v for k, v in t.params.items() if k in space.params}
        if not point:
            continue  # pending, or started before writing its params
        try:
            space.active_values(point)
        except (SpaceError, ConfigError) as e:
            where = path / t.dirname / "params.json" if t.dirname else path / "experiment_state"
            problem = str(e).split(": ", 1)[-1] if str(e).startswith(str(space.source)) else str(e)
            raise ExportError(f"{where}: not a point of the search's space: {problem}") from None


def epoch_history(rows: list[dict]) -> list[dict]:
    """One result per epoch. A retried trial reports epochs again from its checkpoint (or from 1): a repeated
    epoch replaces that epoch and every later one, as the trainer's own metrics.jsonl does."""
    history: list[dict] = []
    for row in rows:
        epoch = row.get("epoch")
        if is_number(epoch):
            history = [r for r in history if not (is_number(r.get("epoch")) and r["epoch"] >= epoch)]
        history.append(row)
    return history


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "error (empty error.txt)"




# ---- the Optuna study ---------------------------------------------------------------------------------
def load_study(experiment_dir: str | Path):
    """The Optuna study of a (local) experiment, loaded from its Optuna storage with `optuna.load_study`
    (tuner/study/journal.py); never from Ray's searcher pickle. SearchError for a search that predates the storage."""
    from tuner.study.journal import load_search_study

    experiment_dir = Path(experiment_dir)
    record = SearchRecord.from_json(read_text(experiment_dir / RECORD_FILE, MAX_RECORD_BYTES, RECORD_FILE),
                                    str(experiment_dir / RECORD_FILE))
    return load_search_study(record, str(experiment_dir.parent))


# ---- small helpers -----------------------------------------------------------------------------------
def read_params(path: Path, default: dict) -> dict:
    """A trial's params.json, or `default` (the config Ray's state holds) where it is not a JSON object. A FIFO
    or a huge file is refused in one line (it would block or fill memory), as every file of a search is."""
    data = read_bytes(path, MAX_STATE_BYTES, "params.json")
    try:
        data = parse_json(data.decode("utf-8"), str(path))
    except (UnicodeDecodeError, ConfigError):  # not JSON (or NaN, nested absurdly deep): Ray's record of it stands
        return default
    return data if isinstance(data, dict) else default


def read_stop_reason(path: Path) -> str | None:
    """Which rule stopped a trial, from the marker the scheduler left (tuner/run/schedulers.py); None without one."""
    if not path.exists() and not path.is_symlink():
        return None
    note = parse_json(read_text(path, MAX_NOTE_BYTES, STOP_REASON_FILE), str(path))
    reason = note.get("by") if isinstance(note, dict) else None
    if reason not in STOP_REASONS:
        raise ExportError(f"{path}: 'by' is {str(reason)[:40]!r}, not one of {', '.join(STOP_REASONS)}; "
                          f"damaged (certtune writes this file when its scheduler stops a trial)")
    return reason


def counts_text(search: Search) -> str:
    return ", ".join(f"{n} {s}" for s, n in search.counts().items() if n)
