"""CROWN, α-CROWN and BaB: sound (samples, corners and a real PGD attack stay inside every bound, for every
layer kind and both BN modes), exact where the truth can be enumerated (every ReLU pattern's LP), nested
where nesting is a theorem, and wired into `certtune verify`.

Which inclusions are theorems: α-CROWN starts from CROWN's slopes and keeps the best bound, so
CROWN ⊆ α-CROWN; BaB's root is α-CROWN, so α-CROWN ⊆ BaB; BaB is complete (verified iff the exact minimum
margin is > 0), and `evaluate` starts it from what IBP and CROWN-IBP proved, so they are within BaB too.
IBP ⊆ CROWN-IBP and CROWN-IBP ⊆ CROWN are *not* theorems (a backward pass with the
adaptive slopes can be looser than IBP, and tighter intermediate bounds change the slopes), so they are
not asserted.
"""
import itertools
import json
import time

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from bench.soundness import assert_bounds_contain, frozen_bn_copy, points_in_box, warm_bn
from trainers.alpha_crown import alpha_crown_bounds
from trainers.bab import FALSIFIED, VERIFIED, BabConfig, bab
from trainers.bounds import crown_ibp_bounds, ibp_bounds, margin_spec
from trainers.crown import crown_bounds, crown_intermediate
from trainers.evaluate import VerifierOptions, evaluate
from trainers.input_box import InputBox
from trainers.layers import ResidualBlock
from trainers.models import build_model


def small_model(kind: str) -> nn.Sequential:
    """Small instances of every layer kind our models use, on 1×8×8 inputs and 5 classes."""
    torch.manual_seed(11)
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                             nn.ReLU(), nn.Linear(16, 5))
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, 2, 1),
                             nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(32, 16), nn.BatchNorm1d(16),
                             nn.ReLU(), nn.Linear(16, 5))
    identity = ResidualBlock(nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1, groups=2), nn.BatchNorm2d(4), nn.ReLU(),
                                           nn.Conv2d(4, 4, 3, 1, 1), nn.BatchNorm2d(4)))
    projection = ResidualBlock(nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                             nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)),
                               nn.Sequential(nn.Conv2d(4, 8, 1, 2, 0), nn.BatchNorm2d(8)))
    return nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(), identity, nn.ReLU(), projection,
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 5))


def alpha_crown_few(model, lower, upper, C, x=None):
    return alpha_crown_bounds(model, lower, upper, C, x, iterations=8, lr=0.2)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("bound_fn", [crown_bounds, alpha_crown_few])
def test_bounds_contain_samples_corners_and_pgd(kind, mode, bound_fn):
    gen = torch.Generator().manual_seed(0)
    model = small_model(kind)
    x = torch.rand(6, 1, 8, 8, generator=gen)
    warm_bn(model, x)
    getattr(model, mode)()
    y = torch.randint(0, 5, (6,), generator=gen)
    C = margin_spec(y, 5)
    lower, upper = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    f = frozen_bn_copy(model, x) if mode == "train" else model
    lo, up = bound_fn(model, lower, upper, C, x=x if mode == "train" else None)
    assert_bounds_contain(f, C, x, lower, upper, lo, up, samples=50, gen=gen)
    # CROWN with CROWN intermediate bounds is tighter than CROWN-IBP here (not a theorem; a sanity check
    # that intermediate layers really are bounded by backward passes).
    c_lo, c_up = crown_ibp_bounds(model, lower, upper, C, x=x if mode == "train" else None)
    assert (up - lo).mean() < (c_up - c_lo).mean()


