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
