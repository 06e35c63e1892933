"""Benchmark: what a Gaussian-step chain costs a class decision, in closed form (issue 13's cause (a)).

    python benchmarks/decision_chain.py                 # the four rows below, ~8 minutes on 2 cores
    python benchmarks/decision_chain.py --iters 1200    # shorter training
    python benchmarks/decision_chain.py --rows 20 20b 50 --exact-only   # seconds: the continuum control only
    python benchmarks/decision_chain.py --budget        # ~5 minutes: the 20-step chain trained on the digits default's budget
    python benchmarks/decision_chain.py --nuisance      # ~11 minutes: the same decision with dimensions the reward ignores
    python benchmarks/decision_chain.py --window        # ~10 minutes: the random window plain, reweighted to unbiased, full

The digits default's reward in small: base `three_blobs()`, reward R(x) = log p(c | x), the mixture's own classifier
for component c = 1 (base weight 0.2, as digit 0's 0.14), alpha = 1. The tilt p·exp(R) = w_c N(m_c, S_c) is that
component alone, −alpha·log Z = −log w_c, and its KL to the base is −log w_c = 1.61 nats (digits: ~2.1). VP chain
(DDPM η = 1, linear betas, no clamp), batch 512, pathwise with the random window, as `benchmarks/tilted_gmm.py`.

Per row (a chain of N steps on a grid): `exact` is the continuum's optimal control (the component's own denoiser)
plugged into the chain, `trained` a control network trained on it (MLPControl, 64 wide), both as objective − optimum,
against the chain's own optimum −log E_base-chain[p(c | x_N)] (from 100,000 base paths of the same chain: what
summary.json's optimum is on digits) and, beside it, how far that optimum lies from the continuum's, −log Z.
Every control here shifts the mean of a Gaussian step; the chain's optimum does not (its step is N(μ, σ²)·h/Z), so
no row can reach 0: where h is sharp (the class is being decided) a coarse step misses by ≈ ¼σ_k⁴||∇²log h||².
Grids: `trailing` (diffusers' spacing, the digits default's) and `balanced` (`sb_finetune.sde.balanced_timesteps`
from the trailing row's trained per-step KL, as the digits config's grid is made from its default run's).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from diffusers import DDPMScheduler

from sb_finetune.analytic import MLPControl, fit_control, three_blobs, with_nuisance
from sb_finetune.estimators.adjoint import AdjointMatching
from sb_finetune.estimators.pathwise import Pathwise
from sb_finetune.rollout import rollout
from sb_finetune.sde import balanced_timesteps, vp_schedule

C, ALPHA = 1, 1.0
GMM = three_blobs()
ROWS = {"10": (10, False), "20": (20, False), "20b": (20, True), "50": (50, False)}  # name: (N, balanced grid)


def chain(n: int, timesteps: list[int] | None = None, gmm=GMM):
    sched = DDPMScheduler(clip_sample=False, timestep_spacing="trailing")
    return vp_schedule(sched, n, 1.0, timesteps), gmm.vp_denoiser(sched.alphas_cumprod), \
        gmm.component(C).vp_denoiser(sched.alphas_cumprod)


def reward(x: torch.Tensor, gmm=GMM) -> torch.Tensor:
    return gmm.log_responsibility(x, C).to(x.dtype)


@torch.no_grad()
def measure(policy, base, schedule, n: int, seed: int, gmm=GMM) -> dict:
    """Objective − the chain's optimum (path by path, ± se), its KL, the fraction of samples on component c."""
    g = torch.Generator().manual_seed(seed)
    out = rollout(policy, base, schedule, torch.randn(n, gmm.dim, generator=g), window=0, generator=g)
    per_path = ALPHA * out.log_ratio.sum(1).double() - reward(out.x, gmm).double()
    return {"objective": float(per_path.mean()), "se": float(per_path.std()) / n**0.5, "kl": float(out.kl.sum(1).mean()),
            "on_c": float(gmm.responsibilities(out.x)[:, C].mean()),
            "kl_per_step": [round(float(v), 5) for v in out.kl.mean(0)]}


