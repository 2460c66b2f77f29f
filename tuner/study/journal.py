"""The Optuna study of a search, kept in an Optuna storage; warm starts and enqueued points.

Where the study lives (`SearchRecord.study_storage`, the study name is the search name):
  "journal"      Optuna's JournalStorage file `<storage>/<name>/optuna_journal.log` (the default for a local
                 --storage; docs/decisions.md says why a journal file and not SQLite);
  an RDB URL     `--optuna-storage sqlite:///...|postgresql://...|mysql://...`, for a shared database;
  "memory"       a remote --storage (s3://, ...) without --optuna-storage: in memory, saved only inside Ray's
                 searcher snapshot, as before;
  ""             a search recorded before the study had a storage (only Ray's pickle; never loaded here).

Everything read here is JSON (the journal) or rows (an RDB): nothing is unpickled, so a warm start from a
study someone hands us cannot run code.

    storage = open_storage(record, root)              # None for "memory"
    create_search_study(record, root)                 # before the Tuner: directions, metric names, warm trials
    study = load_search_study(record, root)           # what optuna.load_study shows (tests, export, report)
    points = read_enqueue_file(path, space)           # --enqueue FILE.yaml
    trials = warm_start_trials(spec, root, space, objectives)   # --warm-start SEARCH or STORAGE#STUDY
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from trainers.config import ConfigError
from trainers.input_files import read_bytes
from tuner.study.keys import CONFIG_OF, FAIL_REASON, RAY_TRIAL_ID, SEED_OFFSET
from tuner.space.record import (SearchError, SearchRecord, check_name, experiment_path, first_line, is_uri,
                          read_record)
from tuner.space.search_space import SearchSpace, SpaceError
from tuner.study.verdict import ENDED, FAILED, failure_reason, settled_state, values_at_target

JOURNAL_FILE = "optuna_journal.log"
WARM_START_FROM = "warm_start_from"  # user attr of a trial copied from an earlier study: "<study>@<storage>"
WARM_START_TRIAL = "warm_start_trial"  # ... and its number there
CONFIG_PREFIX = "config."  # user attrs `config.<dotted key>`: the trial's resolved training config


# ---- storages ----------------------------------------------------------------------------------------
def journal_path(root: str, name: str) -> Path:
    return Path(experiment_path(root, name)) / JOURNAL_FILE


def study_storage_kind(optuna_storage: str | None, root: str) -> str:
    """What `SearchRecord.study_storage` is for a new search (checked: an RDB URL must open)."""
    if optuna_storage:
        open_rdb(optuna_storage, "--optuna-storage", create=True)
        return optuna_storage
    return "memory" if is_uri(root) else "journal"


def open_storage(record: SearchRecord, root: str):
    """The Optuna storage of a search, or None when it has none (in memory, or recorded before storages)."""
    kind = record.study_storage
    if kind in ("", "memory"):
        return None
    if kind == "journal":
        return open_journal(journal_path(root, record.name))
    return open_rdb(kind, "optuna storage", create=False)


def open_journal(path: Path, create: bool = True):
    """The JournalStorage of a search's own journal file, which this driver appends to. A line torn by a
    crash at the end (no newline) is cut off first: Optuna skips a torn last line when reading, but the next
    append would glue onto it and make the whole rest of the file unreadable. Only a search's own journal,
    during its own search or resume, is opened so; a study that is only read (--warm-start) goes through
    `read_journal`, which never writes."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if not create and not path.exists():
        raise SearchError(f"{path}: no such Optuna journal file")
    check_own_journal(path)
    if path.is_file():
        check_journal(path)
        cut_torn_tail(path)
    # The open(O_CREAT|O_EXCL) lock works on NFSv3+ (symlink locks are the other choice; both recover a lock
    # left by a killed writer after the grace period).
    return optuna.storages.JournalStorage(JournalFileBackend(str(path), JournalFileOpenLock(str(path))))


def check_own_journal(path: Path) -> None:
    """A search's journal is absent or a regular file: a link planted there would have Optuna append to its
    target (Optuna opens the journal by name for every append)."""
    from trainers.files import UnsafeFileError, check_target

    try:
        check_target(path)
    except UnsafeFileError as e:
        raise SearchError(f"Optuna journal {e}") from None


MAX_JOURNAL_BYTES = 1 << 30  # about a million trials' worth of journal lines


