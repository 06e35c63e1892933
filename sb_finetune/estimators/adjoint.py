"""Adjoint Matching (Domingo-Enrich et al. 2024): regress the control on the lean adjoint, for our Gaussian steps.

The chain: x_{k+1} = μ_base,k(x_k) + u_k(x_k) + σ_k z_k, with the control u_k = μ_θ,k − μ_base,k and cost
alpha · Σ_k ||u_k||² / (2σ_k²) − R(x_N). Holding the later controls fixed, the best u_k(x) solves

    alpha · u / σ_k² + E[ ∇V_{k+1}(x_{k+1}) | x_k = x ] = 0,    ∇V_{k+1}(x) = E[ a_{k+1} | x_{k+1} = x ],

exactly for Gaussian-step controls (no small-step limit), V the cost-to-go and a the full adjoint of the path
(∇ of its cost-to-go, noise held fixed). The lean adjoint

    ã_N = −∇R(x_N) / alpha,    ã_k = J_kᵀ ã_{k+1},    J_k = ∂μ_base,k / ∂x_k  (the frozen base step, at the sampled x_k)

drops a's terms J_uᵀ(alpha · u/σ² + a_{k+1}), whose mean given x_k is zero at that optimum; by induction from N
(Markov) E[ã_{k+1} | x_k] = E[a_{k+1} | x_k] / alpha there. So the regression, on paths of the current control (no
graph),

    L = (alpha/2) Σ_k || (μ_θ,k(x_k) − μ_base,k(x_k)) / σ_k + σ_k ã_{k+1} ||²

has the optimal Gaussian-step control as a stationary point. A step's control matches the adjoint of the state it
moves, ã_{k+1} (ã_k is off by one Jacobian). Its gradient in μ_θ,k is alpha (μ_θ − μ_base)/σ_k² + alpha ã_{k+1}:
the pathwise gradient with the lean adjoint for the full one, so a learning rate means the same for both.
Uncontrolled steps (deterministic, or steep onto the data) carry the adjoint but are not regressed.

Cost per batch: N policy calls without graph (the rollout), N base vector–Jacobian products (no parameter
gradients, one step's graph at a time) and K policy calls with graph, each backpropagated on its own: memory is
one model call's, whatever N and K. The K regressed steps are drawn without replacement from the controlled ones
(the shared stream: every process the same) and weighted n/K, an unbiased estimate of the whole sum. The target,
the batch's lean adjoint, does not depend on θ, so a batch may serve several updates (`optim.updates_per_batch`), each
on freshly drawn steps: the regression then moves the control most of the way to the batch's target for one rollout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rollout import Denoiser, rollout, step_log_ratio
from ..sde import Schedule, step_kl, transition_mean
from . import Estimate, Task, backward_drawn, steps_drawn


def lean_adjoint(base: Denoiser, schedule: Schedule, trajectory: list[Tensor], a_final: Tensor
                 ) -> tuple[list[Tensor | None], list[Tensor]]:
    """(ã_0 … ã_N, μ_base,0 … μ_base,N−1) along the sampled states x_0 … x_N; ã_N = a_final, ã_k = J_kᵀ ã_{k+1}.

    ã_0 is None: no control acts before x_0. The base means come with the products at no extra cost (the KL)."""
    n = schedule.num_steps
    adjoints: list[Tensor | None] = [None] * (n + 1)
    adjoints[n] = a_final.detach().float()
    means: list[Tensor] = [None] * n  # type: ignore[list-item]
    for k in reversed(range(n)):
        x = trajectory[k].detach().float().requires_grad_(k > 0)
        with torch.set_grad_enabled(k > 0):
            mean = transition_mean(schedule, k, x, base(x, schedule.timesteps[k]))
            if k > 0:
                (adjoints[k],) = torch.autograd.grad(mean, x, adjoints[k + 1])
        means[k] = mean.detach()
    return adjoints, means


class AdjointMatching:
    name = "adjoint"

    def __init__(self, steps: int | None = None):
        self.steps = steps  # K controlled steps regressed per batch; None = all

    def __call__(self, task: Task) -> Estimate:
        s, alpha = task.schedule, task.alpha
        with torch.no_grad():
            out = rollout(task.policy, task.base, s, task.x0, window=0, generator=task.generator,
                          return_trajectory=True, return_means=True, compute_kl=False)
        x_final = out.x.detach().requires_grad_(True)
        with torch.enable_grad():
            r = task.reward(x_final)
            (grad_r,) = torch.autograd.grad(r.sum(), x_final, allow_unused=True)
        grad_r = torch.zeros_like(x_final) if grad_r is None else grad_r
        adjoints, base_means = lean_adjoint(task.base, s, out.trajectory, -grad_r / alpha)

        none = out.x.new_zeros(out.x.shape[0])
        kls, log_ratios = [none] * s.num_steps, [none] * s.num_steps  # uncontrolled steps: the base's, no KL
        for k in task.controlled:  # the policy's means from the rollout, the base's from the adjoint pass
            std = float(s.std[k])
            kls[k] = step_kl(out.means[k], base_means[k], std)
            log_ratios[k] = step_log_ratio(kls[k], out.means[k], base_means[k], (out.trajectory[k + 1] - out.means[k]) / std, std)
        controlled = task.controlled
        k_steps = steps_drawn(task, self.steps)
        weight = alpha / 2 * len(controlled) / max(k_steps, 1)

        def step_loss(k: int) -> Tensor:
            std, x = float(s.std[k]), out.trajectory[k]
            target = base_means[k] - std**2 * adjoints[k + 1]  # the optimal mean, −σ² ã_{k+1} off the base's
            mean = transition_mean(s, k, x, task.policy(x, s.timesteps[k]))
            return weight * ((mean - target) / std).pow(2).flatten(1).sum(1).mean()

        def backward() -> Tensor:  # a reused batch (its adjoints fixed) regresses new steps
            return backward_drawn(task, self.steps, step_loss)

        adjoint_norm = torch.stack([a.flatten(1).norm(dim=1) for a in adjoints[1:]])  # [N, B]
        return Estimate(r.detach(), torch.stack(kls, 1), torch.stack(log_ratios, 1), alpha, k_steps, backward,
                        checks=(adjoint_norm,), extra={"adjoint_norm": float(adjoint_norm[-1].mean())})