@torch.no_grad()
def chain_optimum(base, schedule, seed: int, n: int = 100_000, gmm=GMM, chunk: int | None = None) -> float:
    """−alpha·log E[exp(R/alpha)] over the base chain's own samples (exp(R) = p(c|x) ≤ 1: plain Monte Carlo is tight);
    `chunk`: that many paths at a time (a high-dimensional mixture's solves hold a d × d matrix per path)."""
    g = torch.Generator().manual_seed(seed)
    chunk = chunk or n
    sizes = [chunk] * (n // chunk) + [n % chunk] * (n % chunk > 0)
    rewards = torch.cat([reward(rollout(base, base, schedule, torch.randn(m, gmm.dim, generator=g), window=0, generator=g,
                                        compute_kl=False).x, gmm).double() for m in sizes])
    return -ALPHA * (float(torch.logsumexp(rewards / ALPHA, 0)) - math.log(len(rewards)))


def run(name: str, iters: int, exact_only: bool, trailing: dict | None, seed: int = 0) -> dict:
    """One row; a balanced one needs `trailing`, the trained trailing row of the same N (its grid and per-step KL)."""
    n, balanced = ROWS[name]
    timesteps = None
    if balanced:
        if trailing is None:
            raise SystemExit(f"row {name}: the balanced grid needs the trailing row's trained per-step KL (run row "
                             f"{n} first, in the same call, without --exact-only)")
        timesteps = balanced_timesteps(trailing["trained"]["kl_per_step"], trailing["grid"])
    schedule, base, exact = chain(n, timesteps)
    optimum = chain_optimum(base, schedule, seed + 2)
    row = {"row": name, "N": n, "grid": schedule.timesteps.tolist(), "optimum": optimum,
           "optimum_vs_continuum": optimum + ALPHA * math.log(float(GMM.weights[C]))}
    row["exact"] = measure(exact, base, schedule, 20_000, seed + 1)
    if not exact_only:
        torch.manual_seed(seed)
        control = MLPControl(base, hidden=64, time_features=4)
        t0 = time.time()
        fit_control(control, schedule, reward, ALPHA, iterations=iters, batch=512, seed=seed, lr=1e-2, final_lr=1e-4)
        row["seconds"] = round(time.time() - t0, 1)
        row["trained"] = measure(control, base, schedule, 20_000, seed + 1)
    return row


# --budget: the digits default trains 180 optimizer steps of 32 paths (cosine decay); each row trains the 20-step
# trailing chain's control with that many steps or more, at one rate, to the rate's hundredth by a cosine; then the
# default's 5,760 paths cut into more or fewer steps, 16× its batch, and Adjoint Matching on its budget
BUDGET = [("pathwise", steps, 32, lr) for steps in (180, 600, 2400) for lr in (3e-3, 1e-2, 3e-2)] + \
    [("pathwise", steps, batch, 1e-2) for steps, batch in ((90, 64), (360, 16), (720, 8))] + \
    [("pathwise", 180, 512, 3e-2), ("adjoint", 180, 32, 1e-2), ("adjoint", 180, 32, 3e-2)]


def budget(seed: int = 0) -> list[dict]:
    """Issue 13 (d) in closed form: how far optimizer steps, rate and batch take a Gaussian-step control on a class
    decision, the digits default's budget first. The chain's floor (a control trained to convergence) is ≈ 0.28."""
    schedule, base, _ = chain(20)
    optimum = chain_optimum(base, schedule, seed + 2)
    print(f"20 steps, trailing; objective − the chain's optimum ({optimum:.3f}) on 20,000 paths")
    print(f"{'estimator':9s} {'steps':>5s} {'batch':>5s} {'lr':>6s} {'gap':>15s} {'KL':>6s} {'on c':>6s} {'sec':>5s}")
    rows = []
    for name, steps, batch, lr in BUDGET:
        torch.manual_seed(seed)
        control = MLPControl(base, hidden=64, time_features=4)
        t0 = time.time()
        fit_control(control, schedule, reward, ALPHA, iterations=steps, batch=batch, seed=seed, lr=lr, final_lr=lr / 100,
                    estimator=AdjointMatching() if name == "adjoint" else None)
        m = measure(control, base, schedule, 20_000, seed + 1)
        row = {"estimator": name, "steps": steps, "batch": batch, "lr": lr, "gap": m["objective"] - optimum, "se": m["se"],
               "kl": m["kl"], "on_c": m["on_c"], "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        result = f"{row['gap']:7.3f} ± {m['se']:.3f} {m['kl']:6.3f} {m['on_c']:6.3f}" if math.isfinite(row["gap"]) \
            else f"{'diverged':>15s} {'':6s} {'':6s}"  # the rate too high for this many steps: the control blew up
        print(f"{name:9s} {steps:5d} {batch:5d} {lr:6.0e} {result} {row['seconds']:5.0f}", flush=True)
    return rows


# --nuisance: (dimensions, optimizer steps, the row's change); batch 32, lr 1e-2 to 1e-4 unless changed
NUISANCE = [(d, steps, "") for d in (2, 16, 64) for steps in (180, 600)] + \
    [(64, 600, change) for change in ("sees 2", "batch 128", "stl", "weight decay 0.1")]


class SeesOnly(torch.nn.Module):
    """A control network that sees the first `keep` of the state's `dim` coordinates (the rest zeroed), and time."""

    def __init__(self, net: torch.nn.Module, keep: int, dim: int):
        super().__init__()
        self.net, self.keep, self.dim = net, keep, dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        blank = torch.zeros_like(z[:, self.keep:self.dim])  # the coordinates it must not see
        return self.net(torch.cat([z[:, :self.keep], blank, z[:, self.dim:]], 1))


def nuisance(seeds: list[int]) -> list[dict]:
    """Issue 13: why a control on 256 pixels trains slower than on 2 coordinates. The mixture's decision in d dimensions,
    the d − 2 extra ones independent of the component (`with_nuisance`): the tilt's control, the reward and the chain's
    optimum are the 2-D ones there, but the control network sees all d coordinates and must learn to ignore d − 2."""
    print(f"20 steps, trailing; objective − the chain's optimum, mean (lowest–highest) over seeds {seeds}, "
          f"2,000 paths a seed")
    print(f"{'d':>3s} {'steps':>5s} {'change':16s} {'gap':>20s} {'KL':>6s} {'on c':>6s} {'sec':>5s}")
    rows = []
    for d, steps, change in NUISANCE:
        gmm = with_nuisance(GMM, d)
        schedule, base, _ = chain(20, gmm=gmm)
        optimum = chain_optimum(base, schedule, 2, n=20_000, gmm=gmm, chunk=2_000)
        row = {"d": d, "steps": steps, "change": change, "optimum": optimum, **over_seeds(
            seeds, gmm, schedule, base, optimum, steps, sees=GMM.dim if change == "sees 2" else None,
            batch=128 if change == "batch 128" else 32, lr=1e-2, estimator=Pathwise(path_gradient="stl") if change == "stl"
            else None, weight_decay=0.1 if change == "weight decay 0.1" else 0.0)}
        rows.append(row)
        print(f"{d:3d} {steps:5d} {change or '—':16s} {spread(row)}", flush=True)
    return rows


def over_seeds(seeds: list[int], gmm, schedule, base, optimum: float, steps: int, sees: int | None = None, batch: int = 32,
               lr: float = 1e-2, **fit) -> dict:
    """A control trained from each seed (`fit_control`, cosine to lr / 100; `sees`: the network sees only that many
    of the coordinates), measured on 2,000 paths: the gaps to `optimum`, the mean KL and share on c, the seconds."""
    runs, t0 = [], time.time()
    for seed in seeds:
        torch.manual_seed(seed)
        control = MLPControl(base, dim=gmm.dim, hidden=64, time_features=4)
        if sees is not None:  # the coordinates that decide: the 2-D mixture's
            control.net = SeesOnly(control.net, sees, gmm.dim)
        fit_control(control, schedule, lambda x: reward(x, gmm), ALPHA, iterations=steps, seed=seed, dim=gmm.dim,
                    batch=batch, lr=lr, final_lr=lr / 100, **fit)
        runs.append(measure(control, base, schedule, 2_000, seed + 1, gmm))
    return {"gaps": [r["objective"] - optimum for r in runs], "kl": sum(r["kl"] for r in runs) / len(runs),
            "on_c": sum(r["on_c"] for r in runs) / len(runs), "seconds": round(time.time() - t0, 1)}


def spread(row: dict) -> str:
    """The mean gap over the seeds (lowest–highest), KL, share on c, seconds."""
    gaps = row["gaps"]
    return (f"{sum(gaps) / len(gaps):7.3f} ({min(gaps):.2f}–{max(gaps):.2f}) {row['kl']:6.3f} {row['on_c']:6.3f} "
            f"{row['seconds']:5.0f}")


# --window: (window, dimensions, optimizer steps, lr) on the 20-step trailing chain, batch 32, cosine to lr / 100
WINDOWS = {"plain": Pathwise(None), "unbiased": Pathwise(None, unbiased_window=True), "full": Pathwise(10**9)}
WINDOW_ROWS = [(w, 2, 180, lr) for lr in (3e-3, 1e-2, 3e-2) for w in WINDOWS] + \
    [(w, 2, 600, 1e-2) for w in WINDOWS] + [(w, 64, 600, 1e-2) for w in ("plain", "unbiased")]


def window_rows(seeds: list[int]) -> list[dict]:
    """Issue 13 (b): the random window weighs step j's gradient by its chance p_j of lying inside the window (the late
    steps most); `unbiased` scales it by 1/p_j (the full chain's gradient in expectation, at the window's cost), `full`
    backpropagates through every step (the same expectation, 1.2–1.5× the window's cost here)."""
    print(f"20 steps, trailing, batch 32; objective − the chain's optimum, mean (lowest–highest) over seeds {seeds}, "
          f"2,000 paths a seed")
    print(f"{'window':8s} {'d':>3s} {'steps':>5s} {'lr':>6s} {'gap':>20s} {'KL':>6s} {'on c':>6s} {'sec':>5s}")
    rows, optima = [], {}
    for window, d, steps, lr in WINDOW_ROWS:
        gmm = with_nuisance(GMM, d) if d > GMM.dim else GMM
        schedule, base, _ = chain(20, gmm=gmm)
        if d not in optima:
            optima[d] = chain_optimum(base, schedule, 2, n=20_000, gmm=gmm, chunk=2_000)
        row = {"window": window, "d": d, "steps": steps, "lr": lr, "optimum": optima[d],
               **over_seeds(seeds, gmm, schedule, base, optima[d], steps, lr=lr, estimator=WINDOWS[window])}
        rows.append(row)
        print(f"{window:8s} {d:3d} {steps:5d} {lr:6.0e} {spread(row)}", flush=True)
    return rows


def chain_rows(args) -> list[dict]:
    """The rows of `ROWS` asked for, printed as they finish."""
    print(f"class tilt: component {C} (base weight {float(GMM.weights[C]):.2f}), -log Z = "
          f"{-math.log(float(GMM.weights[C])):.3f}, alpha {ALPHA}, iters {args.iters}")
    print(f"{'row':4s} {'N':>3s} {'optimum (vs continuum)':>22s} {'exact: gap':>16s} {'KL':>6s} {'on c':>6s} "
          f"{'trained: gap':>16s} {'KL':>6s} {'on c':>6s} {'sec':>5s}  grid")
    rows, trailing = [], {}
    for name in args.rows:
        row = run(name, args.iters, args.exact_only, trailing.get(ROWS[name][0]), args.seed)
        if "trained" in row and not ROWS[name][1]:
            trailing[row["N"]] = row
        rows.append(row)
        e, t = row["exact"], row.get("trained")
        trained = f"{t['objective'] - row['optimum']:7.3f} ± {t['se']:.3f} {t['kl']:6.3f} {t['on_c']:6.3f} {row['seconds']:5.0f}" \
            if t else f"{'—':>16s} {'':6s} {'':6s} {'':5s}"
        print(f"{name:4s} {row['N']:3d} {row['optimum']:12.3f} ({row['optimum_vs_continuum']:+.3f}) "
              f"{e['objective'] - row['optimum']:7.3f} ± {e['se']:.3f} {e['kl']:6.3f} {e['on_c']:6.3f} {trained}  "
              f"{row['grid'] if ROWS[name][1] else 'trailing'}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["10", "20", "20b", "50"], choices=list(ROWS))
    parser.add_argument("--iters", type=int, default=2400)
    parser.add_argument("--exact-only", action="store_true", help="no training: the continuum control on each chain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", action="store_true", help="the 20-step chain trained by steps, rate and batch "
                        "(the digits default's 180 × 32 first), instead of the rows")
    parser.add_argument("--nuisance", action="store_true", help="the 20-step chain's decision in 2, 16 and 64 "
                        "dimensions, the extra ones ignored by the reward, over seeds --seed .. --seed + 2")
    parser.add_argument("--window", action="store_true", help="the 20-step chain trained with the plain, the unbiased "
                        "and the full window, over seeds --seed .. --seed + 4")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = budget(args.seed) if args.budget else nuisance([args.seed + i for i in range(3)]) if args.nuisance \
        else window_rows([args.seed + i for i in range(5)]) if args.window else chain_rows(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