def check_journal(path: Path) -> None:
    """The journal is a regular file whose every complete line is an Optuna journal entry (a JSON object with
    an integer op_code): a garbled journal is one line naming it, found before Ray starts, instead of
    Optuna's JSONDecodeError inside the searcher. A torn last line (no newline) is what a crash leaves."""
    try:
        data = read_bytes(path, MAX_JOURNAL_BYTES, "Optuna journal")
    except ConfigError as e:
        raise SearchError(str(e)) from None
    lines = data.split(b"\n")[:-1]  # the part after the last newline is torn or empty
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            entry = None
        if not (isinstance(entry, dict) and isinstance(entry.get("op_code"), int)):
            raise SearchError(f"{path}: line {number} is not an Optuna journal entry; the journal is damaged "
                              "(a copy from before the damage, or a fresh search, is the way on)")


def cut_torn_tail(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
    with os.fdopen(fd, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_journal(path: Path, flag: str):
    """A JournalStorage that only reads `path` (another search's journal, a file named by --warm-start): the
    file is read once, never opened for writing, no lock file is made beside it. A torn last line is skipped
    (as Optuna does); a file that is not a journal is one SearchError line naming it."""
    import optuna
    from optuna.storages.journal import BaseJournalBackend

    from trainers.files import UnsafeFileError, read_regular

    class ReadOnlyJournal(BaseJournalBackend):
        def read_logs(self, log_number_from: int):
            return iter(logs[log_number_from:])

        def append_logs(self, new_logs) -> None:
            raise SearchError(f"{path}: read only; certtune never writes a study it only reads")

    try:
        data = read_regular(path)
    except UnsafeFileError as e:
        raise SearchError(f"{flag} {e}") from None
    except OSError as e:
        raise SearchError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    logs = []
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], 1):  # the part after the last newline is torn or empty
        try:
            log = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            log = None
        if not isinstance(log, dict) or "op_code" not in log:
            raise SearchError(f"{flag} {path}: not an Optuna journal file (line {number} is not a journal entry)")
        logs.append(log)
    if data and not logs:
        raise SearchError(f"{flag} {path}: not an Optuna journal file (no complete journal line)")
    try:
        return optuna.storages.JournalStorage(ReadOnlyJournal())
    except SearchError:
        raise
    except Exception as e:  # noqa: BLE001 - a replay of entries that do not fit together fails in many ways
        raise SearchError(f"{flag} {path}: not a readable Optuna journal ({first_line(e)})") from None


def open_rdb(url: str, flag: str, create: bool):
    """An RDBStorage on `url`, checked: a URL, no password in it (it would be written to the search
    record), an SQLite file that exists unless `create`, and a database that answers."""
    import optuna
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - sqlalchemy raises ArgumentError and others
        raise SearchError(f"{flag}: {url!r} is not a database URL (e.g. sqlite:///study.db, "
                          f"postgresql://user@host/db)") from None
    if parsed.password:
        raise SearchError(f"{flag}: the URL holds a password, which certtune would write into "
                          f"certtune_search.json; give it through the database client's own means instead "
                          f"(PGPASSWORD or ~/.pgpass for PostgreSQL, an option file for MySQL)")
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database or ""
        if not db or db == ":memory:":
            raise SearchError(f"{flag}: an SQLite URL needs a file, e.g. sqlite:////abs/path/study.db")
        if not create and not Path(db).is_file():
            raise SearchError(f"{flag}: SQLite file {db} not found")
        if create:
            Path(db).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # noqa: BLE001 - driver missing, connection refused, not a database, ...
        raise SearchError(f"{flag}: cannot open {url}: {first_line(e)}") from None


# ---- the study of a search ---------------------------------------------------------------------------
def check_new_study(record: SearchRecord, root: str) -> None:
    """A new search's study name must not already hold trials in its storage (a shared RDB may hold other
    searches' studies; an earlier start that stopped before Ray saved anything leaves an empty one)."""
    study = existing_study(record.name, open_storage(record, root))
    if study is not None and study.trials:
        raise SearchError(f"--name {record.name}: the Optuna storage {record.study_storage} already has a study "
                          f"of that name with {len(study.trials)} trials; choose another --name")


def existing_study(name: str, storage):
    import optuna

    if storage is None:
        return None
    if name not in {s.study_name for s in storage.get_all_studies()}:
        return None
    return optuna.load_study(study_name=name, storage=storage)


def create_search_study(record: SearchRecord, root: str, warm_trials: list | None = None) -> None:
    """Create the study (named after the search, objectives as metric names) before Ray's searcher loads it,
    and add the warm-start trials. Nothing to do for a search without a storage."""
    import optuna

    storage = open_storage(record, root)
    if storage is None:
        return
    directions = ["minimize" if m == "min" else "maximize" for m in record.modes]
    if record.study_storage == "journal" and existing_study(record.name, storage) is not None:
        # Left by a start that stopped before Ray saved anything (prepare_search found no experiment):
        # start clean, so warm-start trials are not added twice.
        optuna.delete_study(study_name=record.name, storage=storage)
    study = optuna.create_study(study_name=record.name, storage=storage, directions=directions,
                                load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(record.objective))
    for trial in warm_trials or []:
        study.add_trial(trial)


