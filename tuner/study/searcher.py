"""Ray's OptunaSearch with honest bookkeeping of how each trial ended.

Stock OptunaSearch (Ray 2.60, Optuna 5.0) tells Optuna COMPLETE with the short-budget value for a trial
the scheduler stopped early, so TPE learns from partial budgets as if they were final; and a NaN final
metric makes `tell` raise, which Ray only logs, leaving the Optuna trial RUNNING forever.
"""
from __future__ import annotations

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from ray.tune.search import Searcher

from tuner.space.constraints import Constraint
from trainers.config import ConfigError
from tuner.study.keys import CONFIG_OF, FAIL_REASON, RAY_TRIAL_ID, SEED_OFFSET
from tuner.study.reeval import ReevalPlan, Rerun
from tuner.study.verdict import TargetEpochCounter, is_finite_float, optuna_verdict
from tuner.study.journal import flat_config


class HonestOptunaSearch(OptunaSearch):
    """OptunaSearch (same arguments) that tells Optuna how each trial really ended.

    When a trial ends, tuner.study.verdict.optuna_verdict decides what Optuna is told: FAIL (the trial raised, or
    an objective is missing, NaN or inf; user attr `fail_reason`), PRUNED (stopped early, `epoch < epochs`:
    Optuna keeps its last intermediate value and step) or COMPLETE with the final value (list if
    multi-objective).

    Intermediate values (single objective only; Optuna cannot store them for several objectives): the
    objective at every epoch at target ε, with step = epochs at target, the unit of WarmupAwareASHA's rungs.
    Ramp epochs are not reported, so a PRUNED trial is ranked by TPE on its budget at target and its value.

    With `constraints` (tuner/space/constraints.py), a COMPLETE or PRUNED trial also gets its violation of each on
    that last result (`Trial.set_constraint`, key `clean_err<=0.35`), which TPE reads: it models feasible
    trials as the good ones (Optuna 5 replaced TPE's `constraints_func` by these per-trial constraints).
    `train_config(params) -> dict` (optional): the trial's resolved training config, put on the Optuna trial as
    user attrs `config.<dotted key>` when it ends, so a dashboard shows what each trial trained.

    With `reeval` (tuner/study/reeval.py), the searcher suggests `reeval.main_trials` points of its own, waits until
    they have ended, and then suggests the re-evaluation trials: earlier points, each with a seed offset, as
    trials the study is told like any other (user attrs `config_of`, `seed_offset` group them by point).

    All state lives in instance attributes, which Ray's save/restore pickle, so it survives Tuner.restore.
    With an Optuna storage (`storage=`), the trials themselves live there and the pickle holds only the
    storage's address; `restore` then reconciles the snapshot with the storage, which the killed driver may
    have written after its last snapshot (see `_reconcile`).
    """

    _constraints: list[Constraint] = []  # class default: a searcher pickled before constraints existed restores
    _reeval: ReevalPlan | None = None  # likewise, for re-evaluation
    _budget = None  # likewise: the search's budget, counted here too when re-evaluation must fit in it

    def __init__(self, *args, constraints: list[Constraint] | None = None, train_config=None,
                 reeval: ReevalPlan | None = None, budget=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._constraints = list(constraints or [])
        self._reeval = reeval
        self._budget = budget  # a tuner.run.budget.SearchBudget of its own (the stopper's twin), or None
        self._main_ids: list[str] = []  # Ray trials of the search's own points (not re-evaluations)
        self._finals: dict[str, tuple[float, bool]] = {}  # finished ones: (first objective, feasible)
        self._reruns: list[Rerun] | None = None  # the re-evaluations still to suggest, once planned
        self._train_config = train_config
        self._orphans: list[int] = []  # storage trial ids asked after the last snapshot, handed out again
        self._progress = TargetEpochCounter()
        # Last step reported per trial: Ray passes a trial's last result again (its "done" duplicate,
        # then on_trial_complete), and Optuna warns on a repeated step.
        self._last_step: dict[str, int] = {}

    @property
    def study(self) -> optuna.Study | None:
        """The Optuna study (None until the search space is known), for exports and inspection."""
        return self._ot_study

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Replaces the stock method, which reports every result with step = training_iteration.
        if self._budget is not None:
            self._budget(trial_id, result)  # counts what was spent, as the stopper does; stopping is the stopper's
        if isinstance(self.metric, list) or trial_id in self._completed_trials:
            return  # Optuna has no multi-objective report; a finished Optuna trial takes no reports
        step = self._progress.update(trial_id, result)
        value = result.get(self.metric)
        if step is None or step <= self._last_step.get(trial_id, 0) or not is_finite_float(value):
            return  # still ramping, already reported, or not a value Optuna can rank (FAIL follows)
        self._ot_trials[trial_id].report(float(value), step)
        self._last_step[trial_id] = step

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            # Told already: a trial that finished after the last snapshot of a killed driver runs again on
            # resume (the storage has its verdict, _reconcile); the stock method would warn about it.
            return
        if result:
            # Ray does not pass the result on which the scheduler stopped a trial to on_trial_result;
            # report it here so a PRUNED trial's last step is where it really stopped.
            self.on_trial_result(trial_id, result)
        state, value, reason = self._verdict(result, error)
        ot_trial = self._ot_trials[trial_id]
        if state == TrialState.COMPLETE:
            first = value[0] if isinstance(value, list) else value
            self._finals[trial_id] = (first, all(c.violation(result) <= 0 for c in self._constraints))
        # User attrs go in before tell: a finished Optuna trial is read-only.
        ot_trial.set_user_attr(RAY_TRIAL_ID, trial_id)
        if self._reeval is not None and CONFIG_OF not in ot_trial.user_attrs:
            ot_trial.set_user_attr(CONFIG_OF, trial_id)  # a point of its own (re-evaluations have theirs)
            ot_trial.set_user_attr(SEED_OFFSET, 0)
        for key, setting in self._config_attrs(ot_trial).items():
            ot_trial.set_user_attr(key, setting)
        if reason:
            ot_trial.set_user_attr(FAIL_REASON, reason)
        if state != TrialState.FAIL:
            for c in self._constraints:
                ot_trial.set_constraint(str(c), c.violation(result or {}))
        # No try/except: the stock one turns a failed tell into a log line and a RUNNING zombie; our
        # values are checked above, so a failure here is a bug to see.
        self._ot_study.tell(ot_trial, value, state=state)
        self._completed_trials.add(trial_id)
        self._progress.forget(trial_id)
        self._last_step.pop(trial_id, None)

    def _verdict(self, result: dict | None, error: bool) -> tuple[TrialState, float | list | None, str | None]:
        """(state, value(s) for tell, fail reason) from the trial's last result, by tuner.study.verdict's rules."""
        multi = isinstance(self.metric, list)
        state, values, reason = optuna_verdict(result, error, self.metric if multi else [self.metric])
        return TrialState[state], values if multi or values is None else values[0], reason

    def _config_attrs(self, ot_trial) -> dict:
        if self._train_config is None:
            return {}
        try:
            return flat_config(self._train_config(dict(ot_trial.params)))
        except ConfigError:
            return {}  # a point the config rejects: the trial failed and says why (fail_reason)

    # ---- an Optuna storage and a restored snapshot ------------------------------------------------
    def suggest(self, trial_id: str):
        # A trial the killed driver asked for after its last snapshot is RUNNING in the storage, unknown to
        # the restored Ray experiment: the next new Ray trial takes it over (same Optuna trial, its params),
        # so the storage has no trial left RUNNING and none counted twice.
        orphan = bool(self._orphans) and trial_id not in self._ot_trials and callable(self._space)
        if orphan:
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, self._orphans.pop(0))
        if self._reeval is not None and trial_id not in self._ot_trials:
            if len(self._main_ids) >= self._reeval.main_trials or self._reserve_reached():
                return self._suggest_rerun(trial_id)
            self._main_ids.append(trial_id)
        params = super().suggest(trial_id)
        if orphan and self._reeval is not None and isinstance(params, dict):
            attrs = self._ot_trials[trial_id].user_attrs
            if attrs.get(SEED_OFFSET):  # a re-evaluation the killed driver had started: the same point and seed
                params = {**params, CONFIG_OF: attrs[CONFIG_OF], SEED_OFFSET: attrs[SEED_OFFSET]}
            else:
                self._main_ids.append(trial_id)
        if self._storage is not None and trial_id in self._ot_trials:
            # Linked from the start, so a trial Ray ends without telling the searcher (the experiment stopped
            # by the trial-epoch budget) is found again by tuner.study.journal.settle_study.
            self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ID, trial_id)
        return params

    def _reserve_reached(self) -> bool:
        """With a budget, the search's own points end while the re-evaluations still fit in it (their trials
        costing what a finished trial cost, as many as the points that can be raced need: ReevalPlan.reserved_for),
        so a budget does not cut the race off."""
        if self._budget is None:
            return False
        running = [t for t in self._main_ids if t not in self._completed_trials]
        reserve = self._reeval.reserved_for(len(self._finals) + len(running))
        return self._budget.reserve_reached(reserve, list(self._finals), running)

    def _suggest_rerun(self, trial_id: str):
        """A re-evaluation trial once every trial of the search's own has ended; None (ask again later) before."""
        if self._reruns is None:
            if any(t not in self._completed_trials for t in self._main_ids):
                return None
            points = {t: dict(self._ot_trials[t].params) for t in self._main_ids}
            mode = self.mode[0] if isinstance(self.mode, list) else self.mode
            self._reruns = self._reeval.reruns(self._finals, points, mode)
        # A re-evaluation a killed driver had asked for after its last snapshot is in the study already (an
        # orphan, taken over in suggest): not asked again.
        asked = {(t.user_attrs.get(CONFIG_OF), t.user_attrs.get(SEED_OFFSET))
                 for t in self._ot_study.get_trials(deepcopy=False)}
        while self._reruns and (self._reruns[0].of, self._reruns[0].seed_offset) in asked:
            self._reruns.pop(0)
        if not self._reruns:
            return Searcher.FINISHED
        rerun = self._reruns.pop(0)
        # Enqueued, so the study's next ask() is this point; the user attrs say which point and seed it is.
        self._ot_study.enqueue_trial(rerun.params, user_attrs={CONFIG_OF: rerun.of, SEED_OFFSET: rerun.seed_offset},
                                     skip_if_exists=False)
        config = super().suggest(trial_id)
        if self._storage is not None and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ID, trial_id)
        return {**config, CONFIG_OF: rerun.of, SEED_OFFSET: rerun.seed_offset}

    def use_storage(self, storage) -> None:
        """Work on the study in `storage` from now on: the search's Optuna storage where the experiment is now.
        Ray's pickles (tuner.pkl, the searcher snapshot) hold the storage the search started with, an absolute
        journal path, so a resumed copy would otherwise append to the original's journal. The study, and the
        trials asked of it, are re-bound to `storage`; their state is read from it again."""
        self._storage = storage
        if storage is None or self._ot_study is None:
            return
        self._ot_study = optuna.load_study(study_name=self._ot_study.study_name, storage=storage,
                                          sampler=self._ot_study.sampler, pruner=self._ot_study.pruner)
        for ot_trial in self._ot_trials.values():
            ot_trial.study, ot_trial.storage = self._ot_study, storage

    def use_budget(self, budget) -> None:
        """Count the spent budget with `budget` (a SearchBudget of the experiment where it is now), for the same
        reason as use_storage: the pickled one names the experiment where the search started."""
        if self._budget is not None:
            self._budget = budget

    def restore(self, checkpoint_path: str) -> None:
        here = self._storage  # where the driver re-opened the study (use_storage); the snapshot's is where it started
        budget_here = self._budget  # likewise (use_budget)
        super().restore(checkpoint_path)
        if here is not None:
            self.use_storage(here)
        if budget_here is not None:
            self.use_budget(budget_here)
        self.__dict__.setdefault("_train_config", None)  # a snapshot from before these attributes
        self.__dict__.setdefault("_orphans", [])
        for name, empty in (("_main_ids", []), ("_finals", {}), ("_reruns", None)):
            self.__dict__.setdefault(name, empty)
        if self._ot_study is not None:
            # The sampler's random state is the snapshot's: the draws a killed driver made after it would come
            # again, the same point under a new trial, trained twice. Optuna's own remedy for a copied sampler.
            self._ot_study.sampler.reseed_rng()
        self._reconcile(restored_ray_trials(checkpoint_path))

    def _reconcile(self, restored: set[str] = frozenset()) -> None:
        """After a restore from a snapshot older than the storage: a trial told after the snapshot is
        finished in the storage (not told again; Ray may rerun its last epoch, reports are ignored), and a
        trial asked after it is an orphan for `suggest`, unless Ray's restored experiment (`restored`: its Ray
        trial ids) resumes that Ray trial itself, whose Optuna trial it then stays (its point trains once).
        An in-memory study is the snapshot: nothing to do."""
        if self._storage is None or self._ot_study is None:
            return
        storage = self._ot_study._storage
        for trial_id, ot_trial in self._ot_trials.items():
            if trial_id not in self._completed_trials and storage.get_trial(ot_trial._trial_id).state.is_finished():
                self._completed_trials.add(trial_id)
        known = {t._trial_id for t in self._ot_trials.values()}
        self._orphans = []
        for ot in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            ray_id = ot.user_attrs.get(RAY_TRIAL_ID)
            if ot._trial_id in known:
                continue
            if ray_id in restored and ray_id not in self._ot_trials:
                self._ot_trials[ray_id] = optuna.trial.Trial(self._ot_study, ot._trial_id)
                if self._reeval is not None and not ot.user_attrs.get(SEED_OFFSET):
                    self._main_ids.append(ray_id)
            else:
                self._orphans.append(ot._trial_id)


def restored_ray_trials(checkpoint_path: str) -> set[str]:
    """The Ray trial ids of the experiment state Ray is restoring, which it downloads beside the searcher's
    snapshot (its driver staging directory) before restoring the searcher. The two files are synced to the
    storage one after the other, so after a kill the state can know a trial the snapshot does not. Only the ids
    are read here (the report's reader is tuner/results/experiment.py); empty when there is nothing to read."""
    import json
    from pathlib import Path

    states = sorted(Path(checkpoint_path).parent.glob("experiment_state-*.json"))  # names sort by time
    try:
        return {json.loads(info)["trial_id"] for info, _ in json.loads(states[-1].read_text())["trial_data"]}
    except (IndexError, OSError, ValueError, KeyError, TypeError, RecursionError):
        return set()
