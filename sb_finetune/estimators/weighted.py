"""Importance-weighted regression toward the optimum: any reward (no gradient of it), K model calls with graph.

The optimum is the path measure P* = P_base · exp(R/alpha) / Z. Paths of the current control P_θ (the behaviour;
sampled without graph) reach it by the weights

    log w = R(x_N)/alpha − Σ_k log dP_θ/dP_base   (the pathwise log-ratio the rollout returns)

self-normalised within each group of G samples of one prompt (mean 1 in the group), so w · P_θ ≈ P*. Then a
weighted regression, at K controlled grid steps k drawn per batch (weight n/K), in nats (σ_k² scaled: what an
error costs the chain), on one of two targets:

path (default): the transitions the behaviour took. Step k's best Gaussian mean under P* is E_P*[x_{k+1} | x_k]
    (the SOC optimum's own step, for any sampler, memoryless or not), the minimiser of E_w ||μ_θ,k(x_k) − x_{k+1}||².
    Per sample, with the behaviour's own mean μ_old as control variate (E[x_{k+1} − μ_old | x_k] = 0 exactly),

        ℓ = alpha · [ ||μ_θ,k − μ_old,k||² + (w − 1) ||μ_θ,k − x_{k+1}||² ] / (2σ_k²),

    curvature w ≥ 0, gradient at μ_old −alpha (w − 1) z_k / σ_k: zero in expectation exactly where P_θ's steps are
    P*'s (the weights are then constant).
forward: the forward-noised endpoints x_t = a_t x_N + b_t ε with their target (ε, v or x̂0: `sde.forward_noise`),
    as DiffusionNFT and AWM regress. Plain, E_w ||f_θ(x_t) − target||² is minimised by E_w[target | x_t], the exact
    model of p* — but only where the base is the exact denoiser of its own samples; otherwise it also pulls the
    model toward that denoiser (on the digits default: KL 20 nats by step 74 and the reward saturated, a collapse).
    So the base is the anchor, with its own weights w_b = dP_base/dP_θ of the same paths (the log-ratio again):

        ℓ = alpha · [ (w − w_b) ||μ_k(f_θ) − μ_k(target)||² + w_b ||μ_k(f_θ) − μ_k(f_base)||² ] / (2σ_k²),

    curvature w ≥ 0, minimised by f = E_*[target | x_t] + (ρ_b/ρ_*)(f_base − E_base[target | x_t]) (ρ the noised
    marginals' densities to the behaviour's): the exact model of p* for an exact base, the base itself at R ≡ 0,
    and in between the base plus the tilt's correction of its denoiser. Tempering here anneals alpha (λ · R/alpha:
    λ = 0 is the base, not the behaviour), and each of the K steps costs one base call more, without graph.

Tempering (the stabiliser): the raw weights of one group collapse onto a few samples when the behaviour is far
from P* (effective sample size 1/Σw̄² ≪ G), and a regression on them overfits those few. Each group's log-weights
are moved by λ ∈ [0, 1] from those of a start measure (path: the behaviour, target P_θ^(1−λ) · P*^λ, part of the
way, a trust region in the path KL; forward: the base, target the tilt at alpha/λ), λ the largest for which the
effective sample size stays ≥ `min_ess`·G. λ = 1 once the control is near the optimum; the
log says λ and both sample sizes every step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rollout import rollout
from ..sde import forward_noise, transition_mean
from . import Estimate, Task, backward_drawn, group_index, steps_drawn


TARGETS = ("path", "forward")


def effective_sample_size(log_w: Tensor) -> Tensor:
    """(Σ w)² / Σ w² along the last dimension, from log-weights (in [1, G])."""
    return torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1))


def temper(log_w: Tensor, min_ess: float, start: Tensor | None = None, points: int = 201) -> Tensor:
    """Per row of [n_groups, G] log-weights, the largest λ on a grid of [0, 1] with ESS(start + λ (log w − start)) ≥
    min_ess · G; where none reaches it, the λ of the largest ESS. `start` (default 0: the behaviour itself) is the
    measure λ = 0 stands for."""
    start = torch.zeros_like(log_w) if start is None else start
    lams = torch.linspace(0, 1, points, dtype=log_w.dtype, device=log_w.device)
    ess = effective_sample_size(start[None] + lams[:, None, None] * (log_w - start)[None])  # [points, n_groups]
    ok = ess >= min_ess * log_w.shape[-1]
    largest_ok = (ok * torch.arange(points, device=log_w.device)[:, None]).argmax(0)  # ties → the first: λ = 0
    best = torch.where(ok.any(0), largest_ok, ess.argmax(0))
    return lams[best]


def importance_weights(log_w: Tensor, groups: Tensor | None, min_ess: float, start: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, dict[str, float]]:
    """[B] self-normalised weights (mean 1 in each group), tempered towards `start` (the λ = 0 measure: None = the
    behaviour) to ESS ≥ min_ess·G; the same for `start` itself (ones when None); and the numbers for the log: `ess`
    (the raw weights' effective sample size / G), `ess_tempered`, `temper` (mean λ)."""
    index = group_index(groups, log_w.shape[0], log_w.device)
    grouped = log_w.double()[index]
    begin = torch.zeros_like(grouped) if start is None else start.double()[index]
    g = grouped.shape[-1]
    lam = temper(grouped, min_ess, begin) if min_ess > 0 else torch.ones(grouped.shape[0], dtype=grouped.dtype)
    tempered = begin + lam[:, None] * (grouped - begin)
    w, w_start = torch.empty_like(log_w, dtype=torch.float64), torch.empty_like(log_w, dtype=torch.float64)
    w[index.flatten()] = (torch.softmax(tempered, -1) * g).flatten()
    w_start[index.flatten()] = (torch.softmax(begin, -1) * g).flatten()
    numbers = {"ess": float(effective_sample_size(grouped).mean()) / g,
               "ess_tempered": float(effective_sample_size(tempered).mean()) / g, "temper": float(lam.mean())}
    return w.float(), w_start.float(), numbers


class WeightedRegression:
    name = "weighted"

    def __init__(self, steps: int | None = None, min_ess: float = 0.5, target: str = "path"):
        if target not in TARGETS:
            raise ValueError(f"weighted regression target {target!r}: one of {TARGETS}")
        self.steps = steps  # K controlled grid steps regressed per batch; None = all
        self.min_ess = min_ess  # tempering keeps each group's effective sample size ≥ min_ess · G
        self.target = target  # path: the sampled transitions; forward: forward-noised endpoints

    def __call__(self, task: Task) -> Estimate:
        s, alpha = task.schedule, task.alpha
        with torch.no_grad():  # the behaviour: the current control, its log-ratio to the base, the reward (no ∇R)
            out = rollout(task.policy, task.base, s, task.x0, window=0, generator=task.generator,
                          return_trajectory=self.target == "path", return_means=self.target == "path", both=task.both)
            r = task.reward(out.x).detach()
        log_base = -out.log_ratio.sum(1)  # log dP_base/dP_θ of each path
        log_w = r.float() / alpha + log_base
        # path: temper towards the behaviour (λ = 0: stay); forward: towards the base (λ = 0: alpha → ∞, the base)
        w, w_base, numbers = importance_weights(log_w, task.groups, self.min_ess,
                                                log_base if self.target == "forward" else None)
        controlled = task.controlled
        k_steps = steps_drawn(task, self.steps)
        scale = alpha * len(controlled) / max(k_steps, 1)
        x_end = out.x.detach()
        w, w_base = w.to(x_end.device), w_base.to(x_end.device)

        def step_loss(k: int) -> Tensor:
            std = float(s.std[k])
            if self.target == "path":  # the step the behaviour took, x_k → x_{k+1}, and its own mean
                x = out.trajectory[k]
                mean = transition_mean(s, k, x, task.policy(x, s.timesteps[k]))
                sq = ((mean - out.means[k]).pow(2) + (w - 1).view(-1, *[1] * (x.ndim - 1))
                      * (mean - out.trajectory[k + 1]).pow(2)).flatten(1).sum(1)
                return scale * sq.mean() / (2 * std**2)
            eps = torch.randn(x_end.shape, generator=task.generator, device=x_end.device)
            x_t, target = forward_noise(s, k, x_end, eps)
            with torch.no_grad():
                mean_base = transition_mean(s, k, x_t, task.base(x_t, s.timesteps[k]))
            mean = transition_mean(s, k, x_t, task.policy(x_t, s.timesteps[k]))
            to_target = (mean - transition_mean(s, k, x_t, target)).pow(2).flatten(1).sum(1)
            to_base = (mean - mean_base).pow(2).flatten(1).sum(1)
            return scale * ((w - w_base) * to_target + w_base * to_base).mean() / (2 * std**2)

        def backward() -> Tensor:  # fresh steps (and noise) on each call: reusing the batch regresses on new points
            return backward_drawn(task, self.steps, step_loss)

        return Estimate(r, out.kl.detach(), out.log_ratio, alpha, k_steps, backward, checks=(log_w,), extra=numbers)