def load_search_study(record: SearchRecord, root: str):
    """The search's study as `optuna.load_study` sees it."""
    import optuna

    if record.study_storage == "":
        raise SearchError(f"search {record.name!r} predates certtune's Optuna storage: its study exists only "
                          f"inside Ray's searcher pickle, which certtune does not load (report and export "
                          f"read the trials themselves and still work)")
    storage = open_storage(record, root)
    if storage is None:
        raise SearchError(f"search {record.name!r} kept its study in memory (remote --storage without "
                          f"--optuna-storage); only Ray's searcher snapshot holds it")
    try:
        return optuna.load_study(study_name=record.name, storage=storage)
    except KeyError:
        raise SearchError(f"search {record.name!r}: no Optuna study of that name in {record.study_storage} "
                          f"(the search stopped before its first trial)") from None


def settle_study(record: SearchRecord, root: str, trials: list) -> int:
    """Tell the storage how trials ended that Ray ended without telling the searcher: when the trial-epoch
    budget stops the experiment, the trials still running are stopped (PRUNED, with the values they reached
    at target ε), and Ray does not call the searcher for them. `trials` are tuner.results.experiment TrialRecords (the
    report's reading); only ended ones are told, so an interrupted search keeps its open trials for
    `certtune resume`. Returns how many were told."""
    from optuna.trial import TrialState

    storage = open_storage(record, root)
    study = existing_study(record.name, storage)
    if study is None:
        return 0
    by_ray = {t.trial_id: t for t in trials}
    space = record.build_space()
    told = 0
    for ot in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial = by_ray.get(ot.user_attrs.get(RAY_TRIAL_ID))
        if trial is None or trial.status not in ENDED:
            continue
        state = TrialState[settled_state(trial.status)]
        values = [trial.value(o) for o in record.objective] if state == TrialState.COMPLETE else None
        if state == TrialState.FAIL:
            storage.set_trial_user_attr(ot._trial_id, FAIL_REASON, failure_reason(trial.diverged, trial.error, FAILED))
        if state == TrialState.PRUNED and len(record.objective) == 1:
            for step, value in enumerate(values_at_target(trial.history, record.objective[0]), 1):
                if step not in ot.intermediate_values and value is not None:
                    storage.set_trial_intermediate_value(ot._trial_id, step, float(value))
        if record.reeval_top and CONFIG_OF not in ot.user_attrs:
            storage.set_trial_user_attr(ot._trial_id, CONFIG_OF, trial.config_of)
            storage.set_trial_user_attr(ot._trial_id, SEED_OFFSET, trial.seed_offset)
        try:
            config = flat_config(train_config_dict(space, ot.params))
        except SpaceError:
            config = {}
        for key, setting in config.items():
            storage.set_trial_user_attr(ot._trial_id, key, setting)
        storage.set_trial_state_values(ot._trial_id, state, values)
        told += 1
    return told


