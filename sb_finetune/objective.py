"""The SOC objective:  L(θ) = E[ alpha · Σ_k KL_k − R(x_N) ]  (DESIGN.md), with its parts for logging."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LossParts:
    loss: Tensor  # scalar, carries the gradient
    reward_mean: float
    reward_std: float
    kl: float  # mean over the batch of Σ_k KL_k, nats: KL(P_θ || P_base) on paths
    kl_per_step: Tensor  # [N] batch mean of KL_k, nats
    objective: float  # alpha · kl − reward_mean: the value L estimates
    window: int = 0

    def log_dict(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}loss": float(self.loss.detach()),
            f"{prefix}reward_mean": self.reward_mean,
            f"{prefix}reward_std": self.reward_std,
            f"{prefix}kl": self.kl,
            f"{prefix}objective": self.objective,
            f"{prefix}window": float(self.window),
        }


def soc_loss(reward: Tensor, kl: Tensor, alpha: float, window: int = 0) -> LossParts:
    """alpha · Σ_k KL_k − R, averaged over the batch.

    reward: [B]; kl: [B, N] per-step KL (nats) as the rollout returns it. Gradient flows through whichever
    terms carry a graph (the window's; see `rollout(kl_backward=...)` for the rest).
    """
    if reward.ndim != 1 or kl.ndim != 2 or kl.shape[0] != reward.shape[0]:
        raise ValueError(f"soc_loss: reward must be [B] and kl [B, N], got {tuple(reward.shape)} and {tuple(kl.shape)}")
    kl_total = kl.sum(dim=1)
    loss = (alpha * kl_total - reward.float()).mean()
    r = reward.detach().float()
    kl_mean = float(kl_total.detach().mean())
    return LossParts(
        loss=loss,
        reward_mean=float(r.mean()),
        reward_std=float(r.std()) if r.numel() > 1 else 0.0,
        kl=kl_mean,
        kl_per_step=kl.detach().mean(dim=0),
        objective=alpha * kl_mean - float(r.mean()),
        window=window,
    )


def is_finite(*values: Tensor | float) -> bool:
    """True when every value is finite (a step with a NaN/inf loss or reward must not reach the weights)."""
    return all(bool(torch.isfinite(v).all()) if isinstance(v, Tensor) else math.isfinite(v) for v in values)


@dataclass
class TiltedOptimum:
    """The optimum p* ∝ p_base · exp(R / alpha), estimated from samples by self-normalised importance weights."""

    weights: Tensor  # [n] w_i ∝ exp(R_i / alpha) · dP_base/dQ(x_i), sum 1
    log_z: float  # log E_base[exp(R / alpha)]
    objective: float  # −alpha · log Z: the least value of alpha · KL − E[R]
    reward_mean: float  # E_p*[R]
    kl: float  # KL(p* || p_base) = E_p*[R] / alpha − log Z, nats
    ess: float  # effective sample size 1 / Σ w_i²: how far to trust the estimate
    objective_se: float = 0.0  # alpha · se of log Z, by the delta method: Var log Ẑ ≈ Var(v)/(n E[v]²) = 1/ESS − 1/n
    # (benchmarks/README.md, "How sure the distance is": one seed's draw sat 2–3 of these off)

    def numbers(self) -> dict[str, float]:
        return {"objective": self.objective, "objective_se": self.objective_se, "kl": self.kl, "reward_mean": self.reward_mean,
                "effective_samples": self.ess}


def tilted_optimum(reward: Tensor, alpha: float, log_proposal: Tensor | None = None) -> TiltedOptimum:
    """What the best control reaches, from the rewards R_i of n sampled paths.

    With a memoryless sampler the SOC optimum is the base tilted by exp(R / alpha) (DESIGN.md); its objective is
    −alpha·log Z, so a trained control's alpha·KL − E[R] must sit above it (up to sampling noise). The paths are the
    base model's, or drawn from a proposal Q with log_proposal_i = log dQ/dP_base of path i (e.g. a mixture of base and
    trained paths: far more effective samples once the control is near the optimum)."""
    r = reward.detach().double().flatten()
    logw = r / alpha - (0.0 if log_proposal is None else log_proposal.detach().double().flatten())
    log_z = float(torch.logsumexp(logw, 0) - math.log(r.numel()))
    w = torch.softmax(logw, 0)
    r_mean = float((w * r).sum())
    ess = float(1 / (w * w).sum())
    return TiltedOptimum(w.float(), log_z, -alpha * log_z, r_mean, r_mean / alpha - log_z, ess,
                          alpha * math.sqrt(max(1 / ess - 1 / r.numel(), 0.0)))


def optimum_kl_profile(base, schedule, reward, alpha: float, trajectories: list[Tensor], continuations: int = 32,
                       batch: int = 1024, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Per-step KL of the optimal process P* ∝ P_base · exp(R/alpha) to the base, nats, and the part of it a
    Gaussian step can carry: ([N], [N]).

    Step k of P* is p_base(x'|x) h_{k+1}(x') / h_k(x) with h_k(x) = E_base[exp(R(x_N)/alpha) | x_k = x], so
    KL*_k = E_P*[log h_{k+1}(x_{k+1}) − log h_k(x_k)], summing to KL(P* ‖ P_base). `trajectories` (x_0 … x_N, each
    [n, ...]) are paths of P* (e.g. base paths resampled by exp(R/alpha)); log h_k at their states: `log_h_along`.

    The optimal transition's mean moves by u*_k = σ_k E[w z] / E[w] (w = exp(R/alpha) of a continuation, z its first
    step's noise: Stein's identity); a Gaussian step with that mean carries ||u*_k||²/(2σ_k²) of KL*_k, and
    KL*_k − ||u*_k||²/(2σ_k²) = KL(p*_k ‖ N(μ_k + u*_k, σ_k²)) is what no mean shift can carry: the chain's coarseness."""
    log_h, gaussian = log_h_along(base, schedule, reward, alpha, trajectories, continuations, batch, generator)
    return (log_h[1:] - log_h[:-1]).mean(1).float(), gaussian.float()


