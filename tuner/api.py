"""The Python API: the CLI's operations as functions (`import certtune; certtune.search(...)`).

Each function is the CLI subcommand of the same name with keyword arguments for its flags; the CLI
(tuner/commands.py, tuner/cli.py) calls these, so both check input the same way and raise the same errors:
a ConfigError subclass (SearchError, SpaceError, ExportError, DataError, ...) with a one-line message, raised
before anything is trained. Ray, Optuna, W&B and torch are imported only when a function runs.

    search(space, ...)  → Search           report(name)  → pandas DataFrame, one row per trial
    resume(name)        → Search           export(name)  → dict of the files written and the best trial
    train(config, ...)  → final metrics    verify(checkpoint, ...) → certified errors
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from trainers.config import ConfigError, TrainConfig, parse_overrides
from trainers.verifiers import default, names

SPLITS = ("test", "val")


def _overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """A dict of dotted keys, or CLI-style `KEY=VALUE` strings (values parsed as YAML, as on the command line)."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    if isinstance(overrides, (list, tuple)) and all(isinstance(o, str) for o in overrides):
        return parse_overrides(list(overrides))
    raise ConfigError(f"overrides: expected a dict or a list of 'KEY=VALUE' strings, got {overrides!r}")


def _comma_list(flag: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    raise ConfigError(f"{flag}: expected a name or a list of names, got {value!r}")


def _resources(value: str | dict[str, float]) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return value


# ---- searches ------------------------------------------------------------------------------------------
def search(space: str | Path | dict, overrides: dict[str, Any] | list[str] | None = None, *, name: str | None = None,
           num_samples: int = 20, max_concurrent: int = 2, resources_per_trial: str | dict = "cpu=1,gpu=0",
           scheduler: str = "asha", objective: str | list[str] = "ibp_err", storage: str | None = None,
           address: str | None = None, wandb_project: str | None = None, data_dir: str | Path | None = None,
           seed: int = 0, sampler: str = "tpe", max_trial_epochs: int | None = None,
           max_trial_seconds: float | None = None, constraints: list[str] | None = None,
           optuna_storage: str | None = None, warm_start: str | None = None, enqueue: str | Path | None = None,
           wandb_artifacts: bool = False, checkpoint_every: float | None = None, fidelity: str | None = None,
           reeval_top: int = 0, reeval_seeds: int = 0, rungs: str | None = None,
           grace_seconds: float | None = None, select_by: str | None = None, select_top: int = 3,
           select_n: int | None = None, max_trial_share: float | None = None, startup_trials: int | None = None,
           echo: bool = True):
    """`certtune search`: a space file, a shipped space name (`mnist_tiny`) or a space as a dict (the YAML's
    mapping). Every input is checked first (and, for a local search, the data is downloaded once); then the
    trials run. Returns the search read back (tuner.results.experiment.Search: `.best()`, `.trials`, `.counts()`).
    `checkpoint_every`: seconds of training between a trial's checkpoints (default 30; 0: every epoch).
    `fidelity`: `target`, `epochs:E` or `subset:N` (tuner/space/fidelity.py; default: the space's). `reeval_top`,
    `reeval_seeds`: re-evaluate the best points on more seeds at the end (tuner/study/reeval.py). `rungs`: "epochs"
    or "seconds" at the target ε (tuner/run/schedulers.py; default seconds when the space searches `method`).
    `select_by` (a verifier), `select_top`, `select_n`: pick the winner by that certificate on validation
    (tuner/results/selection.py). `max_trial_share`: the most of `max_trial_seconds` one trial may take (default
    1/3 with a seconds budget and the warmup-aware ASHA; tuner/run/trial_share.py). `startup_trials`: TPE's random
    trials before it models the results (default: Optuna's 10, or a quarter of the trials the search affords).
    `echo` prints the experiment path and the summary, as the CLI does."""
    from tuner.run.driver import finish, prepare_search, run_search

    record, storage = prepare_search(
        space, _overrides(overrides), name, num_samples, max_concurrent, _resources(resources_per_trial), scheduler,
        _comma_list("objective", objective), None if storage is None else str(storage), address, wandb_project,
        None if data_dir is None else str(data_dir), seed, sampler, max_trial_epochs, max_trial_seconds,
        constraints, optuna_storage, warm_start, None if enqueue is None else str(enqueue), wandb_artifacts,
        checkpoint_every, fidelity=fidelity, reeval_top=reeval_top, reeval_seeds=reeval_seeds,
        rungs=rungs, grace_seconds=grace_seconds, select_by=select_by, select_top=select_top, select_n=select_n,
        max_trial_share=max_trial_share, startup_trials=startup_trials)
    if echo:
        print(f"search {record.name}: experiment in {storage}/{record.name}", flush=True)
        if record.method_costs:
            from tuner.space.costs import cost_line
            print(f"search {record.name}: {cost_line(record.method_costs)}", flush=True)
    run_search(record, storage)
    return _finished(record, storage, echo)


def resume(name: str, *, storage: str | None = None, address: str | None = None, echo: bool = True):
    """`certtune resume`: continue an interrupted search; returns it read back, as `search` does."""
    from tuner.space.record import normalize_storage, read_record
    from tuner.run.driver import resume_search

    resume_search(name, None if storage is None else str(storage), address)
    storage = normalize_storage(None if storage is None else str(storage))
    return _finished(read_record(storage, name), storage, echo)


def _finished(record, storage: str, echo: bool):
    """The search read back once Tuner.fit returned; `finish` also logs the W&B search run."""
    from tuner.results.experiment import load_search
    from tuner.run.driver import finish

    summary, _ = finish(record, storage)
    if echo:
        print(summary, flush=True)
    return load_search(record.name, storage)


def report(name: str, *, storage: str | None = None):
    """`certtune report` as a pandas DataFrame: one row per trial in the report's order (finished trials
    ranked by objective(s), ties by creation order; then running, stopped, failed, pending), with the columns
    of trials.csv (trial_id, status, rank, param.*, final metrics, wall_seconds, diverged, error)."""
    import pandas as pd

    from tuner.results.export import trial_table
    from tuner.results.report import ordered_trials
    from tuner.results.experiment import load_search

    found = load_search(name, None if storage is None else str(storage))
    header, rows = trial_table(found, ordered_trials(found))
    table = pd.DataFrame(rows, columns=header)
    table.attrs.update(name=found.name, objectives=found.objectives, location=found.location)
    return table


def export(name: str, *, storage: str | None = None, out: str | Path | None = None, top_k: int = 5,
           epochs: int | None = None, verify: str | None = None, verify_n: int | None = None,
           data_dir: str | Path | None = None, device: str = "cpu",
           alpha_iterations: int = default("alpha_iterations"), alpha_lr: float = default("alpha_lr"),
           bab_time_limit: float = default("bab_time_limit")) -> dict:
    """`certtune export`: best.yaml, top_k/, trials.csv and plots into `out` (default <storage>/<name>/export/);
    returns the paths written and the best trial. With `verify` (ibp, crown-ibp, crown, alpha-crown, bab) the
    top_k trials' best checkpoints are certified on the validation split (its first `verify_n` examples; data
    from `data_dir`, default the search's) and ranked by that (verified.csv)."""
    from tuner.results.export import export_search
    from tuner.space.record import positive_int

    options = None
    if verify is not None:
        from trainers.verify import verifier_options

        options = verifier_options(alpha_iterations, alpha_lr, bab_time_limit)
    return export_search(name, None if storage is None else str(storage), None if out is None else Path(out),
                         positive_int("--top-k", top_k), None if epochs is None else positive_int("--epochs", epochs),
                         verify, None if verify_n is None else positive_int("--verify-n", verify_n), options,
                         None if data_dir is None else str(data_dir), device)


# ---- one configuration --------------------------------------------------------------------------------
def train_config(config: str | Path | dict | TrainConfig, overrides: dict[str, Any] | list[str] | None = None
                 ) -> TrainConfig:
    """A config file, a dict of config keys or a TrainConfig, with overrides applied, resolved and checked."""
    if isinstance(config, TrainConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = TrainConfig.from_dict(config)
    elif isinstance(config, (str, Path)):
        cfg = TrainConfig.from_yaml(config)
    else:
        raise ConfigError(f"config: expected a YAML file, a dict or a TrainConfig, got {type(config).__name__}")
    return cfg.with_overrides(_overrides(overrides)).resolve()


def train(config: str | Path | dict | TrainConfig, overrides: dict[str, Any] | list[str] | None = None, *,
          data_dir: str | Path | None = None, out: str | Path | None = None, device: str = "cpu",
          progress: bool = False, restart: bool = False,
          on_epoch: Callable[[dict, Path | None], None] | None = None) -> dict:
    """`certtune train`: train one configuration; returns the last epoch's metrics. With `out`, the run directory
    (config.yaml, metrics.jsonl, last.pt, best.pt) is written and a rerun resumes it; without, nothing is
    written. `on_epoch(metrics, out)` is called after every epoch."""
    cfg = train_config(config, overrides)
    from trainers.train import Trainer  # torch loads only once the config is known to be good

    trainer = Trainer(cfg, data_dir=data_dir, out_dir=out, device=device, progress=progress)
    return trainer.fit(on_epoch=on_epoch, restart=restart)


def verify(checkpoint: str | Path, *, data_dir: str | Path | None = None, split: str = "test",
           eps: float | None = None, methods: str | list[str] = ",".join(names(per_epoch=True)), device: str = "cpu",
           alpha_iterations: int = default("alpha_iterations"), alpha_lr: float = default("alpha_lr"),
           bab_time_limit: float = default("bab_time_limit"),
           limit: int | None = None, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """`certtune verify`: clean error and the verified errors of `methods` (ibp, crown-ibp, crown, alpha-crown,
    bab, pgd) of a checkpoint on the test (or val) split (its first `limit` examples when given), at its target
    eps unless `eps` is given. `progress(done, total, what runs now)` is called as examples are done
    (`trainers.verify.ProgressLine` prints it, as `certtune verify` does)."""
    if split not in SPLITS:
        raise ConfigError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    from trainers.verify import verifier_options, verify_checkpoint

    options = verifier_options(alpha_iterations, alpha_lr, bab_time_limit)
    return verify_checkpoint(checkpoint, data_dir, split, eps, methods, device, options, limit, progress)
