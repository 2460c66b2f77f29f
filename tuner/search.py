"""`certtune search` and `certtune resume`: a Ray Tune experiment driven by Optuna over a search space.

    record = prepare_search(...)          # validates everything; nothing runs yet
    results = run_search(record, storage)
    results = resume_search(name, storage, address)

One path for a trial (tuner/trial.py): sampled params → `space.to_train_config` → `Trainer.fit`, the same
function `certtune train` runs. The experiment lives in `<storage>/<name>/` (RunConfig(storage_path, name));
`certtune_search.json` there records the search (the space file's contents included) before the Tuner starts,
so `resume` and `export` rebuild the trainable and the space without the original files. The Optuna study
is Ray's searcher state (`searcher-state-*.pkl`), snapshotted with the experiment. Full guide: docs/search.md.
"""
from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


from trainers.config import ConfigError, TrainConfig
from trainers.schedules import first_target_epoch
from tuner.spaces import SearchSpace, SpaceError, load_space, parse_space_yaml

RECORD_FILE = "certtune_search.json"
# Objectives a trial reports (all minimised) and the eval metric the trainer needs for each.
OBJECTIVES = {"ibp_err": "ibp", "clean_err": "clean", "crown_ibp_err": "crown-ibp", "pgd_err": "pgd",
              "train_seconds": None}
SCHEDULERS = ("asha", "plain-asha", "none")
SAMPLERS = ("tpe", "random")
MAX_FAILURES = 3  # retries of a trial from its last checkpoint (a lost node, an OOM kill, ...)
ADDRESS_TIMEOUT_S = 3.0
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# Ray's deprecation notices and per-checkpoint snapshot warnings are noise for our usage.
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


class SearchError(ConfigError):
    """Bad input to a search (storage, address, resources, objective, ...): one line, exit code 2."""


# ---- the search record (certtune_search.json) ---------------------------------------------------
@dataclass
class SearchRecord:
    name: str
    space_path: str
    space: dict  # the space file's parsed YAML
    objective: list[str]
    modes: list[str]
    scheduler: str
    num_samples: int
    max_concurrent: int
    resources_per_trial: dict[str, float]
    data_dir: str
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted base-config overrides (KEY=VALUE)
    seed: int = 0
    wandb_project: str | None = None
    address: str | None = None
    sampler: str = "tpe"  # Optuna's TPE (Optuna 5 defaults) or uniform random sampling, the baseline
    max_trial_epochs: int | None = None  # compute budget in trial-epochs (tuner/budget.py); None: num_samples only

    def build_space(self) -> SearchSpace:
        return space_with_overrides(self.space, self.overrides, self.space_path)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = RECORD_FILE) -> "SearchRecord":
        try:
            raw = json.loads(text)
            return cls(**raw)
        except (ValueError, TypeError) as e:
            raise SearchError(f"{where}: not a certtune search record ({e})") from None


def space_with_overrides(raw: dict, overrides: dict[str, Any], source: str) -> SearchSpace:
    """The space with KEY=VALUE overrides applied to its base config, validated again.

    Overrides change the base before the space is built, so bound expressions (`epochs - schedule.start`),
    derived knobs and the defaults point all see them. A searched param cannot be overridden.
    """
    raw = copy.deepcopy(raw) if isinstance(raw, dict) else raw
    if overrides and isinstance(raw, dict):
        searched = set(raw.get("params") or {})
        fixed = sorted(set(overrides) & searched)
        if fixed:
            raise SearchError(f"override {fixed[0]}={overrides[fixed[0]]!r}: '{fixed[0]}' is searched by the "
                              f"space {source}; overrides may only change base values")
        base = TrainConfig.from_dict(raw.get("base") or {}).to_dict()
        from trainers.config import set_dotted
        for key, value in overrides.items():
            try:
                set_dotted(base, key, value)
            except ConfigError as e:
                raise SearchError(f"override {key}={value!r}: {e}") from None
        raw["base"] = base
    return SearchSpace.from_dict(raw, name=Path(source).stem, source=source)


def read_space_file(path: str) -> tuple[str, dict]:
    """Validate a space file (bare names look in search_spaces/) and return (absolute path, parsed YAML)."""
    space = load_space(path)
    resolved = Path(space.source).resolve()
    return str(resolved), parse_space_yaml(resolved.read_text())


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
                              f"got {value.strip()}")
        if number > 1 and not number.is_integer():
            raise SearchError(f"--resources-per-trial: {key} above 1 must be a whole number, got {number:g}")
        out[key] = int(number) if number.is_integer() else number
    return out


