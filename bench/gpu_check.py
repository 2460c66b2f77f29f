"""The GPU check: one command, under 8 minutes on one GPU, one JSON file.

    python -m bench.gpu_check --device cuda --data-dir ../shared/data --out bench/results/gpu_check.json
    python -m bench.gpu_check --device cpu --tiny --out /tmp/gpu_check.json      # seconds; in the tests

Sections, in this order (the JSON is rewritten after each, so a run cut short keeps what it measured):
- soundness: for every model kind, BN placement, train and eval mode, sampled points, box corners and a PGD
  attack on each margin stay inside the IBP and the CROWN-IBP bounds, on the chosen device with TF32 off.
- step_cost: natural / vanilla / fast / crown-ibp training steps of cnn7 at CIFAR-10 shapes, batch 128,
  each certified step timed side by side with a natural one; peak memory per step.
- training: a short `fast` training of cnn7 on the CIFAR-10 subset through the Trainer: seconds per
  epoch and images/s, scaled to 50,000 images, beside the paper's Table 3 (RTX 2080 Ti: 64 s per epoch).
- compile: whether torch.compile of the loss (its forward and backward) pays, per method, same run.
Exit status: 0 when every bound held and every section ran; 1 when a bound was violated; 3 when a section
failed (its error is in the JSON); 2 for bad arguments, before any compute.

Imports only torch, numpy and trainers/ (no Ray, Optuna, W&B, YAML or matplotlib): a GPU machine with just
torch and torchvision runs it.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.soundness import frozen_bn_copy, margins_at, max_violation, pgd_on_margins, points_in_box, warm_bn
from bench.step_cost import interleaved, peak_memory_mb, step_setup, sync
from trainers.bounds import crown_ibp_bounds, ibp_bounds, margin_spec
from trainers.config import TrainConfig
from trainers.data import NORMALIZATION, DataError, load_splits
from trainers.device import pick_device
from trainers.init import apply_init
from trainers.input_box import InputBox
from trainers.models import BN_PLACEMENTS, DATASET_SHAPES, MODELS, build_model
from trainers.train import Trainer

PAPER_TABLE3 = {"source": "Shi et al. 2021, Table 3", "gpu": "RTX 2080 Ti", "model": "cnn7", "dataset": "cifar10",
                "method": "fast", "s_per_epoch": 64.0, "images_per_epoch": 50_000}
METHODS = ("natural", "vanilla", "fast", "crown-ibp")
BOUNDS = {"ibp": ibp_bounds, "crown-ibp": crown_ibp_bounds}


@dataclass(frozen=True)
class Sizes:
    # soundness
    sound_dataset: str  # input shapes of the models checked
    sound_batch: int
    sound_margins: int  # margins per example checked (K-1 = all)
    sound_points: int  # uniform samples; as many random corners
    sound_pgd_steps: int
    sound_bn: tuple  # BN placements checked for every model
    sound_eps: float
    sound_bn_passes: int  # train-mode forward passes that give BN running statistics before the check
    # step cost
    step_model: str
    step_dataset: str
    step_batch: int
    step_repeats: int
    step_min_steps: int  # per timed round, at least
    step_min_round_s: float
    # training
    train_model: str
    train_subset: int  # training images (0 = all of the subset's training split)
    train_val: int
    train_batch: int
    train_epochs: int
    # compile
    compile_repeats: int


FULL = Sizes(sound_dataset="cifar10", sound_batch=8, sound_margins=9, sound_points=100, sound_pgd_steps=30,
             sound_bn=BN_PLACEMENTS, sound_eps=2 / 255, sound_bn_passes=3,
             step_model="cnn7", step_dataset="cifar10", step_batch=128, step_repeats=7, step_min_steps=3,
             step_min_round_s=0.3,
             train_model="cnn7", train_subset=0, train_val=500, train_batch=128, train_epochs=3,
             compile_repeats=5)
TINY = Sizes(sound_dataset="mnist", sound_batch=2, sound_margins=1, sound_points=2, sound_pgd_steps=2,
             sound_bn=("full",), sound_eps=0.02, sound_bn_passes=1,
             step_model="cnn_small", step_dataset="cifar10", step_batch=8, step_repeats=3, step_min_steps=1,
             step_min_round_s=0.0,
             train_model="cnn_small", train_subset=256, train_val=64, train_batch=64, train_epochs=1,
             compile_repeats=3)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- soundness -------------------------------------------------------------------------------------------
def soundness_model(model_name, bn, sizes: Sizes, device, seed) -> list[dict]:
    """One model, in train mode then in eval mode: the max violation of each bound over every point tried."""
    c, h, w, k = DATASET_SHAPES[sizes.sound_dataset]
    gen = torch.Generator().manual_seed(seed)
    x01 = torch.rand(sizes.sound_batch, c, h, w, generator=gen).to(device)
    y = torch.randint(0, k, (sizes.sound_batch,), generator=gen).to(device)
    box = InputBox.for_stats(*NORMALIZATION[sizes.sound_dataset], device)
    x, lower, upper = box.box(x01, sizes.sound_eps)
    C = margin_spec(y, k)[:, :sizes.sound_margins]
    torch.manual_seed(seed)
    model = build_model(model_name, sizes.sound_dataset, bn=bn).to(device)
    apply_init(model, "ibp")  # bounds that neither explode nor vanish with depth, as training starts from
    warm_bn(model, x, passes=sizes.sound_bn_passes)
    rows = []
    for mode in ("train", "eval"):
        getattr(model, mode)()
        f = frozen_bn_copy(model, x) if mode == "train" else model
        with torch.no_grad():
            bounds = {name: fn(model, lower, upper, C, x=x if mode == "train" else None)
                      for name, fn in BOUNDS.items()}
        sampled = margins_at(f, C, points_in_box(lower, upper, sizes.sound_points, sizes.sound_points, gen))
        pgd_low, pgd_high = pgd_on_margins(f, C, x, lower, upper, steps=sizes.sound_pgd_steps)
        for name, (lo, up) in bounds.items():
            # fp32 without outward rounding: 1e-4 relative to the bound's magnitude (as tests/test_bounds.py)
            tol = 1e-4 * (1 + float(up.abs().max()))
            finite = bool(torch.isfinite(lo).all() and torch.isfinite(up).all() and (lo <= up).all())
            worst = max_violation(lo, up, sampled + [pgd_low, pgd_high])
            rows.append({"model": model_name, "bn": bn, "mode": mode, "bound": name,
                         "max_violation": max(worst, 0.0), "tolerance": tol, "passed": finite and worst <= tol,
                         "closest_gap": max(-worst, 0.0),  # how near the nearest point came to a bound
                         "mean_width": float((up - lo).mean()),
                         # where PGD's lowest margin sits in [lower, upper], as a fraction of the width
                         "pgd_low_in_width": float(((pgd_low - lo) / (up - lo).clamp(min=1e-12)).mean())})
    return rows


def soundness(sizes: Sizes, device, models=MODELS) -> dict:
    cases, seed = [], 0
    for model_name in models:
        for bn in sizes.sound_bn:
            seed += 1
            start = time.perf_counter()
            rows = soundness_model(model_name, bn, sizes, device, seed)
            cases += rows
            log(f"soundness {model_name:9s} bn={bn:4s}: " + ", ".join(
                f"{r['mode']} {r['bound']} {r['max_violation']:.3g} ({'ok' if r['passed'] else 'VIOLATED'})"
                for r in rows) + f"  [{time.perf_counter() - start:.1f} s]")
    per_model = {m: {"max_violation": max(r["max_violation"] for r in cases if r["model"] == m),
                     "passed": all(r["passed"] for r in cases if r["model"] == m)} for m in models}
    return {"dataset_shapes": sizes.sound_dataset, "eps": sizes.sound_eps, "batch": sizes.sound_batch,
            "margins_per_example": sizes.sound_margins, "uniform_points": sizes.sound_points,
            "random_corners": sizes.sound_points, "pgd_steps_each_way": sizes.sound_pgd_steps,
            "tolerance_rule": "1e-4 * (1 + max |upper bound|)", "per_model": per_model, "cases": cases,
            "passed": all(r["passed"] for r in cases)}


# ---- step cost ---------------------------------------------------------------------------------------------
def step_cost(sizes: Sizes, device, eps=8 / 255) -> dict:
    rows, natural = [], []
    for method in METHODS[1:]:
        setup = step_setup(sizes.step_model, sizes.step_dataset, sizes.step_batch, eps, method, device)
        nat_step, cert_step = setup.steps()
        nat, cert, steps = interleaved(nat_step, cert_step, device, sizes.step_repeats, sizes.step_min_steps,
                                        sizes.step_min_round_s)
        natural.append((nat, peak_memory_mb(nat_step, device)))
        rows.append({"method": method, "step_s": round(cert, 6), "natural_step_s": round(nat, 6),
                     "ratio": round(cert / nat, 3), "steps_per_round": steps,
                     "peak_mem_mb": peak_memory_mb(cert_step, device)})
        log(f"step cost {method}: {cert * 1e3:.1f} ms, natural {nat * 1e3:.1f} ms, ratio {cert / nat:.2f}")
    nat_times = sorted(t for t, _ in natural)
    rows.insert(0, {"method": "natural", "step_s": round(nat_times[len(nat_times) // 2], 6),
                    "natural_step_s": round(nat_times[len(nat_times) // 2], 6), "ratio": 1.0,
                    "peak_mem_mb": natural[0][1]})
    return {"model": sizes.step_model, "dataset_shapes": sizes.step_dataset, "batch": sizes.step_batch,
            "eps_target": eps, "timed_at": "mid-ramp: eps = eps_target/2 (fast: regularizers on; "
                                          "crown-ibp: mixed with IBP, weight 0.5)",
            "repeats": sizes.step_repeats,
            "peak_mem": ("torch.cuda.max_memory_allocated over one step, model and Adam state included"
                         if device.type == "cuda" else
                         "null on the CPU: no per-step peak is available (process_peak_rss_mb is the "
                         "whole process's)"),
            "rows": rows}


# ---- a short `fast` training ---------------------------------------------------------------------------------
def training(sizes: Sizes, device, data_dir) -> dict:
    epochs = sizes.train_epochs
    cfg = TrainConfig.from_dict({
        "dataset": "cifar10", "model": sizes.train_model, "method": "fast", "eps": 8 / 255, "epochs": epochs,
        "batch_size": sizes.train_batch, "lr": 5e-4, "lr_milestones": [],
        # every epoch but the last in the ramp with both regularizers (the paper's most expensive phase),
        # the last at the target ε without them
        "schedule": {"start": 1, "length": max(epochs - 1, 1)},
        "data": {"val_size": sizes.train_val, "subset": sizes.train_subset}, "seed": 0})
    trainer = Trainer(cfg, data_dir=data_dir, out_dir=None, device=str(device))
    per_epoch = []
    for _ in range(epochs):
        m = trainer.train_epoch()
        sync(device)
        per_epoch.append({"epoch": trainer.epoch, "eps": m["eps"], "time_epoch_s": round(m["time_epoch_s"], 3),
                          "images_per_s": round(m["samples_per_s"], 1), "loss": m["loss"]})
        log(f"training epoch {trainer.epoch}/{epochs}: {m['time_epoch_s']:.2f} s, {m['samples_per_s']:.0f} images/s")
    val = trainer.validate()
    # The first epoch pays for CUDA's lazy start-up (kernels, allocator): steady state is the rest.
    steady = per_epoch[1:] or per_epoch
    images = len(trainer.splits.train)
    s_per_epoch = sum(e["time_epoch_s"] for e in steady) / len(steady)
    scaled = s_per_epoch * PAPER_TABLE3["images_per_epoch"] / images
    return {"config": {k: v for k, v in cfg.resolve().to_dict().items() if k != "eval"},
            "train_images": images, "epochs": per_epoch, "steady_epochs": [e["epoch"] for e in steady],
            "s_per_epoch": round(s_per_epoch, 3), "images_per_s": round(images / s_per_epoch, 1),
            "s_per_epoch_50k": round(scaled, 2), "paper": PAPER_TABLE3,
            "ratio_to_paper": round(scaled / PAPER_TABLE3["s_per_epoch"], 3),
            "val_after": {"n": len(trainer.splits.val), "clean_err": val["clean_err"], "ibp_err": val["ibp_err"]}}


# ---- torch.compile -------------------------------------------------------------------------------------------
def grads(loss_fn, model, x01, y):
    """(loss, gradients) of one call, the model's state (BN running statistics) left as it was."""
    state = copy.deepcopy(model.state_dict())
    loss = loss_fn(x01, y)
    if not loss.requires_grad:
        raise RuntimeError("the loss came back without a grad_fn: training through it would not learn")
    g = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    model.load_state_dict(state)
    return loss.detach(), [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, model.parameters())]