def test_cnn_small_crown_alpha_sound_and_alpha_never_worse():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = build_model("cnn_small", "mnist")
    x = torch.rand(2, 1, 28, 28, generator=gen)
    warm_bn(model, x)
    model.eval()
    C = margin_spec(torch.tensor([3, 7]), 10)
    lower, upper = x - 0.004, x + 0.004
    lo_c, up_c = crown_bounds(model, lower, upper, C)
    lo_a, up_a = alpha_crown_bounds(model, lower, upper, C, iterations=5)
    assert (lo_a >= lo_c).all() and (up_a <= up_c).all()  # never worse than CROWN, elementwise
    with torch.no_grad():
        for z in points_in_box(lower, upper, 50, 50, gen):
            m = torch.einsum("bsk,bk->bs", C, model(z))
            assert (m >= lo_a - 1e-4).all() and (m <= up_a + 1e-4).all()


def test_crown_intermediate_bounds_are_within_ibp_and_contain_samples():
    gen = torch.Generator().manual_seed(2)
    model = small_model("resnet")
    x = torch.rand(4, 1, 8, 8, generator=gen)
    warm_bn(model, x)
    model.eval()
    lower, upper = x - 0.05, x + 0.05
    inter = crown_intermediate(model, lower, upper)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert list(inter.bounds) == relus  # every ReLU layer, in forward order
    seen = {}
    hooks = [r.register_forward_hook(lambda m, inp, out: seen.setdefault(m, []).append(inp[0])) for r in relus]
    with torch.no_grad():
        for z in points_in_box(lower, upper, 50, 50, gen):
            model(z)
    for h in hooks:
        h.remove()
    tighter = False
    for relu in relus:
        lo, up = inter.bounds[relu]
        ibp = inter.facts[relu]
        assert (lo >= ibp.lower - 1e-6).all() and (up <= ibp.upper + 1e-6).all()
        tighter |= bool((up - lo).sum() < (ibp.upper - ibp.lower).sum() - 1e-3)
        z = torch.stack(seen[relu])
        assert (z >= lo - 1e-4).all() and (z <= up + 1e-4).all()
    assert tighter


# ---- exact: 2-D inputs, two hidden layers of 3 ReLUs: every activation pattern's LP ------------------
def tiny_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)).eval()


def exact_min_margins(net, c_rows, lo, up):
    """min over the box of each row c·f(x), by one LP per ReLU pattern (independent of trainers/)."""
    W1, b1, W2, b2, W3, b3 = [p.detach().double().numpy() for p in net.parameters()]
    best = np.full(len(c_rows), np.inf)
    for d1 in itertools.product([0, 1], repeat=3):
        for d2 in itertools.product([0, 1], repeat=3):
            D1, D2 = np.diag(d1), np.diag(d2)
            M2, c2 = W2 @ D1 @ W1, W2 @ D1 @ b1 + b2  # z2 = M2 x + c2 under pattern d1
            sign1, sign2 = 1 - 2 * np.array(d1), 1 - 2 * np.array(d2)  # active: −z ≤ 0, inactive: z ≤ 0
            A_ub = np.vstack([sign1[:, None] * W1, sign2[:, None] * M2])
            b_ub = np.concatenate([-sign1 * b1, -sign2 * c2])
            M3, c3 = W3 @ D2 @ M2, W3 @ D2 @ c2 + b3
            for r, c in enumerate(c_rows):
                res = linprog(c @ M3, A_ub=A_ub, b_ub=b_ub, bounds=list(zip(lo, up)), method="highs")
                if res.status == 0:
                    best[r] = min(best[r], res.fun + c @ c3)
    return best


