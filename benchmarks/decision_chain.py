"""Benchmark: what a Gaussian-step chain costs a class decision, in closed form (issue 13's cause (a)).

    python benchmarks/decision_chain.py                 # the four rows below, ~8 minutes on 2 cores
    python benchmarks/decision_chain.py --iters 1200    # shorter training
    python benchmarks/decision_chain.py --rows 20 20b 50 --exact-only   # seconds: the continuum control only

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

from sb_finetune.analytic import MLPControl, fit_control, three_blobs
from sb_finetune.rollout import rollout
from sb_finetune.sde import balanced_timesteps, vp_schedule

C, ALPHA = 1, 1.0
GMM = three_blobs()
ROWS = {"10": (10, False), "20": (20, False), "20b": (20, True), "50": (50, False)}  # name: (N, balanced grid)


def chain(n: int, timesteps: list[int] | None = None):
    sched = DDPMScheduler(clip_sample=False, timestep_spacing="trailing")
    return vp_schedule(sched, n, 1.0, timesteps), GMM.vp_denoiser(sched.alphas_cumprod), \
        GMM.component(C).vp_denoiser(sched.alphas_cumprod)


def reward(x: torch.Tensor) -> torch.Tensor:
    return GMM.log_responsibility(x, C).to(x.dtype)


@torch.no_grad()
def measure(policy, base, schedule, n: int, seed: int) -> dict:
    """Objective − the chain's optimum (path by path, ± se), its KL, the fraction of samples on component c."""
    g = torch.Generator().manual_seed(seed)
    out = rollout(policy, base, schedule, torch.randn(n, 2, generator=g), window=0, generator=g)
    per_path = ALPHA * out.log_ratio.sum(1).double() - reward(out.x).double()
    return {"objective": float(per_path.mean()), "se": float(per_path.std()) / n**0.5, "kl": float(out.kl.sum(1).mean()),
            "on_c": float(GMM.responsibilities(out.x)[:, C].mean()),
            "kl_per_step": [round(float(v), 5) for v in out.kl.mean(0)]}


@torch.no_grad()
def chain_optimum(base, schedule, seed: int, n: int = 100_000) -> float:
    """−alpha·log E[exp(R/alpha)] over the base chain's own samples (exp(R) = p(c|x) ≤ 1: plain Monte Carlo is tight)."""
    g = torch.Generator().manual_seed(seed)
    out = rollout(base, base, schedule, torch.randn(n, 2, generator=g), window=0, generator=g, compute_kl=False)
    return -ALPHA * (float(torch.logsumexp(reward(out.x).double() / ALPHA, 0)) - math.log(n))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["10", "20", "20b", "50"], choices=list(ROWS))
    parser.add_argument("--iters", type=int, default=2400)
    parser.add_argument("--exact-only", action="store_true", help="no training: the continuum control on each chain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