def compile_method(method, sizes: Sizes, device, eps=8 / 255) -> dict:
    """Eager against torch.compile'd loss (forward and backward; the optimizer step stays eager) on the same
    model and batch: the compiled loss and gradients must match the eager ones, then compile seconds and
    alternating timed rounds."""
    setup = step_setup(sizes.step_model, sizes.step_dataset, sizes.step_batch, eps,
                       "fast" if method == "natural" else method, device)
    loss = setup.natural_loss if method == "natural" else setup.certified_loss
    compiled = torch.compile(loss)
    eager_loss, eager_grads = grads(loss, setup.model, setup.x01, setup.y)
    sync(device)
    start = time.perf_counter()
    compiled_loss, compiled_grads = grads(compiled, setup.model, setup.x01, setup.y)  # compiles both passes
    sync(device)
    compile_s = time.perf_counter() - start
    scale = max(float(g.abs().max()) for g in eager_grads) or 1.0
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(eager_grads, compiled_grads)) / scale
    loss_diff = abs(float(compiled_loss - eager_loss)) / max(abs(float(eager_loss)), 1e-12)
    eager_step, = setup.steps(certified_loss=loss)[1:]
    compiled_step, = setup.steps(certified_loss=compiled)[1:]
    eager, comp, steps = interleaved(eager_step, compiled_step, device, sizes.compile_repeats,
                                     sizes.step_min_steps, sizes.step_min_round_s)
    saved = eager - comp
    matches = loss_diff < 1e-4 and grad_diff < 1e-3
    return {"method": method, "compile_s": round(compile_s, 2), "matches_eager": matches,
            "loss_rel_diff": loss_diff, "grad_max_rel_diff": grad_diff,
            "eager_step_s": round(eager, 6), "compiled_step_s": round(comp, 6), "speedup": round(eager / comp, 3),
            "steps_per_round": steps,
            # steps after which compiling has paid for itself (None: it never does)
            "break_even_steps": round(compile_s / saved) if saved > 0 else None,
            "pays": matches and eager / comp > 1.05}