def positive_int(flag: str, value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = None
    if n is None or n < 1 or str(value).strip() != str(n):
        raise SearchError(f"{flag}: must be an integer >= 1, got {value!r}")
    return n


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise SearchError(f"--name: use letters, digits, '.', '_' and '-' (no '/'), got {name!r}")
    return name


def max_epochs_at_target(space: SearchSpace) -> int:
    """The most epochs at target ε any trial of the space can have (places the ASHA rungs).

    Epochs at target = epochs − first target epoch + 1, largest with the most epochs and the shortest ramp:
    the low corner (shortest ramp) with `epochs` (if searched) at its high bound, the high corner, the
    defaults and the seed points are tried; the largest count wins.
    """
    points = [space.corner("low"), space.corner("high")]
    if "epochs" in space.params:
        points.append(space.corner("low", fixed={"epochs": space.corner("high")["epochs"]}))
    points += space.seed_points()
    best = 1
    for point in points:
        try:
            cfg = space.to_train_config(point)
        except (SpaceError, ConfigError):
            continue  # a corner may be outside the space's conditions; the others still count
        best = max(best, cfg.epochs - first_target_epoch(cfg.schedule) + 1)
    return best


def check_address(address: str) -> str:
    """The `host:port` a search would join; one clear error if nothing listens there (a few seconds)."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address
        try:
            resolved = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as e:
            raise SearchError(f"--address auto: no running Ray cluster found on this machine "
                              f"({first_line(e)}); start one with `ray start --head` or pass HOST:PORT") from None
        if resolved is None:
            raise SearchError("--address auto: no running Ray cluster found on this machine; "
                              "start one with `ray start --head` or pass HOST:PORT")
        target = resolved
    else:
        target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SearchError(f"--address: expected auto or HOST:PORT (e.g. 10.0.0.5:6379), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise SearchError(f"--address {address}: cannot reach a Ray cluster at {host}:{port} ({reason}); "
                          f"is `ray start --head` running there?") from None
    return address


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---- storage ---------------------------------------------------------------------------------------
def default_storage() -> str:
    return os.environ.get("CERTTUNE_STORAGE") or str(Path("certtune_results").resolve())


def normalize_storage(storage: str | None) -> str:
    """Absolute local path, or a URI (s3://, gs://, ...) passed to Ray as is."""
    storage = storage or default_storage()
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def is_uri(storage: str) -> bool:
    return "://" in storage


def experiment_path(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if is_uri(storage) else str(Path(storage) / name)


def write_record(record: SearchRecord, storage: str) -> str:
    """Write certtune_search.json into the experiment directory; also the check that storage is writable."""
    target = f"{experiment_path(storage, record.name)}/{RECORD_FILE}"
    try:
        if is_uri(storage):
            import pyarrow.fs
            fs, path = pyarrow.fs.FileSystem.from_uri(target)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(path) as f:
                f.write(record.to_json().encode())
        else:
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(record.to_json())
            os.replace(tmp, path)
    except (OSError, ValueError) as e:  # pyarrow raises OSError subclasses, or ArrowInvalid (a ValueError)
        raise SearchError(f"--storage {storage}: cannot write the experiment there ({first_line(e)})") from None
    return target


def read_record(storage: str, name: str) -> SearchRecord:
    target = f"{experiment_path(storage, name)}/{RECORD_FILE}"
    try:
        if is_uri(storage):
            import pyarrow.fs
            fs, path = pyarrow.fs.FileSystem.from_uri(target)
            with fs.open_input_stream(path) as f:
                text = f.read().decode()
        else:
            text = Path(target).read_text()
    except (OSError, ValueError):
        raise SearchError(f"no search named {name!r} in {storage} ({RECORD_FILE} not found); "
                          f"pass the --storage it ran with") from None
    return SearchRecord.from_json(text, target)


def experiment_exists(storage: str, name: str) -> bool:
    from ray import tune
    return tune.Tuner.can_restore(experiment_path(storage, name))


# ---- preparing, running, resuming ----------------------------------------------------------------
def prepare_search(space_path: str, overrides: dict[str, Any], name: str | None, num_samples: Any,
                   max_concurrent: Any, resources: str, scheduler: str, objective: str, storage: str | None,
                   address: str | None, wandb_project: str | None, data_dir: str | None, seed: Any,
                   sampler: str = "tpe", max_trial_epochs: Any = None) -> tuple[SearchRecord, str]:
    """Check every input (one SearchError/SpaceError at the first problem) and write the record.

    Returns the record and the normalised storage; nothing has been started yet.
    """
    from trainers.data import resolve_data_dir

    path, raw = read_space_file(space_path)
    space = space_with_overrides(raw, overrides, path)
    objectives, modes = parse_objective(objective, space)
    if scheduler not in SCHEDULERS:
        raise SearchError(f"--scheduler: {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if sampler not in SAMPLERS:
        raise SearchError(f"--sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
    from tuner.schedulers import make_scheduler
    make_scheduler(scheduler, objectives[0], modes[0], max_epochs_at_target(space))  # validates
    record = SearchRecord(
        name=check_name(name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"),
        space_path=path, space=raw, objective=objectives, modes=modes, scheduler=scheduler,
        num_samples=positive_int("--num-samples", num_samples),
        max_concurrent=positive_int("--max-concurrent", max_concurrent),
        resources_per_trial=parse_resources(resources), data_dir=str(resolve_data_dir(data_dir).resolve()),
        overrides=dict(overrides), seed=seed_value(seed), wandb_project=wandb_project or None,
        address=address or None, sampler=sampler,
        max_trial_epochs=None if max_trial_epochs in (None, "") else positive_int("--max-trial-epochs",
                                                                                    max_trial_epochs))
    if address is None:
        if not Path(record.data_dir).is_dir():
            raise SearchError(f"--data-dir {record.data_dir}: not a directory; pass --data-dir or set CERTTUNE_DATA")
        check_fits(record.resources_per_trial, local_resources())
    else:
        check_address(address)
    storage = normalize_storage(storage)
    if experiment_exists(storage, record.name):
        raise SearchError(f"--name {record.name}: a search of that name already exists in {storage}; "
                          f"continue it with `certtune resume {record.name}` or choose another --name")
    write_record(record, storage)
    return record, storage


def seed_value(seed: Any) -> int:
    try:
        return int(seed)
    except (TypeError, ValueError):
        raise SearchError(f"--seed: must be an integer, got {seed!r}") from None


def connect_ray(address: str | None) -> None:
    """A local Ray instance (no address) sized to this machine, or join the cluster at `address`."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        ray.init(address="local", num_cpus=local_cpus(), include_dashboard=False, log_to_driver=False)
        return
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ... for a bad cluster
        raise SearchError(f"--address {address}: could not join the Ray cluster ({first_line(e)})") from None


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
    """The Tuner of a search. `trainable` replaces the real trial (tuner/trial.py) for benchmarks of the
    service itself; it gets the same resources, searcher, scheduler, checkpoints and callbacks."""
    import optuna
    from ray import tune

    from tuner.budget import TrialEpochBudget
    from tuner.schedulers import make_scheduler
    from tuner.searcher import HonestOptunaSearch
    from tuner.tracking import wandb_callback
    from tuner.trial import make_trainable

    space = record.build_space()
    single = len(record.objective) == 1
    seeds = space.seed_points()
    # TPE with Optuna 5's defaults (multivariate for one objective), or random sampling; seeded; the
    # space's defaults and seeds first. (Ray refuses a sampler together with its seed argument.)
    sampler = optuna.samplers.RandomSampler(seed=record.seed) if record.sampler == "random" else None
    searcher = HonestOptunaSearch(space=space.define_by_run,
                                  metric=record.objective[0] if single else list(record.objective),
                                  mode=record.modes[0] if single else list(record.modes),
                                  points_to_evaluate=seeds or None,
                                  sampler=sampler, seed=None if sampler else record.seed)
    # The scheduler takes one metric: the first objective.
    scheduler = make_scheduler(record.scheduler, record.objective[0], record.modes[0], max_epochs_at_target(space))
    callback = wandb_callback(record.wandb_project, record.name)
    return tune.Tuner(
        tune.with_resources(trainable or make_trainable(record), dict(record.resources_per_trial)),
        # reuse_actors: a finished trial's worker process runs the next trial instead of a new process
        # being started (seconds per trial, measured in bench/search_overhead.py).
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=record.num_samples,
                                    max_concurrent_trials=record.max_concurrent, trial_dirname_creator=trial_dirname,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=record.name, storage_path=storage, verbose=1,
            stop=None if record.max_trial_epochs is None else TrialEpochBudget(
                record.max_trial_epochs, None if is_uri(storage) else experiment_path(storage, record.name)),
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            # One checkpoint per trial is kept; with num_to_keep set, Ray also snapshots the experiment state
            # after every trial checkpoint, so a restored experiment points at a checkpoint that exists.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[callback] if callback else None))


def run_search(record: SearchRecord, storage: str):
    connect_ray(record.address)
    return build_tuner(record, storage).fit()


def resume_search(name: str, storage: str | None, address: str | None):
    """Continue an interrupted search: finished trials stay as they are, unfinished ones resume from their
    last checkpoint, the searcher (Optuna study) continues from its snapshot; errored trials (which used up
    their retries and were told to Optuna as FAIL) stay failed."""
    from ray import tune

    from tuner.tracking import prepare_resume
    from tuner.trial import make_trainable

    storage = normalize_storage(storage)
    record = read_record(storage, name)
    path = experiment_path(storage, name)
    if not tune.Tuner.can_restore(path):
        raise SearchError(f"search {name!r} in {storage} has no Ray experiment state to resume "
                          f"(it stopped before its first trial); start it again with `certtune search`")
    if address == "local":
        address = None
    elif address is None:
        address = record.address
    if address is not None:
        check_address(address)
    else:
        check_fits(record.resources_per_trial, local_resources())
    record.build_space()  # the space must still be valid with this version of certtune
    connect_ray(address)
    prepare_resume(record.wandb_project)
    trainable = tune.with_resources(make_trainable(record), dict(record.resources_per_trial))
    tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                               restart_errored=False)
    return tuner.fit()


# ---- reading results back ------------------------------------------------------------------------
def load_searcher_state(experiment_dir: str | Path) -> dict:
    """The newest searcher snapshot of a (local) experiment: HonestOptunaSearch's attributes."""
    files = sorted(Path(experiment_dir).glob("searcher-state-*.pkl"))
    if not files:
        raise SearchError(f"{experiment_dir}: no searcher-state-*.pkl (the search has not snapshotted yet)")
    with open(files[-1], "rb") as f:
        return pickle.load(f)


def load_study(experiment_dir: str | Path):
    """The Optuna study saved with a (local) experiment."""
    return load_searcher_state(experiment_dir)["_ot_study"]


def trial_epochs_spent(results) -> int:
    """Σ over trials of the last epoch each reported: the search's compute in trial-epochs."""
    return sum(int((r.metrics or {}).get("epoch") or 0) for r in results)


def is_complete(results, record: SearchRecord) -> bool:
    """Every trial of the search has ended, or its trial-epoch budget is spent (an interrupted Tuner.fit
    returns with trials still open and budget left)."""
    if record.max_trial_epochs is not None and trial_epochs_spent(results) >= record.max_trial_epochs:
        return True
    return results.num_terminated + results.num_errors >= record.num_samples


def summarize(results, record: SearchRecord, storage: str) -> str:
    from tuner.export import trial_status

    counts: dict[str, int] = {}
    best = None
    key = record.objective[0]
    for r in results:
        # The one status rule (tuner/export.py), so `search`'s summary and `report` agree.
        status, _ = trial_status("ERROR" if r.error is not None else "TERMINATED", r.metrics or {},
                                 record.objective)
        counts[status] = counts.get(status, 0) + 1
        value = (r.metrics or {}).get(key)
        if status == "finished" and isinstance(value, (int, float)) and math.isfinite(value):
            if best is None or value < best[0]:
                best = (value, r.config)
    budget = "" if record.max_trial_epochs is None else f" of a budget of {record.max_trial_epochs}"
    lines = [f"search {record.name}: {len(results)} trials (" +
             ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"), {trial_epochs_spent(results)} "
             f"trial-epochs{budget}",
             f"experiment: {experiment_path(storage, record.name)}"]
    if best is not None:
        lines.append(f"best finished trial: {key}={best[0]:.6g} {json.dumps(best[1], sort_keys=True)}")
    if not is_complete(results, record):
        lines.append(f"interrupted with {results.num_terminated + results.num_errors} of {record.num_samples} "
                     f"trials ended; continue with: certtune resume {record.name} --storage {storage}")
    return "\n".join(lines)
