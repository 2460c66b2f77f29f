"""`certtune search` and `certtune resume`: a Ray Tune experiment driven by Optuna over a search space.

    record = prepare_search(...)          # validates everything; nothing runs yet
    results = run_search(record, storage)
    results = resume_search(name, storage, address)

One path for a trial (tuner/run/trial.py): sampled params → `space.to_train_config` → `Trainer.fit`, the same
function `certtune train` runs. The experiment lives in `<storage>/<name>/` (RunConfig(storage_path, name));
`certtune_search.json` there records the search (the space file's contents included) before the Tuner starts,
so `resume` and `export` rebuild the trainable and the space without the original files. The Optuna study
is named after the search and lives in an Optuna storage (tuner/study/journal.py: a journal file in the experiment
directory by default, or --optuna-storage URL); Ray's searcher snapshot holds only its address. Full guide:
docs/search.md.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

from trainers.config import ConfigError
from trainers.schedules import first_target_epoch
from trainers.verifiers import per_epoch_metrics
from tuner.run.cluster import check_address, recorded_address, resolve_address, resume_flag
from tuner.space.constraints import parse_constraints
from tuner.space.fidelity import Fidelity
from tuner.space.record import (OPTUNA_STARTUP_TRIALS, SearchError, SearchRecord, check_location, check_name,
                          device_weight, experiment_path, first_line, hold_driver_lock, is_uri, normalize_storage,
                          positive_int, read_record, release_driver_lock, space_source, space_with_overrides,
                          write_record, write_text)
from tuner.study.keys import RAY_TRIAL_ID
from tuner.study.reeval import ReevalPlan, check_reeval
from tuner.results.selection import check_selection
from tuner.results.experiment import ENDED, SUPERSEDED_FILE, Search, load_search
from tuner.space.search_space import SearchSpace, SpaceError
from tuner.study.verdict import epochs_at_target, failure_reason

# Objectives a trial reports (all minimised) and the eval metric the trainer needs for each.
OBJECTIVES = per_epoch_metrics() | {"train_seconds": None}
SCHEDULERS = ("asha", "plain-asha", "none")
SAMPLERS = ("tpe", "random")
MAX_FAILURES = 3  # retries of a trial from its last checkpoint (a lost node, an OOM kill, ...)

# Ray's deprecation notices and per-checkpoint snapshot warnings are noise for our usage.
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


# ---- parsing and checking the command line ---------------------------------------------------------
def parse_objective(text: str, space: SearchSpace) -> tuple[list[str], list[str]]:
    names = [n.strip() for n in text.split(",")]
    if not names or any(not n for n in names):
        raise SearchError(f"--objective: expected a comma list of metric names, got {text!r}")
    for n in names:
        if n not in OBJECTIVES:
            raise SearchError(f"--objective: unknown metric {n!r}; allowed: {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise SearchError(f"--objective: a metric is repeated in {text!r}")
    measured = space.base_config.resolve().eval.metrics
    for n in names:
        needed = OBJECTIVES[n]
        if needed is not None and needed not in measured and "eval.metrics" not in space.params:
            raise SearchError(f"--objective: {n} needs '{needed}' in eval.metrics of the space "
                              f"(it measures {', '.join(measured)}); add it, e.g. eval.metrics=[clean,ibp,{needed}]")
    return names, ["min"] * len(names)


MIN_RESOURCE = 0.01  # the smallest share of a CPU or GPU a trial may ask for


def parse_resources(text: str) -> dict[str, float]:
    """`cpu=2,gpu=0.5` → {"cpu": 2, "gpu": 0.5}. GPUs below 1 are shared, above 1 must be whole."""
    out: dict[str, float] = {"cpu": 1, "gpu": 0}
    for item in [i.strip() for i in text.split(",") if i.strip()]:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in out:
            raise SearchError(f"--resources-per-trial: expected cpu=N,gpu=M (e.g. cpu=2,gpu=0.5), got {item!r}")
        try:
            number = float(value)
        except ValueError:
            raise SearchError(f"--resources-per-trial: {key} must be a number, got {value.strip()!r}") from None
        if not math.isfinite(number) or number < 0 or (key == "cpu" and number == 0):
            raise SearchError(f"--resources-per-trial: {key} must be {'> 0' if key == 'cpu' else '>= 0'}, "
                              f"got {value.strip()[:60]}")
        if 0 < number < MIN_RESOURCE:  # Ray counts resources in 1/10000 units and refuses finer ones later
            raise SearchError(f"--resources-per-trial: {key}={number:g} is below the smallest share, "
                              f"{MIN_RESOURCE:g}")
        if number > 1 and not number.is_integer():
            raise SearchError(f"--resources-per-trial: {key} above 1 must be a whole number, got {number:g}")
        out[key] = int(number) if number.is_integer() else number
    return out


def check_constraints(texts: list[str] | None, space: SearchSpace) -> list[str]:
    """`--constraint` values, checked (syntax, known metric, measured by the space's eval.metrics) and written
    back in one canonical form (`clean_err<=0.35`) for the record."""
    constraints = parse_constraints(texts)
    measured = space.base_config.resolve().eval.metrics
    for c in constraints:
        needed = OBJECTIVES.get(c.metric)
        if needed is not None and needed not in measured and "eval.metrics" not in space.params:
            raise SearchError(f"--constraint {c}: {c.metric} needs '{needed}' in eval.metrics of the space "
                              f"(it measures {', '.join(measured)}); add it, e.g. eval.metrics=[clean,ibp,{needed}]")
    return [str(c) for c in constraints]


def as_float(value: Any) -> float:
    """A flag's value as a float; NaN (which every range check refuses) when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def positive_seconds(value: Any, flag: str = "--max-trial-seconds", unit: str = "device-seconds") -> float:
    seconds = as_float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise SearchError(f"{flag}: must be a number of {unit} > 0, got {str(value)[:40]!r}")
    return seconds


def trial_share(value: Any, seconds_budget: float | None, scheduler: str) -> float | None:
    """--max-trial-share: a fraction in (0, 1] of the seconds budget; by default DEFAULT_TRIAL_SHARE wherever a
    seconds budget meets the warmup-aware ASHA (the cap is its rule), else none."""
    from tuner.run.trial_share import DEFAULT_TRIAL_SHARE

    if value in (None, ""):
        return DEFAULT_TRIAL_SHARE if seconds_budget is not None and scheduler == "asha" else None
    share = as_float(value)
    if not (math.isfinite(share) and 0 < share <= 1):
        raise SearchError(f"--max-trial-share: must be a fraction in (0, 1] of --max-trial-seconds, "
                          f"got {str(value)[:40]!r}")
    if seconds_budget is None:
        raise SearchError("--max-trial-share: goes with --max-trial-seconds (it is a share of that budget)")
    if scheduler != "asha":
        raise SearchError("--max-trial-share: only the warmup-aware scheduler (--scheduler asha) caps a trial's share")
    return share


def checkpoint_seconds(value: Any) -> float:
    seconds = as_float(value)
    if not 0 <= seconds <= 86_400:  # NaN fails too
        raise SearchError(f"--checkpoint-every: must be seconds in [0, 86400] (0: every epoch), got {str(value)[:40]!r}")
    return seconds


def max_epochs_at_target(space: SearchSpace, fidelity: str = "target") -> int:
    """The most epochs at target ε any trial of the space can have at the fidelity (places the ASHA rungs).

    Epochs at target = epochs − first target epoch + 1, largest with the most epochs and the shortest ramp:
    the low corner (shortest ramp) with `epochs` (if searched) at its high bound, the high corner, the
    defaults and the seed points are tried; the largest count wins.
    """
    points = [space.corner("low"), space.corner("high")]
    if "epochs" in space.params:
        points.append(space.corner("low", fixed={"epochs": space.corner("high")["epochs"]}))
    points += space.start_points()
    best = 1
    for point in points:
        try:
            cfg = epochs_at_fidelity(space.to_train_config(point), fidelity)
        except (SpaceError, ConfigError):
            continue  # a corner may be outside the space's conditions; the others still count
        best = max(best, epochs_at_target(cfg.epochs, first_target_epoch(cfg.schedule)))
    return best


def epochs_at_fidelity(cfg, fidelity: str):
    """A point's config with the fidelity's epochs and schedule (the subset fidelity keeps the epochs, and needs
    the data to size its batch, so it is left as it is)."""
    compress = Fidelity.parse(fidelity)
    return compress.trial_config(cfg) if compress.kind == "epochs" else cfg




# ---- preparing, running, resuming ----------------------------------------------------------------
def prepare_search(space_path: str | dict, overrides: dict[str, Any], name: str | None, num_samples: Any,
                   max_concurrent: Any, resources: str, scheduler: str, objective: str, storage: str | None,
                   address: str | None, wandb_project: str | None, data_dir: str | None, seed: Any,
                   sampler: str = "tpe", max_trial_epochs: Any = None, max_trial_seconds: Any = None,
                   constraints: list[str] | None = None, optuna_storage: str | None = None,
                   warm_start: str | None = None, enqueue: str | None = None,
                   wandb_artifacts: bool = False, checkpoint_every: Any = None, fidelity: str | None = None,
                   reeval_top: Any = 0, reeval_seeds: Any = 0, rungs: str | None = None,
                   grace_seconds: Any = None, select_by: str | None = None, select_top: Any = 3,
                   select_n: Any = None, max_trial_share: Any = None, startup_trials: Any = None
                   ) -> tuple[SearchRecord, str]:
    """Check every input (one SearchError/SpaceError at the first problem) and write the record.

    W&B is on when a project is given, or `WANDB_PROJECT` is set (W&B's own convention).

    Returns the record and the normalised storage; nothing has been started yet.
    """
    from trainers.data import resolve_data_dir

    path, raw = space_source(space_path)  # a file, a shipped name, or a dict (tuner/api.py)
    space = space_with_overrides(raw, overrides, path)
    objectives, modes = parse_objective(objective, space)
    checked_constraints = check_constraints(constraints, space)
    if scheduler not in SCHEDULERS:
        raise SearchError(f"--scheduler: {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if sampler not in SAMPLERS:
        raise SearchError(f"--sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
    trial_fidelity = space.fidelity if fidelity in (None, "") else Fidelity.parse(fidelity)
    trial_fidelity.check(space.base_config)
    from tuner.run.schedulers import default_rungs, make_scheduler
    rungs = rungs or default_rungs(space.searched_names())
    grace_seconds = None if grace_seconds in (None, "") else positive_seconds(grace_seconds, "--grace-seconds", "seconds")
    seconds_budget = None if max_trial_seconds in (None, "") else positive_seconds(max_trial_seconds)
    share = trial_share(max_trial_share, seconds_budget, scheduler)
    make_scheduler(scheduler, objectives[0], modes[0], max_epochs_at_target(space, str(trial_fidelity)),
                   rungs=rungs if scheduler == "asha" else "epochs", grace_seconds=grace_seconds)  # validates
    samples = positive_int("--num-samples", num_samples)
    top, seeds = check_reeval(reeval_top, reeval_seeds, samples, len(space.start_points()), bool(space.defaults))
    select_by, select_top, select_n = check_selection(select_by, select_top, select_n)
    budget_epochs = None if max_trial_epochs in (None, "") else positive_int("--max-trial-epochs", max_trial_epochs)
    reserved = ReevalPlan(top, seeds, samples, space.default_point() or None).reserved if top else 0
    startup = startup_trials_of(startup_trials, sampler, samples - reserved, budget_epochs,
                                trial_epochs(space, str(trial_fidelity)), reserved)
    if top and scheduler == "plain-asha":
        raise SearchError("--reeval-top: re-evaluation runs with --scheduler asha or none (plain-asha would stop "
                          "the re-evaluation trials at its rungs)")
    wandb_project = wandb_project or os.environ.get("WANDB_PROJECT") or None
    if wandb_artifacts and not wandb_project:
        raise SearchError("--wandb-artifacts: W&B is off; pass --wandb-project P or set WANDB_PROJECT")
    record = SearchRecord(
        name=check_name(name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"),
        space_path=path, space=raw, objective=objectives, modes=modes, scheduler=scheduler,
        num_samples=samples, fidelity=str(trial_fidelity), reeval_top=top, reeval_seeds=seeds,
        rungs=rungs, grace_seconds=grace_seconds, select_by=select_by, select_top=select_top, select_n=select_n,
        max_concurrent=positive_int("--max-concurrent", max_concurrent),
        resources_per_trial=parse_resources(resources), data_dir=str(resolve_data_dir(data_dir).resolve()),
        overrides=dict(overrides), seed=seed_value(seed), wandb_project=wandb_project,
        wandb_artifacts=bool(wandb_artifacts),
        address=recorded_address(address), sampler=sampler,
        max_trial_epochs=budget_epochs, startup_trials=startup,
        max_trial_seconds=seconds_budget, max_trial_share=share,
        seconds_device=device_weight(parse_resources(resources))[0], constraints=checked_constraints,
        stop_markers=True,
        **({} if checkpoint_every in (None, "") else {"checkpoint_every_s": checkpoint_seconds(checkpoint_every)}))
    if check_address(address) is None:  # a fresh local instance (tuner/run/cluster.py: --address, RAY_ADDRESS)
        if Path(record.data_dir).exists() and not Path(record.data_dir).is_dir():
            raise SearchError(f"--data-dir {record.data_dir}: not a directory; pass --data-dir or set CERTTUNE_DATA")
        check_fits(record.resources_per_trial, local_resources())
        check_data(space, record.data_dir)
        record.method_costs = check_fidelity_and_costs(space, trial_fidelity, record.data_dir)
    storage = normalize_storage(storage)
    check_study_inputs(record, space, storage, optuna_storage, warm_start, enqueue)
    record.location = experiment_path(storage, record.name)
    hold_driver_lock(storage, record.name)  # released when run_search ends (or with this process)
    try:
        if experiment_exists(storage, record.name):
            raise SearchError(f"--name {record.name}: a search of that name already exists in {storage}; "
                              f"continue it with `certtune resume {record.name}` or choose another --name")
        write_record(record, storage)
    except BaseException:
        release_driver_lock(storage, record.name)
        raise
    return record, storage


def check_study_inputs(record: SearchRecord, space: SearchSpace, storage: str, optuna_storage: str | None,
                       warm_start: str | None, enqueue: str | None) -> None:
    """--optuna-storage, --warm-start and --enqueue (tuner/study/journal.py), checked and put into the record."""
    from tuner.study.journal import (check_new_study, check_own_journal, journal_path, read_enqueue_file,
                             study_storage_kind, warm_start_trials)

    record.study_storage = study_storage_kind(optuna_storage, storage)
    if record.study_storage != "journal":  # a fresh experiment directory has no study yet
        check_new_study(record, storage)
    else:
        check_own_journal(journal_path(storage, record.name))
    if enqueue:
        record.enqueue = read_enqueue_file(enqueue, space)
    if warm_start:
        if record.study_storage == "memory":
            raise SearchError("--warm-start: a search with a remote --storage needs --optuna-storage URL to "
                              "hold its study")
        warm_start_trials(warm_start, storage, space, record.objective, record.modes)  # checks the spaces
        record.warm_start = warm_start


def experiment_exists(storage: str, name: str) -> bool:
    from ray import tune
    return tune.Tuner.can_restore(experiment_path(storage, name))


def check_data(space: SearchSpace, data_dir: str) -> None:
    """The data every trial of a local search reads is under `data_dir`, downloaded there once (MNIST,
    CIFAR-10; the directory is created if missing) before Ray starts rather than by every trial, and
    `data.subset`/`data.val_size`/`data.test_subset` fit it. The default point and the space's corners are
    checked. Missing data that cannot be downloaded is one line naming the dataset, the path and the ways to
    bring it (trainers/data.py: a source that does not answer fails in seconds)."""
    from trainers.data import DataError, load_splits

    points = [space.default_point() or {}, space.corner("low"), space.corner("high")]
    checked = set()
    for point in points:
        try:
            cfg = space.to_train_config(point)
        except (SpaceError, ConfigError):
            continue  # a corner may be outside the space's conditions
        key = (cfg.dataset, cfg.data.npz, cfg.data.val_size, cfg.data.subset, cfg.data.test_subset, cfg.seed)
        if key in checked:
            continue
        checked.add(key)
        try:
            if cfg.dataset == "tinyimagenet" and not cfg.data.npz:  # thousands of image files: only look
                if not (Path(data_dir) / "tiny-imagenet-200" / "train").is_dir():
                    raise DataError(f"TinyImageNet not found under {data_dir} (expected "
                                    f"{Path(data_dir) / 'tiny-imagenet-200' / 'train'}; not downloaded "
                                    f"automatically), or set data.npz=FILE to an .npz of uint8 images")
                continue
            load_splits(cfg.dataset, data_dir, cfg.data, cfg.seed, download=True)
        except DataError as e:
            raise SearchError(f"{cfg.dataset} data, checked before starting Ray: {first_line(e)}") from None


def check_fidelity_and_costs(space: SearchSpace, fidelity: Fidelity, data_dir: str) -> dict[str, float]:
    """A subset fidelity is smaller than the target's training split, and each method's trial cost relative to
    the first trial's when the space searches `method` (tuner/space/costs.py): both from the split's size,
    counted once on the data (the defaults point's dataset)."""
    if fidelity.kind != "subset" and "method" not in space.params:
        return {}
    from trainers.data import DataError, train_split_size
    from tuner.space.costs import method_costs

    target = space.to_train_config(space.default_point() or space.corner("low"))
    try:
        images = train_split_size(target.dataset, data_dir, target.data)
    except DataError as e:
        raise SearchError(f"{target.dataset} data, checked before starting Ray: {first_line(e)}") from None
    try:
        fidelity.trial_config(target, images)
    except ConfigError as e:
        raise SearchError(f"--fidelity {fidelity}: {first_line(e).removeprefix(f'fidelity {fidelity}: ')}") from None
    if "method" not in space.params:
        return {}
    return {m: round(c, 3) for m, c in method_costs(space, fidelity, images).items()}


def seed_value(seed: Any) -> int:
    """An integer in [0, 2**32), the range of the trials' own `seed` (checked here, before Ray starts)."""
    try:
        value = int(seed)
    except (TypeError, ValueError, OverflowError):
        raise SearchError(f"--seed: must be an integer, got {str(seed)[:60]!r}") from None
    if isinstance(seed, float) and seed != value or not 0 <= value < 2**32:
        raise SearchError(f"--seed: must be an integer in [0, 2**32), got {str(seed)[:60]}")
    return value


def connect_ray(address: str | None) -> None:
    """Join the cluster that `address` (a --address value, `RAY_ADDRESS` when None or `auto`) names, or start
    a fresh local Ray instance sized to this machine (tuner/run/cluster.py has the rules).

    A local instance starts Ray's dashboard when `ray[default]` is installed (Ray picks a free port from
    8265 up; the URL is printed). The trials' own output (their errors, a diverged trial's reason) is
    forwarded to this driver's log; tuner/tracking/outcome.py adds one line per failed trial on top."""
    import ray

    if ray.is_initialized():
        return
    joined = resolve_address(address)
    if joined is None:
        context = ray.init(address="local", num_cpus=local_cpus(), log_to_driver=True)
        if context.dashboard_url:
            print(f"certtune: Ray dashboard at http://{context.dashboard_url}", flush=True)
        return
    try:
        ray.init(address=joined, log_to_driver=True)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ... for a bad cluster
        raise SearchError(f"Ray address {joined}: could not join the Ray cluster ({first_line(e)})") from None


def local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def local_resources() -> dict[str, float]:
    import torch
    return {"CPU": local_cpus(), "GPU": torch.cuda.device_count()}


def check_fits(resources: dict[str, float], available: dict[str, float]) -> None:
    """A trial asking for more than the local instance has would wait forever: say so before it starts."""
    for key, ray_key in (("cpu", "CPU"), ("gpu", "GPU")):
        if resources.get(key, 0) > available.get(ray_key, 0):
            raise SearchError(f"--resources-per-trial: {key}={resources[key]:g} but this machine has "
                              f"{available.get(ray_key, 0):g} {ray_key}s; lower it or join a cluster with --address")


def trial_dirname(trial) -> str:
    """Short trial directory names (Ray's default packs every sampled param into the name)."""
    return f"trial_{trial.trial_id}"


def build_tuner(record: SearchRecord, storage: str, trainable=None):
    """The Tuner of a search. `trainable` replaces the real trial (tuner/run/trial.py) for benchmarks of the
    service itself; it gets the same resources, searcher, scheduler, checkpoints and callbacks."""
    import functools

    from ray import tune

    from tuner.tracking.outcome import TrialOutcomeLog
    from tuner.run.schedulers import make_scheduler
    from tuner.study.searcher import HonestOptunaSearch
    from tuner.study.journal import open_storage, train_config_dict
    from tuner.tracking.trial_runs import wandb_callback
    from tuner.run.trial import make_trainable

    space = record.build_space()
    single = len(record.objective) == 1
    # The space's defaults and seeds first, then the --enqueue points. TPE reads the constraints the searcher
    # sets on each trial; random sampling ignores them (export still honours them).
    points = [p for p in space.start_points() + list(record.enqueue) if p]
    sampler = make_sampler(record)
    reeval = reeval_plan(record, space)
    searcher = HonestOptunaSearch(space=space.define_by_run,
                                  metric=record.objective[0] if single else list(record.objective),
                                  mode=record.modes[0] if single else list(record.modes),
                                  points_to_evaluate=points or None,
                                  sampler=sampler, seed=None if sampler else record.seed,
                                  storage=open_storage(record, storage), study_name=record.name,
                                  train_config=functools.partial(train_config_dict, space),
                                  constraints=parse_constraints(record.constraints), reeval=reeval,
                                  # with a budget, the search's own points end while the re-evaluations fit in it
                                  budget=make_budget(record, storage) if reeval else None)
    # The scheduler takes one metric: the first objective.
    scheduler = make_scheduler(record.scheduler, record.objective[0], record.modes[0],
                               max_epochs_at_target(space, record.fidelity),
                               rungs=record.rungs if record.scheduler == "asha" else "epochs",
                               grace_seconds=record.grace_seconds, trial_seconds_cap=record.trial_seconds_cap())
    callbacks = [TrialOutcomeLog(record.objective)] + [c for c in [wandb_callback(record)] if c]
    return tune.Tuner(
        tune.with_resources(trainable or make_trainable(record), dict(record.resources_per_trial)),
        # reuse_actors: a finished trial's worker process runs the next trial instead of a new process
        # being started (seconds per trial, measured in bench/search_overhead.py).
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=record.num_samples,
                                    max_concurrent_trials=record.max_concurrent, trial_dirname_creator=trial_dirname,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=record.name, storage_path=storage, verbose=1,
            stop=make_budget(record, storage),
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            # Two checkpoints per trial are kept. Ray forces an experiment snapshot (which costs O(trials))
            # when a trial has saved num_to_keep checkpoints since the last one, so a restored experiment
            # never points at a deleted checkpoint. Trials checkpoint at most every checkpoint_every_s
            # (tuner/run/trial.py), so with two kept the periodic snapshot (every >= 10 s) nearly always comes
            # first and the forced ones are rare: the search's overhead stays flat as it grows.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks))


def reeval_plan(record: SearchRecord, space: SearchSpace) -> ReevalPlan | None:
    """The search's re-evaluation (tuner/study/reeval.py), None without --reeval-top."""
    if not record.reeval_top:
        return None
    return ReevalPlan(record.reeval_top, record.reeval_seeds, record.num_samples, space.default_point() or None)


def make_budget(record: SearchRecord, storage: str):
    """The stopper of a search with a budget (None without): it counts from what the experiment already holds,
    on local or URI storage, so a resumed search does not get its budget again (tuner/run/budget.py)."""
    from tuner.run.budget import SearchBudget

    if not record.has_budget():
        return None
    return SearchBudget(record.max_trial_epochs, experiment_path(storage, record.name),
                        record.max_trial_seconds, record.seconds_weight()[1])


def make_sampler(record: SearchRecord):
    """The Optuna sampler of a search: uniform random sampling, seeded; or TPE with Optuna 5's defaults
    (multivariate for one objective) but `startup_trials` random ones first and a good set that holds more than one
    trial in a small search (`good_trials`), seeded (None for a record from before:
    Ray builds Optuna's default TPE with the search's seed, and refuses a sampler together with its seed argument)."""
    import optuna

    if record.sampler == "random":
        return optuna.samplers.RandomSampler(seed=record.seed)
    if record.startup_trials is None:
        return None
    return small_search_tpe(record.startup_trials, record.seed)


def small_search_tpe(startup_trials: int, seed: int | None):
    """Optuna 5's TPE with `startup_trials` random trials first and `good_trials` as its good set."""
    import optuna

    with warnings.catch_warnings():
        # Optuna 4.9 deprecated `gamma` (removal planned for 6.0; pyproject keeps optuna < 6): nothing for a user to do
        warnings.filterwarnings("ignore", message=".*`gamma`.*", category=FutureWarning)
        return optuna.samplers.TPESampler(n_startup_trials=startup_trials, gamma=good_trials, seed=seed)


SMALL_SEARCH_GOOD_TRIALS = 3  # a good set of 3 trials is a region of the space, not a kernel around one point


def good_trials(ended: int) -> int:
    """TPE's good set (Optuna's `gamma`): how many of the trials that have ended count as the better ones, the
    density TPE samples from (finished trials first, then early-stopped ones by the furthest rung reached). Optuna's
    10 % (at most 25) holds one trial until 11 have ended; in a search of a dozen trials where the rungs let one
    finish, that one is the space's defaults point (run first), and TPE proposes near it only (issue 19's benchmark,
    runs 3 and 4: 10 of TPE's 12 proposals took the defaults' batch size, 4 of 12 random draws did). So a quarter of
    the trials, up to 3, or Optuna's 10 % where that is more: from 21 ended trials on, it is Optuna's own rule."""
    return max(min(math.ceil(ended / 10), 25), min(SMALL_SEARCH_GOOD_TRIALS, math.ceil(ended / 4)))


MIN_STARTUP_TRIALS = 2  # TPE splits the trials it has into better and worse: it needs two


def startup_trials_of(value: Any, sampler: str, main_trials: int, budget_epochs: int | None, epochs_per_trial: int,
                      reeval_trials: int) -> int | None:
    """--startup-trials: how many trials TPE samples at random before it models the results. By default Optuna's
    10, or a quarter of the search's own trials where that is fewer (at least 2): `main_trials` (--num-samples less
    the re-evaluations), or what the trial-epoch budget buys at full length after the re-evaluations, if fewer.
    With Optuna's 10, a search that affords a dozen trials is random search (issue 19's benchmark: a TPE and a
    random search of one seed drew the same points). None: the random sampler, which has no startup."""
    if sampler != "tpe":
        if value not in (None, ""):
            raise SearchError("--startup-trials: goes with --sampler tpe (random sampling has no startup)")
        return None
    if value not in (None, ""):
        return positive_int("--startup-trials", value)
    affordable = main_trials
    if budget_epochs is not None:
        affordable = min(affordable, budget_epochs // max(epochs_per_trial, 1) - reeval_trials)
    return max(MIN_STARTUP_TRIALS, min(OPTUNA_STARTUP_TRIALS, affordable // 4))


def trial_epochs(space: SearchSpace, fidelity: str) -> int:
    """Epochs of the space's defaults point at the fidelity: a full-length trial's cost in trial-epochs (the base
    config's where the defaults do not name every param)."""
    try:
        cfg = space.to_train_config(space.default_point())
    except (SpaceError, ConfigError):
        cfg = space.base_config
    return epochs_at_fidelity(cfg, fidelity).epochs


def run_search(record: SearchRecord, storage: str):
    from tuner.study.journal import create_search_study, warm_start_trials

    hold_driver_lock(storage, record.name)  # prepare_search took it; a caller that did not prepare takes it here
    try:
        warm = None
        if record.warm_start:
            warm = warm_start_trials(record.warm_start, storage, record.build_space(), record.objective,
                                     record.modes)
        create_search_study(record, storage, warm)
        connect_ray(record.address)
        results = build_tuner(record, storage).fit()
        settle(record, storage)
        select_winner(record, storage)
        return results
    finally:
        release_driver_lock(storage, record.name)


def settle(record: SearchRecord, storage: str) -> None:
    """Trials Ray ended without telling the searcher are told to the Optuna storage (tuner/study/journal.py)."""
    from tuner.study.journal import settle_study

    settle_study(record, storage, load_search(record.name, storage).trials)


def select_winner(record: SearchRecord, storage: str) -> None:
    """--select-by: once every trial has ended, certify the top points and record the choice (tuner/results/selection.py)."""
    if not record.select_by:
        return
    from tuner.results.selection import select_and_record

    search = load_search(record.name, storage)
    if not search.is_complete() or search.selection is not None:
        return  # interrupted: the resume selects; selected already: a resume of a finished search changes nothing
    print(f"certtune: certifying the top {record.select_top} points by {record.select_by} on validation "
          f"(--select-by)", flush=True)
    select_and_record(search, storage, "cuda" if record.resources_per_trial.get("gpu") else "cpu")


def resume_search(name: str, storage: str | None, address: str | None):
    """Continue an interrupted search: finished trials stay as they are, unfinished ones resume from their
    last checkpoint, the searcher (Optuna study) continues from its snapshot; errored trials (which used up
    their retries and were told to Optuna as FAIL) stay failed."""
    storage = normalize_storage(storage)
    record = read_record(storage, name)
    check_location(record, storage)  # a copy sharing the original's study database: nothing written, not even a lock
    path = experiment_path(storage, name)
    hold_driver_lock(storage, name)  # before anything is written
    try:
        return _resume(record, storage, path, address)
    finally:
        release_driver_lock(storage, name)


def _resume(record: SearchRecord, storage: str, path: str, address: str | None):
    from ray import tune

    from tuner.tracking.trial_runs import prepare_resume
    from tuner.run.trial import make_trainable

    name = record.name
    if not tune.Tuner.can_restore(path):
        raise SearchError(f"search {name!r} in {storage} has no Ray experiment state to resume "
                          f"(it stopped before its first trial); start it again with `certtune search`")
    search = check_experiment_readable(record, storage)  # before anything is written
    set_aside_superseded(record, storage, search)
    address = resume_flag(address, record.address)  # --address, else RAY_ADDRESS, else the search's own
    if check_address(address) is None:
        check_fits(record.resources_per_trial, local_resources())
    record.build_space()  # the space must still be valid with this version of certtune
    stand_in_for_lost_checkpoints(record, storage)  # after the checks: a refused resume writes nothing more
    connect_ray(address)
    prepare_resume(record.wandb_project)
    trainable = tune.with_resources(make_trainable(record), dict(record.resources_per_trial))
    tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                               restart_errored=False)
    relocate(tuner, record, storage)
    results = tuner.fit()
    settle(record, storage)
    select_winner(record, storage)
    return results


def relocate(tuner, record: SearchRecord, storage: str) -> None:
    """The restored search works where the experiment is now, a copy or a moved one included (tuner/run/
    relocate.py), and the record says so."""
    from tuner.run.relocate import relocate_restored
    from tuner.study.journal import open_storage

    relocate_restored(tuner, storage, record.name, open_storage(record, storage), record.max_concurrent,
                      make_budget(record, storage), make_budget(record, storage))
    here = experiment_path(storage, record.name)
    if record.location != here:
        record.location = here
        write_record(record, storage)


def check_experiment_readable(record: SearchRecord, storage: str) -> Search:
    """Before Ray starts: every trial directory Ray's state names is inside the experiment (a copy whose state
    points at the original is refused: tuner/results/experiment.py `inside`), the experiment's own files are
    regular files (Ray would block reading a FIFO named tuner.pkl) and the search's journal parses
    (tuner/study/journal.py check_journal). Returns the search as read."""
    from trainers.input_files import regular_file_size
    from tuner.study.journal import check_journal, journal_path

    search = load_search(record.name, storage)
    if is_uri(storage):
        return search
    for path in sorted(Path(experiment_path(storage, record.name)).iterdir()):
        if not path.is_dir():
            try:
                regular_file_size(path, "a file of the experiment")
            except ConfigError as e:
                raise SearchError(str(e)) from None
    if record.study_storage == "journal":
        path = journal_path(storage, record.name)
        if path.exists():
            check_journal(path)
    return search


def set_aside_superseded(record: SearchRecord, storage: str, search: Search | None = None) -> list[str]:
    """Before a resume: a trial the killed driver started after its last experiment snapshot is unknown to the
    restored experiment, and its Optuna trial is still RUNNING; the resumed searcher hands that Optuna trial
    (its params) to a new Ray trial (HonestOptunaSearch.suggest), which trains it again. Its directory gets a
    SUPERSEDED_FILE (kept, not moved: object stores cannot rename a directory), so report and export list
    each trial once; its epochs still count as compute spent. A trial that finished after the snapshot is
    told to Optuna already and stays a trial. `search`: the experiment as just read (else read here).
    Returns the directories marked."""
    from optuna.trial import TrialState

    from tuner.study.journal import existing_study, open_storage

    stray = [t for t in (search or load_search(record.name, storage)).trials if not t.in_state and t.dirname]
    optuna_storage = open_storage(record, storage) if stray else None  # None: no storage, or nothing stray
    study = existing_study(record.name, optuna_storage) if optuna_storage is not None else None
    if study is None:
        return []
    running = {ot.user_attrs.get(RAY_TRIAL_ID) for ot in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    root = experiment_path(storage, record.name)
    marked = []
    for trial in (t for t in stray if t.trial_id in running):
        target = f"{root}/{trial.dirname}/{SUPERSEDED_FILE}"
        note = json.dumps({"reason": "started after the last experiment snapshot of a killed driver; its Optuna "
                                     "trial was handed to a new trial on resume", "at": time.time()}) + "\n"
        try:
            write_text(target, note)
            marked.append(f"{root}/{trial.dirname}")
        except (OSError, ValueError) as e:
            print(f"certtune: could not mark {root}/{trial.dirname} superseded ({first_line(e)}); report may "
                  f"list it as well", flush=True)
    if marked:
        print(f"certtune: {len(marked)} trial(s) started after the last snapshot will be trained again; their "
              f"directories are kept, marked {SUPERSEDED_FILE}", flush=True)
    return marked


LOST_CHECKPOINT_FILE = "certtune_checkpoint_lost.json"  # the only file of a stand-in for a lost checkpoint


def stand_in_for_lost_checkpoints(record: SearchRecord, storage: str) -> list[str]:
    """Before a resume: an unfinished trial whose last checkpoint in Ray's saved state is gone (the driver was
    killed after Ray deleted it for a newer one and before the snapshot naming the newer one) would fail Ray's
    restore ("does not exist on storage anymore"), retried until ERROR, before the trial's own fallback runs.
    A directory holding only a note stands in for it: Ray restores from it, `restore_run` (tuner/run/trial.py)
    finds no last.pt there, and the trial trains again from epoch 1; its rerun epochs replace the earlier rows
    (the reader keeps each epoch's latest). Not from a newer checkpoint: the results after the snapshot never
    reached the storage, so the trial's history would miss epochs. Local or URI storage (s3://, file://, ...).
    Returns the stand-ins written."""
    import tempfile

    from tuner.results.experiment import download_experiment

    root = experiment_path(storage, record.name)
    if not is_uri(storage):
        missing = [rel for rel in checkpoints_named(Path(root)) if not (Path(root) / rel).exists()]
    else:
        import pyarrow.fs

        fs, base = pyarrow.fs.FileSystem.from_uri(root)
        with tempfile.TemporaryDirectory() as local:  # the state files, read as the readers read them
            named = checkpoints_named(download_experiment(root, Path(local)))
        missing = [rel for rel in named if fs.get_file_info(f"{base}/{rel}").type == pyarrow.fs.FileType.NotFound]
    note = json.dumps({"reason": "the trial's last checkpoint was deleted by Ray before the killed driver "
                                 "snapshotted the newer one; the trial trains again from epoch 1",
                       "at": time.time()}) + "\n"
    for rel in missing:
        write_text(f"{root}/{rel}/{LOST_CHECKPOINT_FILE}", note)
    if missing:
        print(f"certtune: {len(missing)} trial(s) lost their last checkpoint with the killed driver; they train "
              f"again from epoch 1", flush=True)
    return [f"{root}/{rel}" for rel in missing]


def checkpoints_named(experiment: Path) -> list[str]:
    """The last checkpoint of each trial Ray's newest saved state (in local `experiment`) will restore, as a path
    relative to the experiment (`trial_x/checkpoint_000003`); the state keeps the path where the search ran. A
    log dir that leaves the experiment is refused, as the readers refuse it."""
    from tuner.results.experiment import inside, newest_state_file, read_experiment_state

    named = []
    for info, runtime in read_experiment_state(experiment):
        manager = (runtime.get("checkpoint_manager") or {}).get("value")
        if info.get("status") in ("TERMINATED", "ERROR") or not manager or not info.get("relative_logdir"):
            continue  # not restored, or nothing to restore from
        name = latest_checkpoint_name(manager)
        if name:
            logdir = inside(experiment, str(info["relative_logdir"]), newest_state_file(experiment))
            named.append(f"{logdir.relative_to(experiment).as_posix()}/{name}")
    return named


CHECKPOINT_DIR = re.compile(r"(?:^|/)(checkpoint_(\d{1,12}))/?$")


def latest_checkpoint_name(manager_hex: str) -> str:
    """The newest checkpoint directory (`checkpoint_000003`) Ray's pickled checkpoint manager names, "" if none.
    Read opcode by opcode (pickletools.genops), never unpickled: the state is a file handed to us, and Ray
    numbers a trial's checkpoints in order, so the newest it keeps is the highest number among the paths."""
    import pickletools

    found = {}
    try:
        for _, arg, _ in pickletools.genops(bytes.fromhex(manager_hex)):
            if isinstance(arg, str) and (match := CHECKPOINT_DIR.search(arg)):
                found[int(match.group(2))] = match.group(1)
    except ValueError:  # not hex, or a damaged pickle: Ray's restore says what is wrong with it
        return ""
    return found[max(found)] if found else ""


# ---- the summary printed when a search or resume ends --------------------------------------------
MAX_REASONS = 5


def summarize(search: Search, storage: str) -> str:
    """Counts by status, trial-epochs, the best finished trial, and why trials failed when every one did.
    Read from the experiment directory by tuner/results/experiment.py, as `report` and `export` read it, so the three
    agree on statuses and on the best trial (the same tie-break)."""
    record = search.record
    counts = ", ".join(f"{n} {s}" for s, n in search.counts().items() if n)
    lines = [f"search {record.name}: {len(search.trials)} trials ({counts}), {search.budget_text()}",
             f"experiment: {search.location}"]
    best = search.best()
    if best is not None:
        values = " ".join(f"{o}={search.score(best, o).mean:.6g}" for o in search.objectives)
        feasible = search.feasible(best)
        which = "best finished trial" + (" satisfying every constraint" if record.constraints and feasible else "")
        lines.append(f"{which}: {values} trial_id={best.trial_id} {json.dumps(best.params, sort_keys=True)}")
        if not feasible:
            lines.append(f"no finished trial satisfies every constraint ({', '.join(record.constraints)}); "
                         f"the one above is the best finished trial regardless")
    from tuner.results.selection import selection_lines
    lines += selection_lines(search)
    if search.all_failed():
        lines.append(f"every trial failed ({len(search.trials)}); reasons:")
        reasons: dict[str, int] = {}
        for t in search.trials:
            reason = failure_reason(t.diverged, t.error)
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, n in list(reasons.items())[:MAX_REASONS]:
            lines.append(f"  {n} x {reason}")
    elif not search.is_complete():
        ended = sum(n for s, n in search.counts().items() if s in ENDED)
        lines.append(f"interrupted with {ended} of {record.num_samples} trials ended; continue with: "
                     f"certtune resume {record.name} --storage {storage}")
    return "\n".join(lines)


def exit_code(search: Search) -> int:
    """0: the search ended (every trial, or the budget); 1: interrupted, or every trial failed."""
    return 0 if search.is_complete() and not search.all_failed() else 1


def finish(record: SearchRecord, storage: str) -> tuple[str, int]:
    """(summary, exit code) of a search whose Tuner.fit returned, read back from its experiment."""
    search = load_search(record.name, storage)
    if record.wandb_project:
        from tuner.tracking.search_run import log_search_run
        log_search_run(search, storage)
    return summarize(search, storage), exit_code(search)