def compile_section(sizes: Sizes, device, methods, deadline, per_method_s) -> dict:
    rows, skipped = [], []
    for method in methods:
        if time.perf_counter() + per_method_s > deadline:
            skipped.append({"method": method, "reason": f"time budget: less than {per_method_s:.0f} s left"})
            log(f"compile {method}: skipped (time budget)")
            continue
        try:
            rows.append(compile_method(method, sizes, device))
            r = rows[-1]
            log(f"compile {method}: matches eager {r['matches_eager']}, compile {r['compile_s']:.1f} s, eager {r['eager_step_s'] * 1e3:.1f} ms, "
                f"compiled {r['compiled_step_s'] * 1e3:.1f} ms, speedup {r['speedup']:.2f}")
        except Exception as e:  # a compile failure is a finding, not the end of the check
            rows.append({"method": method, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            log(f"compile {method}: failed: {rows[-1]['error']}")
    return {"model": sizes.step_model, "dataset_shapes": sizes.step_dataset, "batch": sizes.step_batch,
            "what": "torch.compile(loss) with default mode; forward and backward compiled, Adam step eager; "
                    "timed mid-ramp like step_cost", "rows": rows, "skipped": skipped}


# ---- the run -------------------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU run in seconds (the tests)")
    parser.add_argument("--data-dir", default=None,
                        help="holds cifar10-subset/*.npz (or CIFAR-10); default $CERTTUNE_DATA, else ../shared/data")
    parser.add_argument("--sections", default="soundness,step_cost,training,compile",
                        help="comma-separated subset of soundness,step_cost,training,compile")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="model kinds whose bounds are checked (default: all)")
    parser.add_argument("--compile-methods", default=None,
                        help=f"methods whose step is compiled (default: all of {','.join(METHODS)} on cuda, "
                             "none on the CPU, where compiling takes 5-220 s a method)")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="a method's compile measurement starts only if 100 s of this budget are left "
                             "(default 400: the whole run stays under 8 minutes)")
    return parser.parse_args(argv)