def test_bab_is_exact_and_crown_alpha_bound_the_exact_minimum():
    decided = {VERIFIED: 0, FALSIFIED: 0}
    alpha_gains = 0
    for seed in range(4):
        net = tiny_net(seed)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(6, 2, generator=gen)
        with torch.no_grad():
            y = net(x).argmax(1)
        C = margin_spec(y, 3)
        eps = torch.linspace(0.2, 1.6, 6).unsqueeze(1)
        lower, upper = x - eps, x + eps
        crown_lo = crown_bounds(net, lower, upper, C)[0]
        alpha_lo = alpha_crown_bounds(net, lower, upper, C)[0]
        statuses, points = bab(net, lower, upper, C, BabConfig(time_limit=20))
        for i in range(6):
            exact = exact_min_margins(net, C[i].double().numpy(), lower[i].double().numpy(), upper[i].double().numpy())
            exact = torch.tensor(exact, dtype=torch.float32)
            assert (crown_lo[i] <= exact + 1e-5).all() and (alpha_lo[i] <= exact + 1e-5).all()
            assert (alpha_lo[i] >= crown_lo[i]).all()
            alpha_gains += int((alpha_lo[i] > crown_lo[i] + 1e-4).any())
            if abs(exact.min()) < 1e-4:
                continue  # a tie: neither answer is checkable in fp32
            assert statuses[i] == (VERIFIED if exact.min() > 0 else FALSIFIED), (seed, i, exact, statuses[i])
            decided[statuses[i]] += 1
            if statuses[i] == FALSIFIED:
                p = points[i]
                assert (p >= lower[i] - 1e-6).all() and (p <= upper[i] + 1e-6).all()
                with torch.no_grad():
                    assert (C[i] @ net(p.view(1, 2))[0] < 0).any()
    # Both answers occur, and BaB decides cases α-CROWN could not: the check is not vacuous.
    assert decided[VERIFIED] >= 5 and decided[FALSIFIED] >= 3 and alpha_gains >= 3