def gap_profile(base, schedule, reward, alpha: float, trajectories: list[Tensor], log_ratio: Tensor, log_z: float,
                continuations: int = 32, batch: int = 1024, generator: torch.Generator | None = None,
                proposal=None) -> Tensor:
    """Where along the chain a control loses to the optimum: [N + 1], G_k = alpha·KL between the first k steps of its
    paths and of P*'s (the marginals of (x_0 … x_k)), nats; G_N is the whole gap alpha·KL(P_θ ‖ P*).

    P*'s first k steps have density dP_base · h_k(x_k) / Z against the base's, so with the control's log-ratio
    ℓ_j = log dP_θ/dP_base of step j:  G_k = alpha · E_θ[Σ_{j<k} ℓ_j − log h_k(x_k)] + alpha·log Z. It telescopes:
    each G_k rests on one estimate of log h (from `continuations` chains a state, `log_h_along`), so its noise does not
    add up along the chain; G_0 ≈ 0 on a memoryless sampler (h_0 = Z), G_N uses log h_N = R/alpha, exact. Its steps
    G_{k+1} − G_k = alpha·E_θ[KL(p_θ(·|x_{0:k}) ‖ p*(·|x_{0:k}))] ≥ 0 (up to noise): the gap made at step k.
    `trajectories` (x_0 … x_N, each [n, ...]) and `log_ratio` ([n, N]) are the control's own paths, as
    `rollout(..., return_trajectory=True)` gives them; `log_z` the optimum's (summary.json: −objective / alpha).
    proposal: the control itself, to run the continuations with (`log_h_along`): near the optimum far fewer are needed."""
    log_h, _ = log_h_along(base, schedule, reward, alpha, trajectories, continuations, batch, generator, proposal)
    before = torch.cat([log_ratio.new_zeros(log_ratio.shape[0], 1), log_ratio.cumsum(1)], dim=1).double().T  # [N+1, n]
    return (alpha * ((before - log_h).mean(1) + log_z)).float()


def log_h_along(base, schedule, reward, alpha: float, trajectories: list[Tensor], continuations: int = 32,
                batch: int = 1024, generator: torch.Generator | None = None, proposal=None) -> tuple[Tensor, Tensor]:
    """log h_k(x_k) = log E_base[exp(R(x_N)/alpha) | x_k] at every state of n paths ([N + 1, n], float64; row N is
    R/alpha itself), from `continuations` base chains run on from each state (log of their mean, less its first-order
    bias var/(2 M mean²)); and ||u*_k||²/(2σ_k²) per step ([N]), the KL a mean shift of the optimal step carries
    (`optimum_kl_profile`), ||u*||² from two independent halves of the continuations (û_A · û_B, unbiased up to the
    ratios). `reward` maps final states to [n] rewards. Cost: n · M · N(N+1)/2 base steps.

    proposal: a control to run the continuations with instead, each weighted by exp(R/alpha − Σ log dP_q/dP_base)
    (h_k = E_q[that | x_k]); near the optimum the weight is nearly constant, so a few continuations estimate log h
    where the base's need hundreds at the states early in the chain (twice the model calls each; mean shifts: zeros)."""
    from .rollout import rollout
    from .sde import schedule_tail

    n_steps, n = schedule.num_steps, trajectories[0].shape[0]
    log_h = torch.empty(n_steps + 1, n, dtype=torch.float64)
    log_h[n_steps] = reward(trajectories[-1]).double() / alpha
    gaussian = torch.zeros(n_steps, dtype=torch.float64)
    half = continuations // 2
    for k in range(n_steps):
        tail = schedule_tail(schedule, k)
        starts = trajectories[k].repeat_interleave(continuations, dim=0)
        ends, noise, correction = [], [], []  # correction: Σ log dP_q/dP_base of each continuation (0 without proposal)
        std = float(schedule.std[k])
        for chunk in starts.split(batch):
            out = rollout(base if proposal is None else proposal, base, tail, chunk, window=0, generator=generator,
                          compute_kl=proposal is not None, return_trajectory=True, return_means=True)
            ends.append(out.x)
            correction.append(out.log_ratio.sum(1).double())
            if proposal is None and std > 0:  # the first step's noise under the base: the optimal mean shift
                noise.append(((out.trajectory[1] - out.means[0]) / std).flatten(1).double())
        logw = (reward(torch.cat(ends)).double() / alpha - torch.cat(correction)).view(n, continuations)
        log_mean = torch.logsumexp(logw, 1) - math.log(continuations)
        rel_var = torch.exp(2 * (logw - log_mean[:, None])).mean(1) - 1  # Var[w] / mean², per state
        log_h[k] = log_mean + rel_var / (2 * continuations)
        if noise:
            z = torch.cat(noise).view(n, continuations, -1)
            wa, wb = torch.softmax(logw[:, :half], 1), torch.softmax(logw[:, half:], 1)
            ua, ub = (wa[..., None] * z[:, :half]).sum(1), (wb[..., None] * z[:, half:]).sum(1)  # u*/σ, two halves
            gaussian[k] = 0.5 * (ua * ub).sum(1).mean()
    return log_h, gaussian
