"""The search record (`certtune_search.json`) and where a search's experiment lives.

The record holds everything a search was started with (the space file's contents included), written into
`<storage>/<name>/` before the Tuner starts, so `resume`, `report` and `export` rebuild the space without the
original files. Storage is a local path or a URI (s3://, gs://, ...) that Ray and pyarrow understand.
A search name is one path component, so a name never reaches outside `--storage`.
"""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from trainers.config import ConfigError, TrainConfig, set_dotted
from trainers.errors import shown
from trainers.files import UnsafeFileError, open_lock, take_lock, write_atomic
from trainers.input_files import parse_json, read_text
from tuner.space.search_space import SearchSpace, load_space, parse_space_yaml

RECORD_FILE = "certtune_search.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME_CHARS = 100


class SearchError(ConfigError):
    """Bad input to a search (storage, address, resources, objective, name, ...): one line, exit code 2."""


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
    # TPE samples at random until this many of the search's trials have ended (tuner/run/driver.py startup_trials_of);
    # None: Optuna's own OPTUNA_STARTUP_TRIALS (records from before).
    startup_trials: int | None = None
    max_trial_epochs: int | None = None  # compute budget in trial-epochs (tuner/run/budget.py); None: num_samples only
    max_trial_seconds: float | None = None  # compute budget in device-seconds (tuner/run/budget.py); None: no limit
    # The most of max_trial_seconds one trial may take (tuner/run/trial_share.py); None: no cap (records from before).
    max_trial_share: float | None = None
    seconds_device: str | None = None  # what a trial's train_seconds are weighted by: "gpu" or "cpu" (device_weight)
    constraints: list[str] = field(default_factory=list)  # e.g. ["clean_err<=0.35"] (tuner/space/constraints.py)

    # Where the Optuna study lives (tuner/study/journal.py): "journal", an RDB URL, "memory"; "" = recorded before
    # studies had a storage (only in Ray's searcher pickle).
    study_storage: str = ""
    warm_start: str | None = None  # --warm-start: a search name in storage, or STORAGE#STUDY
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # --enqueue: points evaluated first (after defaults)

    wandb_artifacts: bool = False  # log each finished trial's best.pt to W&B as a model artifact
    # A trial saves a checkpoint at its last epoch and once this many seconds of training have passed since
    # its last one (0: every epoch); tuner/run/trial.py CheckpointClock, docs/decisions.md.
    checkpoint_every_s: float = 30.0
    # The trials' fidelity (tuner/space/fidelity.py): `target`, `epochs:E` or `subset:N`; the space's `fidelity`
    # section unless --fidelity says otherwise. Export always writes the target run.
    fidelity: str = "target"
    # Re-evaluation (tuner/study/reeval.py): once the other trials have ended, the best `reeval_top` points and the
    # space's defaults are trained again with `reeval_seeds` more seeds each, within --num-samples.
    reeval_top: int = 0
    reeval_seeds: int = 0
    # What the warmup-aware ASHA's rungs count at the target ε (tuner/run/schedulers.py): "epochs", or "seconds"
    # (the default for spaces that search `method`); `grace_seconds` places the first rung in seconds.
    rungs: str = "epochs"
    grace_seconds: float | None = None
    # --select-by (tuner/results/selection.py): when the trials have ended, the top `select_top` points are certified by
    # this verifier on the first `select_n` validation images (all when None) and the winner picked by it.
    select_by: str | None = None
    select_top: int = 0
    select_n: int | None = None
    # A space that searches `method`: each method's trial cost relative to the first, estimated before the search
    # from measured step costs (tuner/space/costs.py); {} otherwise, or when the data is not on this machine.
    method_costs: dict[str, float] = field(default_factory=dict)
    # Where the experiment last ran (experiment_path). A resume elsewhere (a copy, a move) rebases Ray's and the
    # searcher's saved paths onto where it is now (tuner/run/relocate.py) and records the new place here.
    location: str | None = None
    # The warmup-aware scheduler leaves a marker in each trial it stops (rung or share; tuner/run/schedulers.py), so a
    # stopped trial without one was ended by the budget. False: a search recorded before the markers.
    stop_markers: bool = False

    def seconds_weight(self) -> tuple[str, float]:
        """(device, weight): a trial's train_seconds count `weight` device-seconds each (device_weight)."""
        device = self.seconds_device or device_weight(self.resources_per_trial)[0]
        return device, float(self.resources_per_trial.get(device, 0) or 0)

    def has_budget(self) -> bool:
        """A compute budget (trial-epochs or device-seconds) ends the search, not only --num-samples."""
        return self.max_trial_epochs is not None or self.max_trial_seconds is not None

    def trial_seconds_cap(self) -> float | None:
        """The most training seconds one trial may take: its share of the device-seconds budget, unweighted."""
        if self.max_trial_share is None or self.max_trial_seconds is None:
            return None
        return self.max_trial_share * self.max_trial_seconds / (self.seconds_weight()[1] or 1.0)

    def build_space(self) -> SearchSpace:
        return space_with_overrides(self.space, self.overrides, self.space_path)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = RECORD_FILE) -> "SearchRecord":
        try:
            raw = parse_json(text, where)  # strict: no NaN/Infinity, bounded nesting
        except ConfigError as e:
            raise SearchError(str(e)) from None
        if not isinstance(raw, dict):
            raise SearchError(f"{where}: not a certtune search record (not a JSON object)")
        check_record_fields(raw, where)
        try:
            return cls(**raw)
        except TypeError as e:
            raise SearchError(f"{where}: not a certtune search record ({e})") from None


