"""Cost of one certified training step relative to one natural step of the same model and batch.

    python -m bench.step_cost --json [--device cpu|cuda] [--repeats N] [--model cnn_small] [--methods sabr,taps]

Each method's step (forward bounds, loss, backward, optimizer step) runs through the trainer's own
`certified_loss`, interleaved with natural steps (clean forward, CE, backward, step) in the same process,
so the ratio is measured side by side on whatever load the machine has. The median of per-round times is
taken. `--clock process --threads 1` times the process's CPU seconds on one thread instead of elapsed time:
on a CPU machine shared with other jobs, elapsed time measures the queue, CPU time the work.
Every method is timed mid-ramp (ε at half the target, its preset's regularizers on), so CROWN-IBP's
backward pass runs (mixing weight 0.5); the newer methods run with their default knobs (TrainConfig: SABR
8 PGD steps, the expressive losses 1, TAPS 8 in the latent box, STAPS both).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from trainers.config import TrainConfig
from trainers.cpu_memory import keep_freed_memory
from trainers.data import NORMALIZATION
from trainers.input_box import InputBox
from trainers.init import apply_init
from trainers.models import DATASET_SHAPES, build_model
from trainers.config import METHODS
from trainers.methods import certified_loss

SETTINGS = [  # (model, dataset, batch, eps)
    ("cnn7", "cifar10", 32, 8 / 255),
    ("cnn_small", "mnist", 128, 0.1),
]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model, optimizer, step_loss, x01, y):
    """One training step on a fixed batch: zero grads, `step_loss(x01, y)`, backward, clip, Adam."""
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss(x01, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
    return step


CLOCK = time.perf_counter  # --clock process: time.process_time, this process's CPU seconds


def time_round(step, device, steps):
    sync(device)
    start = CLOCK()
    for _ in range(steps):
        step()
    sync(device)
    return (CLOCK() - start) / steps


def interleaved(first, second, device, repeats, steps_per_round, min_round_s):
    """Median seconds per step of two step functions, timed in alternating rounds (after 2 warm-up steps
    each). A round has enough steps for `first` to span `min_round_s`: 3 steps of cnn_small are ~30 ms,
    where the scheduler's noise on a shared machine is as large as the step. Returns (first, second, steps)."""
    for fn in (first, second):
        time_round(fn, device, 2)  # warm-up
    steps = max(steps_per_round, math.ceil(min_round_s / time_round(first, device, 2)))
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(time_round(first, device, steps))
        times_b.append(time_round(second, device, steps))
    return statistics.median(times_a), statistics.median(times_b), steps


def peak_memory_mb(step, device):
    """Peak memory allocated during one `step` (torch.cuda.max_memory_allocated, model and optimizer state
    included), in MiB; None on the CPU, where no allocator reports a per-step peak."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


@dataclass
class StepSetup:
    """One model, its optimizer and a fixed batch, with the natural and the certified loss of `method`."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    x01: torch.Tensor
    y: torch.Tensor
    natural_loss: Callable
    certified_loss: Callable

    def steps(self, natural_loss=None, certified_loss=None):
        """(natural step, certified step); either loss can be replaced (e.g. by a compiled one)."""
        return (make_step(self.model, self.optimizer, natural_loss or self.natural_loss, self.x01, self.y),
                make_step(self.model, self.optimizer, certified_loss or self.certified_loss, self.x01, self.y))


def step_setup(model_name, dataset, batch, eps, method, device) -> StepSetup:
    """Random [0, 1] images and labels at the dataset's shapes; the certified loss is the trainer's own
    `certified_loss` mid-ramp (ε at half the target, regularizers on for `fast`, CROWN-IBP mixed in with
    weight 0.5 for `crown-ibp`)."""
    c, h, w, k = DATASET_SHAPES[dataset]
    gen = torch.Generator().manual_seed(0)
    x01 = torch.rand(batch, c, h, w, generator=gen).to(device)
    y = torch.randint(0, k, (batch,), generator=gen).to(device)
    box = InputBox.for_stats(*NORMALIZATION[dataset], device)
    cfg = TrainConfig.from_dict({"dataset": dataset, "model": model_name, "method": method, "eps": eps,
                                 "epochs": 10, "schedule": {"start": 1, "length": 5},
                                 "lr_milestones": []}).resolve()
    torch.manual_seed(0)
    model = build_model(model_name, dataset).to(device).train()
    apply_init(model, cfg.init)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def natural(x01, y):
        return F.cross_entropy(model(box.normalize(x01)), y)

    def certified(x01, y):
        return certified_loss(model, box, cfg, k, x01, y, eps / 2, reg_on=cfg.uses_reg)["loss"]

    return StepSetup(model, optimizer, x01, y, natural, certified)


def bench_setting(model_name, dataset, batch, eps, device, repeats, steps_per_round, min_round_s,
                  methods=METHODS):
    rows = []
    for method in methods:
        setup = step_setup(model_name, dataset, batch, eps, method, device)
        natural, certified = setup.steps()
        nat, cert, steps = interleaved(natural, certified, device, repeats, steps_per_round, min_round_s)
        rows.append({"model": model_name, "dataset": dataset, "method": method, "batch": batch,
                     "device": str(device), "steps_per_round": steps, "step_s": round(cert, 5),
                     "natural_step_s": round(nat, 5), "ratio": round(cert / nat, 3),
                     "peak_mem_mb": peak_memory_mb(certified, device),
                     "natural_peak_mem_mb": peak_memory_mb(natural, device)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object (always on; kept for scripts)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per method")
    parser.add_argument("--steps", type=int, default=3, help="steps per round, at least")
    parser.add_argument("--min-round-s", type=float, default=0.3,
                        help="more steps per round until a round of natural steps takes this long")
    parser.add_argument("--model", choices=[m for m, *_ in SETTINGS], help="only this setting (default: all)")
    parser.add_argument("--methods", default="vanilla,fast,crown-ibp",
                        help=f"comma-separated, side by side in one run; 'all' = {','.join(METHODS)}")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: CPU seconds of this process (with --threads 1, a cost measure that other "
                             "jobs on a shared CPU machine barely disturb); wall: elapsed time (default)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="keep: glibc keeps freed memory, as the trainer sets it on the CPU (default); "
                             "default: glibc's own settings, for comparison")
    args = parser.parse_args(argv)
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; allowed: {', '.join(METHODS)}")
    device = torch.device(args.device)
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and args.malloc == "keep":
        keep_freed_memory()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = []
    for model_name, dataset, batch, eps in SETTINGS:
        if args.model in (None, model_name):
            results += bench_setting(model_name, dataset, batch, eps, device, args.repeats, args.steps,
                                     args.min_round_s, methods)
    print(json.dumps({"results": results, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "malloc": args.malloc, "clock": args.clock},
                     indent=None))


if __name__ == "__main__":
    main()