def fail(msg: str) -> int:
    print(f"gpu_check: {msg}", file=sys.stderr)
    return 2


def check_args(args):
    """Everything a user can get wrong, checked before any compute. Returns an error line or None."""
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    allowed = ("soundness", "step_cost", "training", "compile")
    bad = [s for s in sections if s not in allowed]
    if bad or not sections:
        return f"--sections: unknown {', '.join(bad) or '(empty)'}; allowed: {', '.join(allowed)}"
    args.sections = sections
    try:
        device = torch.device(args.device)
    except RuntimeError:
        return f"--device: not a device: {args.device!r} (use cuda, cuda:N or cpu)"
    if device.type not in ("cpu", "cuda"):
        return f"--device: {args.device!r} is not supported (use cuda, cuda:N or cpu)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "--device cuda: no CUDA device is available on this machine (use --device cpu --tiny to try it)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)"
    if args.compile_methods is None:
        args.compile_methods = list(METHODS) if device.type == "cuda" else []
    else:
        args.compile_methods = [m.strip() for m in args.compile_methods.split(",") if m.strip()]
        bad = [m for m in args.compile_methods if m not in METHODS]
        if bad:
            return f"--compile-methods: unknown {', '.join(bad)}; allowed: {', '.join(METHODS)}"
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        return f"--models: unknown {', '.join(bad) or '(empty)'}; allowed: {', '.join(MODELS)}"
    if args.budget_s <= 0:
        return f"--budget-s: must be > 0, got {args.budget_s}"
    out = Path(args.out)
    if out.is_dir():
        return f"--out: {out} is a folder; give a file name"
    if not out.parent.exists():
        return f"--out: folder {out.parent} does not exist"
    if not os.access(out.parent, os.W_OK):
        return f"--out: cannot write in {out.parent}"
    if args.data_dir is None:
        args.data_dir = os.environ.get("CERTTUNE_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    if "training" in sections:
        try:  # read the data now: a missing file is a usage error, not a crash after minutes of compute
            load_splits("cifar10", args.data_dir, TrainConfig().data, seed=0, download=False)
        except DataError as e:
            return f"--data-dir: {e}"
    args.device = device
    return None


def environment(device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads(),
           "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"device_name": props.name, "device_memory_gb": round(props.total_memory / 1e9, 1),
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    else:
        env |= {"device_name": platform.processor() or platform.machine()}
    return env


def write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    error = check_args(args)
    if error:
        return fail(error)
    device = args.device
    start = time.perf_counter()
    deadline = start + args.budget_s
    pick_device(str(device))  # the trainer's own device setup (glibc keeps freed memory on the CPU)
    # Certificates need full fp32 matmuls: no TF32 anywhere in this run (the Trainer sets the same).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    sizes = TINY if args.tiny else FULL
    out = Path(args.out)
    report = {"check": "gpu_check", "tiny": args.tiny, "sizes": asdict(sizes),
              "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": environment(device), "sections_run": args.sections, "wall_s": {}}
    log(f"device {report['environment']['device_name']} ({device}), torch {torch.__version__}, "
        f"sections {','.join(args.sections)}{' (tiny)' if args.tiny else ''}")
    runners = {"soundness": lambda: soundness(sizes, device, args.models),
               "step_cost": lambda: step_cost(sizes, device),
               "training": lambda: training(sizes, device, args.data_dir),
               "compile": lambda: compile_section(sizes, device, args.compile_methods, deadline,
                                                  per_method_s=25.0 if args.tiny else 100.0)}
    failed = []
    for name in args.sections:
        if name == "compile" and not args.compile_methods:
            report["compile"] = {"rows": [], "skipped": [{"method": m, "reason": "not requested (on the CPU "
                                 "compiling takes 5-220 s a method: pass --compile-methods to measure)"}
                                                        for m in METHODS]}
            continue
        log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            report[name] = runners[name]()
        except Exception as e:
            traceback.print_exc()
            report[name] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)
        report["wall_s"][name] = round(time.perf_counter() - t0, 2)
        report["wall_s"]["total"] = round(time.perf_counter() - start, 2)
        write_json(out, report)
        log(f"{name} done in {report['wall_s'][name]:.1f} s (total {report['wall_s']['total']:.1f} s)")
    report["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report["wall_s"]["total"] = round(time.perf_counter() - start, 2)
    if device.type == "cuda":
        report["peak_mem_mb_overall"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    report["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    sound = report.get("soundness", {}).get("passed")
    report["passed"] = sound is not False and not failed
    write_json(out, report)
    if sound is False:
        bad = sorted({f"{r['model']}/{r['bn']}/{r['mode']}/{r['bound']}" for r in report["soundness"]["cases"]
                      if not r["passed"]})
        log(f"BOUND VIOLATED: {', '.join(bad)}; see {out}")
        return 1
    if failed:
        log(f"sections failed: {', '.join(failed)}; see {out}")
        return 3
    log(f"all checks passed in {report['wall_s']['total']:.1f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