def branching_problem(eps):
    """A random 10-64-64-3 network and 8 points: at ε = 0.3 BaB must branch to verify point 0 (14 splits with
    the default knobs), at ε = 0.5 it falsifies every point."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    x = torch.randn(8, 10)
    with torch.no_grad():
        C = margin_spec(net(x).argmax(1), 3)
    return net, x - eps, x + eps, C


def timed_bab(net, lower, upper, C, cfg):
    start = time.monotonic()
    statuses, _ = bab(net, lower, upper, C, cfg)
    return statuses[0], time.monotonic() - start


def test_bab_keeps_its_time_limit_inside_a_step_and_a_deadline_never_verifies(monkeypatch):
    """The per-image limit holds within a small margin even when one α/β step alone would take seconds
    (3000 iterations), and while branching; under the deadline an answer is never wrong: points BaB
    verifies with time to spare are never falsified, points it falsifies are never verified."""
    import trainers.bab as bab_module

    splits = []
    real_split = bab_module.split
    monkeypatch.setattr(bab_module, "split", lambda d: splits.append(len(d)) or real_split(d))
    limit, margin = 0.5, 1.0  # the margin: the root's CROWN pass and one α/β step on a loaded 2-core machine
    net, lower, upper, C = branching_problem(0.3)
    timed_bab(net, lower[:1], upper[:1], C[:1], BabConfig(time_limit=0.1))  # warm up: torch's first calls are slow
    assert timed_bab(net, lower[:1], upper[:1], C[:1], BabConfig(time_limit=120))[0] == VERIFIED
    assert splits, "BaB did not branch: the check below would not exercise a branching step"
    for cfg in (BabConfig(time_limit=limit), BabConfig(time_limit=limit, iterations=3000, batch=256)):
        status, seconds = timed_bab(net, lower[:1], upper[:1], C[:1], cfg)
        assert seconds <= limit + margin, (cfg, seconds)
        assert status in (VERIFIED, "unknown"), status
    assert status == "unknown"  # 3000 α steps at the root alone outlast the limit
    net, lower, upper, C = branching_problem(0.5)
    for i in range(3):
        assert timed_bab(net, lower[i:i + 1], upper[i:i + 1], C[i:i + 1], BabConfig(time_limit=20))[0] == FALSIFIED
        for cfg in (BabConfig(time_limit=0.01), BabConfig(time_limit=limit, iterations=3000)):
            status, seconds = timed_bab(net, lower[i:i + 1], upper[i:i + 1], C[i:i + 1], cfg)
            assert status != VERIFIED and seconds <= cfg.time_limit + margin, (cfg, status, seconds)


def test_bab_under_a_tiny_time_limit_agrees_with_the_exact_answer_or_says_unknown():
    unknown = 0
    for seed in range(2):
        net = tiny_net(seed)
        x = torch.randn(6, 2, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            C = margin_spec(net(x).argmax(1), 3)
        eps = torch.linspace(0.2, 1.6, 6).unsqueeze(1)
        lower, upper = x - eps, x + eps
        statuses, _ = bab(net, lower, upper, C, BabConfig(time_limit=0.02, iterations=100_000))
        for i, status in enumerate(statuses):
            exact = exact_min_margins(net, C[i].double().numpy(), lower[i].double().numpy(), upper[i].double().numpy())
            if status == VERIFIED:
                assert exact.min() > -1e-4, (seed, i, exact)
            elif status == FALSIFIED:
                assert exact.min() < 1e-4, (seed, i, exact)
            unknown += status == "unknown"
    assert unknown  # the deadline did cut the ascent


def test_bab_needs_eval_mode():
    net = small_model("mlp").train()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="eval mode"):
        bab(net, x - 0.1, x + 0.1, margin_spec(torch.tensor([0, 1]), 5))


# ---- a trained model on real MNIST: nested verified sets, and PGD never breaks a certificate ---------
def trained_mlp(data_dir):
    import torchvision

    mnist = torchvision.datasets.MNIST(str(data_dir), train=True, download=False)
    x = mnist.data[:2000].float().div(255).unsqueeze(1)
    y = mnist.targets[:2000]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(200):  # natural training, then IBP at ε = 0.02
        idx = torch.randint(0, len(x), (64,))
        xb, yb = x[idx], y[idx]
        if step < 100:
            loss = nn.functional.cross_entropy(model(xb), yb)
        else:
            lo, _ = ibp_bounds(model, (xb - 0.02).clamp(0, 1), (xb + 0.02).clamp(0, 1), margin_spec(yb, 10))
            loss = nn.functional.cross_entropy(torch.cat([torch.zeros(64, 1), -lo], 1), torch.zeros(64, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_trained_model_verified_sets_nest_and_evaluation_guard_holds(data_dir):
    import torchvision

    model = trained_mlp(data_dir)
    test = torchvision.datasets.MNIST(str(data_dir), train=False, download=False)
    x01, y = test.data[:20].float().div(255).unsqueeze(1), test.targets[:20]
    eps = 0.04
    lower, upper = (x01 - eps).clamp(0, 1), (x01 + eps).clamp(0, 1)
    C = margin_spec(y, 10)
    with torch.no_grad():
        wrong = model(x01).argmax(1) != y
    crown_ok = (crown_bounds(model, lower, upper, C)[0] > 0).all(1) & ~wrong
    alpha_ok = (alpha_crown_bounds(model, lower, upper, C)[0] > 0).all(1) & ~wrong
    statuses, _ = bab(model, lower, upper, C, BabConfig(time_limit=1))
    bab_ok = torch.tensor([s == VERIFIED for s in statuses]) & ~wrong
    assert not (crown_ok & ~alpha_ok).any() and not (alpha_ok & ~bab_ok).any()  # CROWN ⊆ α-CROWN ⊆ BaB
    decided = sum(s != "unknown" for s in statuses)
    assert 0 < crown_ok.sum() < decided  # non-trivial, and BaB decides more than CROWN certifies
    # The evaluation: every verifier's error, BaB's counts, and PGD checked against every certificate.
    box = InputBox.for_stats([0.0], [1.0], "cpu")
    options = VerifierOptions(bab=BabConfig(time_limit=1))
    out = evaluate(model, [(x01, y)], eps, box, 10, ("clean", "ibp", "crown-ibp", "crown", "alpha-crown", "bab", "pgd"),
                   pgd_steps=20, verifier_options=options)
    assert out["crown_err"] >= out["alpha_crown_err"] >= out["bab_err"] >= out["pgd_err"]
    # BaB starts from what every cheaper verifier proved, so its set is the union of all: the certificate one has.
    assert out["bab_err"] == out["verified_err"] <= min(out["ibp_err"], out["crown_ibp_err"], out["alpha_crown_err"])
    without_bab = evaluate(model, [(x01, y)], eps, box, 10, ("clean", "ibp", "crown-ibp", "crown", "pgd"))
    single = [evaluate(model, [(x01[i:i + 1], y[i:i + 1])], eps, box, 10, ("clean", "ibp", "crown-ibp", "crown"))
              for i in range(20)]  # one example at a time: which verifiers prove it
    proven = [min(r["ibp_err"], r["crown_ibp_err"], r["crown_err"]) == 0 for r in single]
    assert round(without_bab["verified_err"] * 20) == 20 - sum(proven)  # counted if any verifier proves it
    # BaB on its own (above, on every example) falsifies none of what IBP, CROWN-IBP or CROWN proved: the cheap
    # verifiers it now starts from are cross-checked against it here.
    assert not any(p and s == "falsified" for p, s in zip(proven, statuses))
    n_bab_verified = round((1 - out["bab_err"]) * 20)
    assert n_bab_verified + out["bab_falsified"] + out["bab_unknown"] == 20
    assert out["bab_falsified"] >= round(out["pgd_err"] * 20) - out["bab_unknown"]


def test_verified_err_counts_an_example_any_verifier_proves():
    """A network where IBP proves what CROWN cannot: margin relu(x) + 0.5 over x in [-1, 2]. IBP: relu in
    [0, 2], margin >= 0.5. CROWN's adaptive lower slope is 1 (u > -l), so margin >= x + 0.5 >= -0.5."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2)).eval()
    with torch.no_grad():
        model[1].weight.fill_(1.0), model[1].bias.zero_()
        model[3].weight.copy_(torch.tensor([[1.0], [0.0]])), model[3].bias.copy_(torch.tensor([0.5, 0.0]))
    box = InputBox.for_stats([1 / 3], [1 / 3], "cpu")  # pixels [0, 1] are x in [-1, 2]
    x01, y = torch.full((1, 1, 1, 1), 0.5), torch.tensor([0])
    out = evaluate(model, [(x01, y)], 0.5, box, 2, ("clean", "ibp", "crown"))
    assert (out["clean_err"], out["ibp_err"], out["crown_err"], out["verified_err"]) == (0, 0, 1, 0)
    out = evaluate(model, [(x01, y)], 0.5, box, 2, ("clean", "ibp", "crown", "bab", "pgd"),
                   verifier_options=VerifierOptions(bab=BabConfig(time_limit=1)))
    assert (out["bab_err"], out["verified_err"], out["pgd_err"]) == (0, 0, 0)


