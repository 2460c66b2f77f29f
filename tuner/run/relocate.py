"""A restored search works where its experiment is now: a copy or a moved experiment resumes there.

Ray's restore (2.60) already moves its own trials: `Tuner.restore(path)` takes the storage path and name from
`path`, and each trial's directory and tracked checkpoints are rebased onto it. Three saved objects still hold
the place where the search started, and each would make a resumed copy write into the original (or wait on
it when it is gone):
- the searcher (in `tuner.pkl` and its snapshot `searcher-state-*.pkl`): its Optuna storage, an absolute
  journal path; re-opened from the record where the experiment is now (`HonestOptunaSearch.use_storage`);
- Ray's search generator (its snapshot `search_gen_state-*.json`, a pickle): the storage new trials are
  created in; `HereSearchGenerator` puts the current one back after Ray restores it;
- the budget stopper (in `tuner.pkl`), and the searcher's twin of it when re-evaluation must fit in the budget:
  the experiment whose spent budget each counts; the driver gives fresh ones.
Nothing here unpickles anything: the objects are the ones Ray itself loads on restore.
"""
from __future__ import annotations

import copy

from ray.tune.search import ConcurrencyLimiter, SearchGenerator


class HereSearchGenerator(SearchGenerator):
    """Ray's SearchGenerator whose restored state creates new trials in `storage_path/name`, the experiment
    being resumed, not in the storage the saved state names."""

    def __init__(self, searcher, storage_path: str, name: str):
        super().__init__(searcher)
        self._here = (storage_path, name)

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        if self._experiment is not None:
            rebase_experiment(self._experiment, *self._here)


def rebase_experiment(experiment, storage_path: str, name: str) -> None:
    """Point a restored Ray Experiment (its storage context, also held by its spec) at `storage_path/name`,
    as Ray's TuneController does for each restored trial."""
    from ray.train._internal.storage import get_fs_and_path

    moved = copy.copy(experiment.storage)
    moved.storage_filesystem, moved.storage_fs_path = get_fs_and_path(storage_path, None)
    moved.experiment_dir_name = name
    experiment.storage = moved
    experiment.spec["storage"] = moved


def innermost_searcher(search_alg):
    """The searcher inside Ray's wrappers (SearchGenerator, ConcurrencyLimiter)."""
    while hasattr(search_alg, "searcher"):
        search_alg = search_alg.searcher
    return search_alg


def relocate_restored(tuner, storage_path: str, name: str, study_storage, max_concurrent: int, stopper,
                      searcher_budget) -> None:
    """Before `fit`: the restored Tuner's searcher works on `study_storage` (the Optuna storage where the
    experiment is now, None for one kept in memory), its new trials are created in `storage_path/name`,
    and `stopper` (None: no budget) and `searcher_budget` (the searcher's own count, when it keeps one) count
    that experiment's spent budget.

    Ray keeps a restored Tuner's configs on its internal tuner, with no public setter (Ray 2.60)."""
    internal = tuner._local_tuner
    if internal is None:  # a Ray Client connection (ray://) restores the Tuner remotely: nothing to rebase here
        return
    tune_config = internal._tune_config
    searcher = innermost_searcher(tune_config.search_alg)
    if study_storage is not None:
        searcher.use_storage(study_storage)
    searcher.use_budget(searcher_budget)
    # Wrapped as Ray wraps a searcher itself (tune.run), so the saved state restores into the same chain.
    tune_config.search_alg = HereSearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
                                                 storage_path, name)
    tune_config.max_concurrent_trials = None  # applied by the ConcurrencyLimiter above
    internal.get_run_config().stop = stopper
