"""What a trial will cost before it runs: each method's step cost, measured once, times the trial's steps.

STEP_COST is a training step of each method in natural (clean, non-certified) steps: `python -m bench.step_cost
--methods` on cnn_small / MNIST, batch 128, 2 CPU threads, mid-ramp (ε at half the target, the preset's
regularizers on), bench/results/step_cost_methods_cpu_quiet.json (docs/benchmarks.md). Ratios travel between
machines better than seconds; on a GPU they differ (the attacks of SABR and TAPS weigh less there), so a
search's rungs in seconds (tuner/run/schedulers.py) use what the trials measure, and this table serves planning:
the search prints it when it searches `method`, and `report` repeats it, so a budget can be sized before the
trials run. CROWN-IBP costs its figure during the ramp only; at the target ε it trains with IBP (vanilla's cost).
"""
from __future__ import annotations

import math

from trainers.config import TrainConfig

STEP_COST = {"vanilla": 3.16, "crown-ibp": 18.18, "fast": 3.88, "sabr": 10.41, "mtl-ibp": 8.46, "cc-ibp": 8.02,
             "exp-ibp": 7.95, "taps": 22.26, "staps": 29.09}
AT_TARGET_METHOD = {"crown-ibp": "vanilla"}  # methods whose step changes once the ramp ends


def trial_cost(cfg: TrainConfig, train_images: int) -> float:
    """A run's training cost in natural steps: its steps at each phase times the method's step cost."""
    images = cfg.data.subset or train_images
    steps_per_epoch = math.ceil(images / cfg.batch_size)
    ramp_epochs = min(cfg.epochs, cfg.schedule.start + cfg.schedule.length - 1)
    after = STEP_COST[AT_TARGET_METHOD.get(cfg.method, cfg.method)]
    return steps_per_epoch * (ramp_epochs * STEP_COST[cfg.method] + (cfg.epochs - ramp_epochs) * after)


def method_costs(space, fidelity, train_images: int) -> dict[str, float]:
    """{method: a trial's cost relative to the defaults point's}, for the space's starting point of each method
    (the defaults and seeds: each method at its paper settings), at the search's fidelity."""
    configs = {}
    for point in space.start_points():
        cfg = fidelity.trial_config(space.to_train_config(point), train_images)
        configs.setdefault(cfg.method, cfg)
    if not configs:
        return {}
    base = trial_cost(next(iter(configs.values())), train_images)
    return {m: trial_cost(c, train_images) / base for m, c in configs.items()}


def cost_line(costs: dict[str, float]) -> str:
    return ("estimated cost of a trial, relative to the first (bench/step_cost.py ratios): "
            + ", ".join(f"{m} {c:.2g}x" for m, c in costs.items()))