def test_cli_verify_with_every_method_and_bad_input(tmp_path, data_dir, capsys):
    from tuner.cli import main
    tiny_run(data_dir, tmp_path / "run", epochs=2, subset=512, val_size=128, test_subset=8)
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "run" / "last.pt"), "--data-dir", str(data_dir), "--eps", "0.01",
                 "--methods", "ibp,crown-ibp,crown,alpha-crown,bab,pgd", "--alpha-iterations", "5",
                 "--bab-time-limit", "0.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"n", "clean_err", "ibp_err", "crown_ibp_err", "crown_err", "alpha_crown_err",
                           "bab_err", "bab_falsified", "bab_unknown", "pgd_err", "verified_err"}
    assert result["n"] == 8 and result["crown_err"] >= result["alpha_crown_err"] >= result["bab_err"]
    assert main(["verify", str(tmp_path / "run" / "last.pt"), "--methods", "crown,beta"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown 'beta'" in err[0]


def test_verifier_table_names_real_functions_and_answers_lookups():
    """Every function the table names as text imports and is callable (a typo would otherwise surface only
    when that verifier is asked for); a verifier is looked up by name with its metric key and defaults."""
    from trainers.verifiers import VERIFIERS, verifier, with_bases

    for v in VERIFIERS.values():
        assert callable(v.function("bound")), v.name
        assert v.step is None or callable(v.function("step")), v.name
        assert v.builds_on is None or v.builds_on in VERIFIERS
    assert verifier("alpha-crown").metric == "alpha_crown_err"
    assert verifier("alpha-crown").defaults() == {"alpha_iterations": 20, "alpha_lr": 0.1}
    assert verifier("bab").defaults()["bab_time_limit"] == 10.0
    assert with_bases(["bab"]) == ("crown", "alpha-crown", "bab") and with_bases(["ibp", "pgd"]) == ()


def test_cli_verify_takes_verifiers_limit_and_prints_progress_on_stderr(tmp_path, data_dir):
    """`certtune verify --verifiers ... --limit N` (a real subprocess): stdout is the JSON result alone, over
    the first N examples; progress lines go to stderr; `--methods` is the same flag under its old name."""
    import subprocess
    import sys

    tiny_run(data_dir, tmp_path / "run", epochs=1, subset=256, val_size=64, test_subset=16)
    runs = {}
    for flag in ("--verifiers", "--methods"):
        proc = subprocess.run([sys.executable, "-m", "tuner.cli", "verify", str(tmp_path / "run" / "last.pt"),
                               "--data-dir", str(data_dir), "--eps", "0.02", flag, "ibp,alpha-crown,bab",
                               "--alpha-iterations", "3", "--bab-time-limit", "0.2", "--limit", "5",
                               "--progress-every", "0"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        runs[flag] = json.loads(proc.stdout)
        assert len(proc.stdout.strip().splitlines()) == 1
        progress = proc.stderr.strip().splitlines()
        assert progress and all(line.startswith("certtune verify: ") for line in progress), proc.stderr
        assert "5/5 examples done" in progress[-1] and any("running alpha-crown" in line for line in progress)
    assert runs["--verifiers"]["n"] == 5 and set(runs["--verifiers"]) == {
        "n", "clean_err", "ibp_err", "alpha_crown_err", "bab_err", "bab_falsified", "bab_unknown", "verified_err"}
    same = {k: v for k, v in runs["--verifiers"].items() if k not in ("bab_err", "bab_unknown", "verified_err")}
    assert same == {k: runs["--methods"][k] for k in same}  # BaB's answers may differ only by its time limit
    quiet = subprocess.run([sys.executable, "-m", "tuner.cli", "verify", str(tmp_path / "run" / "last.pt"),
                            "--data-dir", str(data_dir), "--verifiers", "ibp", "--limit", "3"],
                           capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and json.loads(quiet.stdout)["n"] == 3
    assert "certtune verify:" not in quiet.stderr  # a short run prints no progress at the default 10 s


def tiny_run(data_dir, out, epochs: int, subset: int, val_size: int, test_subset: int) -> None:
    """A `fast` cnn_small run on real MNIST, small enough for a CLI test to verify."""
    from trainers.config import TrainConfig
    from trainers.train import Trainer

    cfg = TrainConfig.from_dict({"dataset": "mnist", "model": "cnn_small", "method": "fast", "eps": 0.05,
                                 "epochs": epochs, "batch_size": 64, "lr": 1e-3, "lr_milestones": [],
                                 "schedule": {"start": 1, "length": 1},
                                 "data": {"subset": subset, "val_size": val_size, "test_subset": test_subset},
                                 "eval": {"metrics": ["clean", "ibp"]}}).resolve()
    Trainer(cfg, data_dir=data_dir, out_dir=out).fit()
