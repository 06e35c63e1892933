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
    """The optimum p* ∝ p_base · exp(R / alpha), estimated from base samples by self-normalised importance weights."""

    weights: Tensor  # [n] w_i ∝ exp(R_i / alpha), sum 1
    log_z: float  # log E_base[exp(R / alpha)]
    objective: float  # −alpha · log Z: the least value of alpha · KL − E[R]
    reward_mean: float  # E_p*[R]
    kl: float  # KL(p* || p_base) = E_p*[R] / alpha − log Z, nats
    ess: float  # effective sample size 1 / Σ w_i²: how far to trust the estimate


def tilted_optimum(reward: Tensor, alpha: float) -> TiltedOptimum:
    """What the best control reaches, from the rewards R_i of n samples of the *base* model.

    With a memoryless sampler the SOC optimum is the base tilted by exp(R / alpha) (DESIGN.md); its objective is
    −alpha·log Z, so a trained control's alpha·KL − E[R] must sit above it (up to sampling noise)."""
    r = reward.detach().double().flatten()
    logw = r / alpha
    log_z = float(torch.logsumexp(logw, 0) - math.log(r.numel()))
    w = torch.softmax(logw, 0)
    r_mean = float((w * r).sum())
    return TiltedOptimum(w.float(), log_z, -alpha * log_z, r_mean, r_mean / alpha - log_z, float(1 / (w * w).sum()))
