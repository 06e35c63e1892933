"""Benchmark: full training of a control network on the tilted Gaussian-mixture target (DESIGN.md).

    python benchmarks/tilted_gmm.py                    # every run, ~3 CPU-minutes each
    python benchmarks/tilted_gmm.py vp flow --iters 300   # a subset, shorter
    python benchmarks/tilted_gmm.py vp_weighted vp_policy_gradient flow_weighted flow_policy_gradient   # reward-only
    python benchmarks/tilted_gmm.py flow_weighted --seed 1                # another training seed

Base: `three_blobs()`; reward R(x) = aᵀx, a = (0.5, 0.5), alpha = 1; N = 50 steps; batch 512. After
training, 20,000 samples of the controlled chain are scored against the closed-form tilted mixture:
max weight error, max component-mean error, and objective − (−alpha·log Z) (≥ 0 up to noise), the objective
estimated with the pathwise log-ratio (± its standard error). `exact_gap` is the same gap for the exact control
(the tilted mixture's own prediction) on the same 50-step chain: what plugging in the continuum optimum costs
there. `floor` is the 50-step chain's own optimum against the closed form, −alpha·log Z_N + alpha·log Z: no
control can go below it on that chain, and one that shifts the mean of each Gaussian step (as ours, as a LoRA)
stays above it where a coarse step's optimal transition, p_base(x'|x)·h(x'), is not Gaussian. Memoryless runs
should land on the target; low-noise samplers and a short fixed window should not.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from sb_finetune.analytic import MLPControl, fit_control, mixture_chain, objective_gap, three_blobs
from sb_finetune.costs import Costs
from sb_finetune.estimators.adjoint import AdjointMatching
from sb_finetune.estimators.pathwise import Pathwise
from sb_finetune.estimators.policy_gradient import PolicyGradient
from sb_finetune.estimators.weighted import WeightedRegression
from sb_finetune.rollout import rollout

A = torch.tensor([0.5, 0.5])
ALPHA = 1.0
N = 50

# name: (family, eta, window, flow_method, estimator)
RUNS = {
    "vp": ("vp", 1.0, None, None, "pathwise"),
    "flow": ("flow", 1.0, None, "euler_maruyama", "pathwise"),
    "flow_posterior": ("flow", 1.0, None, "posterior", "pathwise"),
    "vp_stl": ("vp", 1.0, None, None, "stl"),
    "flow_stl": ("flow", 1.0, None, "euler_maruyama", "stl"),
    "vp_adjoint": ("vp", 1.0, None, None, "adjoint"),
    "flow_adjoint": ("flow", 1.0, None, "euler_maruyama", "adjoint"),
    "flow_posterior_adjoint": ("flow", 1.0, None, "posterior", "adjoint"),
    "vp_weighted": ("vp", 1.0, None, None, "weighted"),
    "vp_policy_gradient": ("vp", 1.0, None, None, "policy_gradient"),
    "flow_weighted": ("flow", 1.0, None, "euler_maruyama", "weighted"),
    "flow_policy_gradient": ("flow", 1.0, None, "euler_maruyama", "policy_gradient"),
    "vp_eta0.2": ("vp", 0.2, None, None, "pathwise"),
    "flow_c0.1": ("flow", 0.1**0.5, None, "euler_maruyama", "pathwise"),
    "vp_K5_fixed": ("vp", 1.0, 5, None, "pathwise"),
    "vp_K5-50": ("vp", 1.0, (5, 50), None, "pathwise"),
    "vp_full_backprop": ("vp", 1.0, 50, None, "pathwise"),
}


# reward-only runs: (batches of paths, optimizer steps on each batch). weighted: at most 1/5 of pathwise's model calls
# (137 · (100 + 8 · 20) ≤ 177,600 / 5: VP pathwise's 148 a path × 1,200); policy_gradient reuses each batch 3 times
# only: its plain gradient goes off-policy on a reused batch (flow at 8 updates: diverged, KL 354)
REWARD_ONLY = {"weighted": (137, 8), "policy_gradient": (200, 3)}


def setup(family: str, eta: float, method: str | None):
    """(base mixture, schedule, base denoiser, exact control: the tilted mixture's denoiser)."""
    gmm = three_blobs()
    schedule, denoiser = mixture_chain(family, N, eta, method or "posterior")
    return gmm, schedule, denoiser(gmm), denoiser(gmm.tilted(A.double(), ALPHA))


def run(name: str, iters: int, batch: int, seed: int = 0, lr: float = 1e-2, final_lr: float = 1e-4, hidden: int = 64,
        time_features: int = 4, adjoint_steps: int | None = None, grad_steps: int | None = 10,
        reward_only_iters: int | None = None, reward_only_updates: int | None = None) -> dict:
    family, eta, window, method, estimator = RUNS[name]
    updates = 1
    if estimator in ("weighted", "policy_gradient"):
        default_iters, default_updates = REWARD_ONLY[estimator]
        iters = default_iters if reward_only_iters is None else reward_only_iters or iters
        updates = reward_only_updates or default_updates
    make = {"pathwise": lambda: None, "stl": lambda: Pathwise(window, path_gradient="stl"),
            "adjoint": lambda: AdjointMatching(adjoint_steps), "weighted": lambda: WeightedRegression(grad_steps), "policy_gradient": lambda: PolicyGradient(grad_steps)}
    gmm, schedule, base, exact = setup(family, eta, method)
    target = gmm.tilted(A.double(), ALPHA)
    torch.manual_seed(seed)
    control = MLPControl(base, hidden=hidden, time_features=time_features)
    costs = Costs()
    t0 = time.time()
    fit_control(control, schedule, lambda x: x @ A, ALPHA, iterations=iters, batch=batch, window=window, seed=seed,
                lr=lr, final_lr=final_lr, estimator=make[estimator](), updates=updates,
                costs=costs)
    seconds = time.time() - t0
    per_path = costs.per(iters * batch)
    out, gap, se = evaluate(control, base, schedule, gmm, seed + 1)
    exact_out, exact_gap, _ = evaluate(exact, base, schedule, gmm, seed + 1)
    # the chain's own optimum, −alpha·log E_base[exp(R/alpha)] on this 50-step chain, by importance weights on the
    # exact control's paths (near-optimal, so nearly equal weights: ESS ≈ 93% on VP): a lower bound
    log_w = exact_out.x.double() @ A.double() / ALPHA - exact_out.log_ratio.sum(1).double()
    floor = ALPHA * (gmm.log_z(A.double(), ALPHA) - float(torch.logsumexp(log_w, 0)) + math.log(len(log_w)))
    floor = floor if eta == 1.0 else math.nan  # a low-noise chain's optimum is not P_base·exp(R/alpha)/Z (its start is fixed)
    weights, means = target.fit_stats(out.x)
    return {
        "run": name,
        "iters": iters,
        "weights_err": float((weights - target.weights).abs().max()),
        "means_err": float((means - target.means).norm(dim=1).max()),
        "objective_gap": gap,
        "objective_gap_se": se,
        "exact_gap": exact_gap,
        "floor": floor,
        "kl": float(out.kl.sum(1).mean()),
        "seconds": round(seconds, 1),
        # per trained path: model calls forward / backward (policy and base together), reward values / gradients
        "model_fwd": per_path.get("policy_fwd", 0) + per_path.get("base_fwd", 0),
        "model_bwd": per_path.get("policy_bwd", 0) + per_path.get("base_bwd", 0),
        "reward": per_path.get("reward_fwd", 0),
        "reward_grad": per_path.get("reward_bwd", 0),
    }


@torch.no_grad()
def evaluate(policy, base, schedule, gmm, seed: int, n: int = 20000):
    """(rollout, objective − (−alpha·log Z), its standard error) on n samples, pathwise estimate."""
    g = torch.Generator().manual_seed(seed)
    out = rollout(policy, base, schedule, torch.randn(n, 2, generator=g), window=0, generator=g)
    return out, *objective_gap(out, gmm, A, ALPHA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--iters", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-2, help="initial learning rate (cosine decay to --final-lr)")
    parser.add_argument("--final-lr", type=float, default=1e-4)
    parser.add_argument("--hidden", type=int, default=64, help="control network width")
    parser.add_argument("--time-features", type=int, default=4, help="sin/cos features of t fed to the control network (0: t alone)")
    parser.add_argument("--adjoint-steps", type=int, default=None, help="adjoint runs: steps regressed per path (default all)")
    parser.add_argument("--grad-steps", type=int, default=10, help="weighted / policy_gradient runs: steps with a gradient per batch")
    parser.add_argument("--reward-only-iters", type=int, default=None,
                        help="batches of paths of the weighted / policy_gradient runs (they need no reward gradient; 0: "
                             "--iters; default: weighted 137, policy_gradient 200)")
    parser.add_argument("--reward-only-updates", type=int, default=None,
                        help="weighted / policy_gradient runs: optimizer steps on each batch of paths (default: weighted 8, "
                             "policy_gradient 3)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (evaluation uses seed + 1)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    gmm = three_blobs()
    print(f"target weights {gmm.tilted(A.double(), ALPHA).weights.numpy().round(3)}  base {gmm.weights.numpy()}  "
          f"-alpha log Z = {-ALPHA * gmm.log_z(A.double(), ALPHA):.4f}  N={N} batch={args.batch} iters={args.iters}")
    print(f"{'run':22s} {'weights_err':>11s} {'means_err':>9s} {'obj_gap':>15s} {'exact_gap':>9s} {'floor':>7s} {'KL':>7s} "
          f"{'fwd/path':>8s} {'bwd/path':>8s} {'R/path':>6s} {'dR/path':>7s} {'iters':>5s} {'calls':>7s} {'sec':>6s}")
    rows = []
    for name in args.runs:
        row = run(name, args.iters, args.batch, seed=args.seed, lr=args.lr, final_lr=args.final_lr, hidden=args.hidden,
                  time_features=args.time_features, adjoint_steps=args.adjoint_steps, grad_steps=args.grad_steps,
                  reward_only_iters=args.reward_only_iters, reward_only_updates=args.reward_only_updates)
        rows.append(row)
        gap = f"{row['objective_gap']:.4f} ± {row['objective_gap_se']:.4f}"
        print(f"{name:22s} {row['weights_err']:11.4f} {row['means_err']:9.4f} {gap:>15s} {row['exact_gap']:9.4f} {row['floor']:7.4f} {row['kl']:7.4f} "
              f"{row['model_fwd']:8.1f} {row['model_bwd']:8.1f} {row['reward']:6.1f} {row['reward_grad']:7.1f} {row['iters']:5d} "
              f"{(row['model_fwd'] + row['model_bwd']) * row['iters']:7.0f} {row['seconds']:6.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