def flat_config(config: dict, prefix: str = CONFIG_PREFIX) -> dict[str, Any]:
    """{"config.lr": 0.001, "config.schedule.start": 1, ...}: the user attrs of a trial's training config."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---- --enqueue FILE.yaml -----------------------------------------------------------------------------
def read_enqueue_file(path: str, space: SearchSpace) -> list[dict[str, Any]]:
    """A YAML list of points (mappings from searched param to value), each checked like the space's
    defaults: every param active at the point given, each in its domain, the config valid."""
    from trainers.safe_yaml import read_yaml_file

    raw = read_yaml_file(path, "--enqueue file")
    if not isinstance(raw, list) or not raw:
        raise SearchError(f"--enqueue {path}: expected a YAML list of points (mappings param: value), got "
                          f"{type(raw).__name__}")
    points = []
    for i, point in enumerate(raw, 1):
        if not isinstance(point, dict) or not all(isinstance(k, str) for k in point):
            raise SearchError(f"--enqueue {path}: point {i} is not a mapping of param names to values")
        try:
            kept = space.active_values(point)
            space.to_train_config(kept)
        except SpaceError as e:
            raise SearchError(f"--enqueue {path}: point {i}: {e.where}: {e.problem}") from None
        points.append(kept)
    return points


# ---- --warm-start SEARCH | STORAGE#STUDY -------------------------------------------------------------
def warm_start_source(spec: str, root: str):
    """(study, label) of a --warm-start value: a search name in --storage, or `STORAGE#STUDY` with STORAGE
    an RDB URL (sqlite:///..., postgresql://...) or the path of a journal file."""
    import optuna

    if "#" in spec:
        where, _, study_name = spec.rpartition("#")
        if not where or not study_name:
            raise SearchError(f"--warm-start: expected SEARCH or STORAGE#STUDY, got {spec!r}")
        storage = open_rdb(where, "--warm-start", create=False) if "://" in where else \
            read_journal(Path(where).expanduser(), "--warm-start")
    else:
        study_name = check_name(spec, "--warm-start")
        record = read_record(root, spec)
        # that search's journal is read, never repaired or locked: it is not ours
        storage = read_journal(journal_path(root, spec), f"--warm-start {spec}:") \
            if record.study_storage == "journal" else open_storage(record, root)
        if storage is None:
            raise SearchError(f"--warm-start {spec}: that search has no Optuna storage (it predates it, or ran "
                              f"with a remote --storage and no --optuna-storage)")
    try:
        return optuna.load_study(study_name=study_name, storage=storage), spec
    except KeyError:
        raise SearchError(f"--warm-start {spec}: no study named {study_name!r} in that storage") from None


def warm_start_trials(spec: str, root: str, space: SearchSpace, objectives: list[str], modes: list[str]) -> list:
    """The earlier study's COMPLETE and PRUNED trials as new FrozenTrials for this search's study, after
    checking that the spaces agree: same objectives, and for every shared param the distribution this
    space gives at that trial's point equals the one the trial was sampled from (first mismatch named)."""
    import optuna
    from optuna.trial import TrialState

    study, label = warm_start_source(spec, root)
    directions = ["minimize" if m == "min" else "maximize" for m in modes]
    theirs = [d.name.lower() for d in study.directions]
    if theirs != directions:
        raise SearchError(f"--warm-start {label}: its study has directions {theirs}, this search {directions}")
    names = study.metric_names
    if names is not None and list(names) != list(objectives):
        raise SearchError(f"--warm-start {label}: its objectives are {list(names)}, this search's {objectives}")
    out, shared_any = [], False
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        ours = distributions_at(space, t.params)
        shared = [n for n in t.params if n in space.params]
        for n in shared:
            if n in ours and ours[n] != t.distributions[n]:
                raise SearchError(f"--warm-start {label}: param {n!r} of its trial {t.number} was sampled from "
                                  f"{t.distributions[n]}, this space samples {ours[n]}")
        if not shared:
            continue
        shared_any = True
        attrs = {k: v for k, v in t.user_attrs.items() if k not in (RAY_TRIAL_ID, FAIL_REASON)}
        attrs.update({WARM_START_FROM: label, WARM_START_TRIAL: t.number})
        out.append(optuna.trial.create_trial(
            state=t.state, values=t.values if t.state == TrialState.COMPLETE else None,
            params={n: t.params[n] for n in shared}, distributions={n: t.distributions[n] for n in shared},
            user_attrs=attrs, intermediate_values=dict(t.intermediate_values)))
    if not out:
        reason = "shares no searched param with this space" if not shared_any and study.trials else \
            "has no finished or pruned trial"
        raise SearchError(f"--warm-start {label}: its study {reason}")
    return out


class _DistributionProbe:
    """Stands in for an Optuna trial while a space suggests: answers with the given values and notes the
    distribution of each suggest call (what this space would sample at that point)."""

    def __init__(self, values: dict[str, Any]):
        self.values, self.distributions = values, {}

    def _take(self, name: str, dist, fallback: Any) -> Any:
        self.distributions[name] = dist
        return self.values.get(name, fallback)

    def suggest_float(self, name, low, high, *, step=None, log=False):
        from optuna.distributions import FloatDistribution
        return self._take(name, FloatDistribution(low, high, log=log, step=step), low)

    def suggest_int(self, name, low, high, *, step=1, log=False):
        from optuna.distributions import IntDistribution
        return self._take(name, IntDistribution(low, high, log=log, step=step), low)

    def suggest_categorical(self, name, choices):
        from optuna.distributions import CategoricalDistribution
        return self._take(name, CategoricalDistribution(choices), choices[0])


def distributions_at(space: SearchSpace, values: dict[str, Any]) -> dict[str, Any]:
    """{param: Optuna distribution} this space samples from at the point `values` (active params only)."""
    probe = _DistributionProbe(values)
    try:
        space.suggest(probe)
    except SpaceError:
        pass  # bounds empty at this point: the params recorded so far are compared
    return probe.distributions


def train_config_dict(space: SearchSpace, params: dict[str, Any]) -> dict[str, Any]:
    """The resolved training config of a sampled point (module-level, so a searcher holding it pickles)."""
    return space.config_of(params).to_dict()