MAX_RECORD_BYTES = 16 * 2**20  # the record holds a space file (at most 1 MiB of YAML) and the flags


def check_record_fields(raw: dict, where: str) -> None:
    """Each field of a record read back has the type its annotation names: a record edited by hand
    (`"objective": "ibp_err"`) is named here, not misread later (as every trial failing)."""
    unknown = sorted(set(raw) - {f.name for f in fields(SearchRecord)})
    if unknown:
        raise SearchError(f"{where}: not a certtune search record (unknown field {shown(unknown[0])})")
    for f in fields(SearchRecord):
        if f.name in raw and not _fits(raw[f.name], str(f.type)):
            raise SearchError(f"{where}: field '{f.name}' must be {f.type}, got {shown(raw[f.name])}")


def _fits(value: Any, annotation: str) -> bool:
    """`value` against an annotation string of the record's own kinds (str, int, float, bool, None,
    list[...], dict[...] and unions of them)."""
    options = [a.strip() for a in re.split(r"\|(?![^\[]*\])", annotation)]
    return any(_fits_one(value, option) for option in options)


def _fits_one(value: Any, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    simple = {"None": value is None, "str": isinstance(value, str), "bool": isinstance(value, bool),
              "int": number and isinstance(value, int), "float": number, "Any": True}
    if kind in simple:
        return simple[kind]
    inner = kind[kind.index("[") + 1:-1] if "[" in kind else "Any"
    if kind.startswith("list"):
        return isinstance(value, list) and all(_fits(v, inner) for v in value)
    if kind.startswith("dict"):
        value_kind = inner.split(",", 1)[1].strip() if "," in inner else "Any"
        return isinstance(value, dict) and all(_fits(v, value_kind) for v in value.values())
    return False


def device_weight(resources: dict[str, float]) -> tuple[str, float]:
    """The rule of the seconds budget: a trial's seconds are weighted by the GPUs it holds if it holds any
    (0.5 GPU for 100 s is 50 GPU-seconds), else by its CPUs. Recorded in the search record (`seconds_device`)
    so the budget, report, export and resume count alike."""
    gpus = float(resources.get("gpu", 0) or 0)
    return ("gpu", gpus) if gpus > 0 else ("cpu", float(resources.get("cpu", 1) or 1))


_BUILT: dict[str, SearchSpace] = {}  # space + overrides + source (as JSON) -> the space built from them
SPACE_BUILDS = {"count": 0}  # spaces built (parsed and validated) in this process: tests/test_spaces.py


def space_with_overrides(raw: dict, overrides: dict[str, Any], source: str) -> SearchSpace:
    """The space with KEY=VALUE overrides applied to its base config, validated: built once per process.

    The driver, each trial process (every trial and retry it runs), the readers and the W&B upload all build
    the space from the record; a space is read-only once built, so each process builds it once and shares it.
    """
    try:
        key = json.dumps([raw, overrides, source], sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        return build_space(raw, overrides, source)  # not plain JSON: build_space names what is wrong
    if key not in _BUILT:
        _BUILT[key] = build_space(raw, overrides, source)
    return _BUILT[key]


def build_space(raw: dict, overrides: dict[str, Any], source: str) -> SearchSpace:
    """The space with KEY=VALUE overrides applied to its base config, validated again.

    Overrides change the base before the space is built, so bound expressions (`epochs - schedule.start`),
    derived knobs and the defaults point all see them. A searched param cannot be overridden.
    """
    SPACE_BUILDS["count"] += 1
    raw = copy.deepcopy(raw) if isinstance(raw, dict) else raw
    if overrides and isinstance(raw, dict):
        searched = set(raw.get("params") or {})
        fixed = sorted(set(overrides) & searched)
        if fixed:
            raise SearchError(f"override {fixed[0]}={overrides[fixed[0]]!r}: '{fixed[0]}' is searched by the "
                              f"space {source}; overrides may only change base values")
        base = TrainConfig.from_dict(raw.get("base") or {}).to_dict()
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
    return str(resolved), parse_space_yaml(resolved.read_text(), str(resolved))


DICT_SPACE = "api-space"  # the source (and default search name) of a space handed over as a dict


def space_source(space: Any) -> tuple[str, dict]:
    """(source, parsed mapping) of a space given as a file, a shipped space name, or a dict (Python API). A dict
    is stored in the record as JSON, so it must hold plain values; the space itself is validated by the caller."""
    if isinstance(space, dict):
        try:
            return DICT_SPACE, json.loads(json.dumps(space, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise SearchError(f"space: a dict space holds plain YAML values only ({first_line(e)})") from None
    if not isinstance(space, (str, Path)):
        raise SearchError(f"space: expected a space file, a shipped space name or a dict, got {type(space).__name__}")
    return read_space_file(str(space))


def check_name(name: str, flag: str = "--name") -> str:
    """A search name is one path component: `../other` or `/abs/path` never leave `--storage`."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SearchError(f"{flag}: a search name uses letters, digits, '.', '_' and '-' (no '/', not starting "
                          f"with '.'), got {name!r:.300}")
    if len(name) > MAX_NAME_CHARS:  # a file name holds 255 bytes; Ray and certtune add to it
        raise SearchError(f"{flag}: {len(name)} characters; a search name has at most {MAX_NAME_CHARS}")
    return name


OPTUNA_STARTUP_TRIALS = 10  # TPESampler's n_startup_trials unless told otherwise


def positive_int(flag: str, value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = None
    if n is None or n < 1 or str(value).strip() != str(n):
        # str(): the CLI's '0' and the API's 0 read the same
        raise SearchError(f"{flag}: must be an integer >= 1, got {str(value)!r}")
    return n


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
    check_name(name, "search name")
    return f"{storage.rstrip('/')}/{name}" if is_uri(storage) else str(Path(storage) / name)


def write_record(record: SearchRecord, storage: str) -> str:
    """Write certtune_search.json into the experiment directory; also the check that storage is writable."""
    target = f"{experiment_path(storage, record.name)}/{RECORD_FILE}"
    try:
        write_text(target, record.to_json())
    except (OSError, ValueError) as e:  # pyarrow raises OSError subclasses, or ArrowInvalid (a ValueError)
        raise SearchError(f"--storage {storage}: cannot write the experiment there ({first_line(e)})") from None
    return target


def write_text(target: str, text: str) -> None:
    """Write a small file at a local path (atomically) or a URI (through pyarrow), creating its folder."""
    if is_uri(target):
        import pyarrow.fs
        write_text_on(*pyarrow.fs.FileSystem.from_uri(target), text)
    else:
        write_local(Path(target), text)


def write_text_on(fs, path: str, text: str) -> None:
    """Write a small file at `path` of a pyarrow filesystem (Ray's storage of a trial, say), creating its folder;
    on a local one atomically, as a local path."""
    import pyarrow.fs

    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        write_local(Path(path), text)
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def write_local(path: Path, text: str) -> None:
    """A fresh temporary file, then a rename; never through a link (trainers/files.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


DRIVER_LOCK = ".lock"  # in a local experiment directory: held (flock) by the driver running the search
_held_locks: dict[str, int] = {}  # experiment directory -> descriptor holding its lock, in this process


def hold_driver_lock(storage: str, name: str) -> None:
    """One driver per experiment: `search` and `resume` hold an exclusive `flock` on `<experiment>/.lock`
    (as `train` does on its --out) before they write anything, so a second driver of the same --name and
    --storage gets one line naming the first (pid and host) instead of rewriting the record and running the
    search twice. The kernel releases the lock when its holder ends, `kill -9` included, so a dead driver's
    lock is simply taken over. Held again by the same process: nothing to do. A URI storage (s3://, ...) has
    no lock: object stores have no flock (docs/reliability.md)."""
    if is_uri(storage):
        return
    folder = Path(experiment_path(storage, name))
    if str(folder) in _held_locks:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = open_lock(folder / DRIVER_LOCK)
    except UnsafeFileError as e:
        raise SearchError(f"search {name!r}: {e}") from None
    except OSError as e:
        raise SearchError(f"--storage {storage}: cannot write the experiment there ({e.strerror or e})") from None
    owner = take_lock(fd)
    if owner is not None:
        os.close(fd)
        raise SearchError(f"search {name!r} in {storage} is being run by another certtune driver (pid {owner}); "
                          f"wait for it to end, or stop it first (a killed driver's lock goes with it)")
    _held_locks[str(folder)] = fd


def release_driver_lock(storage: str, name: str) -> None:
    fd = None if is_uri(storage) else _held_locks.pop(str(Path(experiment_path(storage, name))), None)
    if fd is not None:
        os.close(fd)


def check_location(record: SearchRecord, storage: str) -> None:
    """`resume` of a copied or moved experiment works on the copy (tuner/run/relocate.py), except where the
    study is not in the experiment: an RDB --optuna-storage (a database URL) is shared by the original and
    every copy, so a resumed copy would add its trials to the original's study. Refused in one line."""
    here = experiment_path(storage, record.name)
    if record.location is None or record.location == here or record.study_storage in ("", "memory", "journal"):
        return
    raise SearchError(f"search {record.name!r} was started in {record.location} and is now read from {here}, but "
                      f"its Optuna study lives in the database {record.study_storage}, which the original shares: "
                      f"a resumed copy would add its trials to the original's study; resume the original, or "
                      f"start a new search with --warm-start")


def read_record(storage: str, name: str) -> SearchRecord:
    target = f"{experiment_path(storage, name)}/{RECORD_FILE}"
    try:
        if is_uri(storage):
            import pyarrow.fs
            fs, path = pyarrow.fs.FileSystem.from_uri(target)
            with fs.open_input_stream(path) as f:
                text = f.read().decode()
        elif os.path.lexists(target):
            text = read_text(target, MAX_RECORD_BYTES, RECORD_FILE)  # a FIFO or a huge file: one line
        else:
            raise FileNotFoundError(target)
    except (OSError, UnicodeDecodeError):
        raise SearchError(f"no search named {name!r} in {storage} ({RECORD_FILE} not found); "
                          f"pass the --storage it ran with") from None
    return SearchRecord.from_json(text, target)
