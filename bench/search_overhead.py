"""The search service's own overhead per trial, with a trainable that only sleeps.

    python -m bench.search_overhead --json [--trials 100 1000] [--epochs 5] [--sleep 0.2] [--concurrent 2]
                                           [--checkpoint-every 0 30]

Everything but the training is the real service: the search record, Ray Tune on a local instance,
HonestOptunaSearch (TPE, the paper's point first), warmup-aware ASHA and checkpoints as a real trial saves
them (tuner/run/trial.py CheckpointClock: every `--checkpoint-every` seconds and at the last epoch). Each trial
sleeps `epochs × sleep` seconds and reports made-up metrics (seeded by its sampled params). With C trials at
a time the ideal wall time is Σ sleeps / C, so

    overhead per trial = (wall × C − Σ sleeps) / trials,

the seconds of concurrency slot a trial holds beyond its own work. TPE's suggestion time is reported too
(first and last tenth of the trials, measured apart from the run with the same sampler and space),
since its cost grows with history.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from tuner.run.driver import prepare_search, build_tuner, connect_ray

SPACE = "search_spaces/mnist_tiny.yaml"


def make_sleep_trainable(epochs: int, sleep_s: float, checkpoint_every_s: float):
    def sleep_trial(config: dict) -> None:
        import random
        import tempfile as tf
        from pathlib import Path

        from ray import tune

        from tuner.run.trial import CheckpointClock

        rng = random.Random(str(sorted(config.items())))
        quality = rng.random()
        start = tune.get_checkpoint()
        first = 1
        if start is not None:
            with start.as_directory() as d:
                first = int((Path(d) / "epoch").read_text()) + 1
        clock = CheckpointClock(checkpoint_every_s)  # the real trial's rule (tuner/run/trial.py)
        for epoch in range(first, epochs + 1):
            time.sleep(sleep_s)
            at_target = epoch >= 2
            metrics = {"epoch": epoch, "epochs": epochs, "eps": 0.1 if at_target else 0.05, "eps_target": 0.1,
                       "at_target": at_target, "ibp_err": 0.2 + 0.6 * quality / epoch, "clean_err": 0.05,
                       "train_seconds": epoch * sleep_s}
            if not clock.due(epochs - epoch):
                tune.report(metrics)
                continue
            with tf.TemporaryDirectory() as d:
                (Path(d) / "epoch").write_text(str(epoch))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
    return sleep_trial


def tpe_suggestion_times(space, n: int) -> list[float]:
    """Seconds per TPE suggestion over a history of n trials, with the sampler OptunaSearch builds
    (TPESampler with Optuna's defaults, seeded) on the same define-by-run space."""
    import random

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    rng, times = random.Random(0), []
    for _ in range(n):
        start = time.perf_counter()
        trial = study.ask()
        space.define_by_run(trial)
        times.append(time.perf_counter() - start)
        study.tell(trial, rng.random())
    return times


def run(trials: int, epochs: int, sleep_s: float, concurrent: int, storage: str,
        checkpoint_every: float | None = None) -> dict:
    record, storage = prepare_search(SPACE, {"epochs": epochs}, f"overhead{trials}-{checkpoint_every}", trials,
                                     concurrent, "cpu=1", "asha", "ibp_err", storage, None, None,
                                     os.environ.get("CERTTUNE_DATA", "../shared/data"), 0,
                                     checkpoint_every=checkpoint_every)
    tuner = build_tuner(record, storage,
                        trainable=make_sleep_trainable(epochs, sleep_s, record.checkpoint_every_s))
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    slept = sum(r.metrics.get("epoch", 0) for r in results) * sleep_s
    per_trial = (wall * concurrent - slept) / trials
    times = tpe_suggestion_times(record.build_space(), trials)
    tenth = max(1, trials // 10)
    return {"trials": trials, "concurrent": concurrent, "epochs": epochs, "sleep_per_epoch_s": sleep_s,
            "checkpoint_every_s": record.checkpoint_every_s,
            "wall_s": round(wall, 2), "slept_s": round(slept, 2), "overhead_per_trial_s": round(per_trial, 3),
            "overhead_vs_10s_trial": round(per_trial / 10, 4),
            "tpe_suggest_s_first_tenth": round(sum(times[:tenth]) / tenth, 4),
            "tpe_suggest_s_last_tenth": round(sum(times[-tenth:]) / tenth, 4),
            "errors": results.num_errors}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object (always on)")
    parser.add_argument("--trials", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.2)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=float, nargs="+", default=[None],
                        help="seconds between a trial's checkpoints, as `certtune search --checkpoint-every` "
                             "(default: the search default; 0: every epoch); several values run side by side")
    args = parser.parse_args(argv)
    connect_ray(None)
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for n in args.trials:
            for every in args.checkpoint_every:
                rows.append(run(n, args.epochs, args.sleep, args.concurrent, storage, every))
    print(json.dumps({"results": rows}))


if __name__ == "__main__":
    main()
