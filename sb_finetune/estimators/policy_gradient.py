"""The score-function (REINFORCE) gradient of the same objective: any reward, the exact KL, K steps with graph.

    L(θ) = E_{P_θ}[ alpha · Σ_j KL_j(x_j) − R(x_N) ],   KL_j = ||μ_θ,j − μ_base,j||² / (2σ_j²)  (exact, per step)

Step k's sample x_{k+1} ~ N(μ_θ,k(x_k), σ_k²) moves every later term, and KL_k depends on θ directly, so

    ∇L = E[ Σ_k ∇ log π_θ(x_{k+1} | x_k) · (C_k − b_k) + alpha · ∇_θ KL_k(x_k) ],   C_k = alpha · Σ_{j>k} KL_j − R

with C_k the cost-to-go after step k (the KL to go, Δt and every dimension in: KL_j is the transition's whole KL,
not a per-pixel or per-unit-time one) and b_k the mean of C_k over the other samples of the same prompt's group
(leave-one-out: unbiased). The baseline is subtracted, never divided by the group's spread: dividing would rescale
alpha batch by batch (Flow-GRPO's advantage normalisation does that). K of the controlled steps are drawn per batch
(weight n/K); each costs one policy call with graph and one base call without, after a rollout of N policy and N
base calls without graph. The surrogate's value is not the objective; `Estimate.objective` is.

Reusing a batch for more than one update (`optim.updates_per_batch`) makes the later ones off-policy; `clip` then
bounds them as PPO does, for a cost: the surrogate max(ρ A, clip(ρ, 1 − ε, 1 + ε) A) with ρ = π_θ/π_old of the step
taken (the batch's own means kept from the rollout), which on the first update (ρ = 1) has the plain gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rollout import rollout
from ..sde import step_kl, transition_mean
from . import Estimate, Task, backward_drawn, group_index, steps_drawn


def cost_to_go(kl: Tensor, reward: Tensor, alpha: float) -> Tensor:
    """[B, N] C_k = alpha · Σ_{j>k} KL_j − R: what step k's sample moves (the KL of steps after it, the reward)."""
    after = kl.flip(1).cumsum(1).flip(1) - kl
    return alpha * after - reward[:, None]


def leave_one_out_baseline(values: Tensor, groups: Tensor | None) -> Tensor:
    """For each sample, the mean of `values` ([B, ...]) over the other samples of its group (0 in a group of one)."""
    index = group_index(groups, values.shape[0], values.device)
    g = index.shape[1]
    grouped = values[index]  # [n_groups, G, ...]
    if g == 1:
        return torch.zeros_like(values)
    others = (grouped.sum(1, keepdim=True) - grouped) / (g - 1)
    out = torch.empty_like(values)
    out[index.flatten()] = others.flatten(0, 1)
    return out


class PolicyGradient:
    name = "policy_gradient"

    def __init__(self, steps: int | None = None, clip: float | None = None):
        self.steps = steps  # K controlled steps with a score term per batch; None = all
        self.clip = clip  # PPO's ε for reused batches; None = the plain score function

    def __call__(self, task: Task) -> Estimate:
        s, alpha = task.schedule, task.alpha
        with torch.no_grad():
            out = rollout(task.policy, task.base, s, task.x0, window=0, generator=task.generator, return_trajectory=True,
                          return_means=True, both=task.both)
            r = task.reward(out.x).detach().float()
        cost = cost_to_go(out.kl.float(), r, alpha)
        advantage = cost - leave_one_out_baseline(cost, task.groups)
        controlled = task.controlled
        k_steps = steps_drawn(task, self.steps)
        scale = len(controlled) / max(k_steps, 1)

        def step_loss(k: int) -> Tensor:
            std, x, t = float(s.std[k]), out.trajectory[k], s.timesteps[k]
            with torch.no_grad():
                mean_base = transition_mean(s, k, x, task.base(x, t))
            mean = transition_mean(s, k, x, task.policy(x, t))
            log_prob = -(out.trajectory[k + 1] - mean).pow(2).flatten(1).sum(1) / (2 * std**2)
            if self.clip is None:
                score = advantage[:, k] * log_prob
            else:  # PPO for a cost: the pessimistic (larger) of the plain and the clipped ratio's
                old = -(out.trajectory[k + 1] - out.means[k]).pow(2).flatten(1).sum(1) / (2 * std**2)
                ratio = torch.exp(log_prob - old)
                a = advantage[:, k]
                score = torch.maximum(ratio * a, ratio.clamp(1 - self.clip, 1 + self.clip) * a)
            return scale * (score + alpha * step_kl(mean, mean_base, std)).mean()

        def backward() -> Tensor:  # fresh steps on each call (a reused batch)
            return backward_drawn(task, self.steps, step_loss)

        spread = advantage[:, controlled].std() if advantage.numel() > 1 else advantage.new_zeros(())
        return Estimate(r, out.kl.detach(), out.log_ratio, alpha, k_steps, backward, checks=(cost,),
                        extra={"advantage_std": float(spread)})
