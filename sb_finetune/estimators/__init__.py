"""Estimators of the one objective's gradient: one interface, one file each.

    L(θ) = E_{P_θ} [ alpha · Σ_k KL_k − R(x_N) ]        (DESIGN.md)

An estimator takes a `Task` (policy and base denoisers, schedule, start noise, reward, alpha, random streams) and
returns an `Estimate`: the batch's numbers (reward, per-step KL and pathwise log-ratio, detached) and a `backward()`
that leaves an estimate of ∇_θ L in the parameters' `.grad` through `task.backward` (accelerate's, under DDP). The
two are apart so that the caller checks the numbers (finite on every process) before any gradient is made.

    pathwise          backprop through a random window of the chain                       (pathwise.py)
    adjoint           Adjoint Matching: the control regressed on the lean adjoint         (adjoint.py)
    weighted          importance-weighted regression toward the tilt; any reward          (weighted.py)
    policy_gradient   the score-function gradient with the exact KL-to-go; any reward     (policy_gradient.py)
    base_pool         regression on base paths resampled by exp(R/alpha); any reward       (base_pool.py)

`DIFFERENTIABLE_ONLY` need ∇R; the others call the reward without a graph.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Protocol

import torch
from torch import Tensor

from ..objective import is_finite
from ..rollout import Denoiser, PairedDenoiser
from ..sde import Schedule

ESTIMATORS = ("pathwise", "adjoint", "weighted", "policy_gradient", "base_pool")
DIFFERENTIABLE_ONLY = ("pathwise", "adjoint")  # backpropagate through the reward


@dataclass
class Task:
    """One batch of the fine-tuning problem, as every estimator sees it."""

    policy: Denoiser  # the adapted model (DDP-wrapped in the trainer)
    base: Denoiser  # the same model with the adapter off
    schedule: Schedule
    x0: Tensor  # start noise [B, ...]
    reward: Callable[[Tensor], Tensor]  # final state x_N → rewards [B], differentiable (decode + score)
    alpha: float  # KL weight
    generator: torch.Generator | None = None  # this process's stream: the chain's noise
    shared: torch.Generator | None = None  # the same on every process: draws all ranks must agree on
    backward: Callable[[Tensor], None] = Tensor.backward  # accelerator.backward in the trainer
    local: Callable[[], ContextManager] = nullcontext  # DDP's no_sync: a backward whose all-reduce a later one does
    groups: Tensor | None = None  # [B] group ids (samples of one prompt, equal-sized); None: the batch is one group
    both: PairedDenoiser | None = None  # policy and base in one model call (`control.paired_denoiser`), where made
    frozen: Denoiser | None = None  # the policy with its weights held fixed (`control.frozen_denoiser`): pathwise's stl
    module: torch.nn.Module | None = None  # the policy's module, unwrapped: base_pool's contrast trains a copy of it
    bind: Callable[[torch.nn.Module], Denoiser] | None = None  # a copy of `module` → its denoiser for this batch (the
    # family's, with the batch's conditioning); None: the module is itself the denoiser
    lr: float | None = None  # the optimizer's rate for this step (an estimator's own second model follows it)

    @property
    def controlled(self) -> list[int]:
        return [k for k in range(self.schedule.num_steps) if bool(self.schedule.controlled[k])]


@dataclass
class Estimate:
    """What an estimator made of one batch. `backward()` only after `finite()` (on every process)."""

    reward: Tensor  # [B], detached
    kl: Tensor  # [B, N] per-step KL to the base, nats, detached
    log_ratio: Tensor  # [B, N] pathwise log dP_θ/dP_base per step, detached
    alpha: float
    grad_steps: int  # controlled steps whose control got gradient (the window K; the regressed steps)
    run_backward: Callable[[], Tensor]  # makes the gradient; returns the surrogate loss it backpropagated
    checks: tuple[Tensor, ...] = ()  # more tensors that must be finite first (a loss, an adjoint)
    extra: dict[str, float] = field(default_factory=dict)  # estimator-specific numbers for the log
    loss: float = math.nan  # the surrogate loss, once backward() ran
    late: bool = False  # some of `kl` / `log_ratio` are made by backward() (`rollout(base_in_backward=True)`): finite()
    # again after it, before the weights move

    def finite(self) -> bool:
        return is_finite(self.reward, self.kl, *self.checks)

    def backward(self) -> None:
        self.loss = float(self.run_backward())

    @property
    def objective(self) -> float:
        """alpha · KL − E[R] of the batch: the value L estimates."""
        return self.alpha * float(self.kl.sum(1).mean()) - float(self.reward.mean())

    def log_dict(self) -> dict[str, float]:
        r = self.reward.float()
        return {"loss": self.loss, "reward_mean": float(r.mean()), "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
                "kl": float(self.kl.sum(1).mean()), "objective": self.objective, "grad_steps": float(self.grad_steps),
                **self.extra}


def group_index(groups: Tensor | None, batch: int, device=None) -> Tensor:
    """[n_groups, G] batch indices of each group (`groups`: [B] ids, each id G times; None: one group of all B)."""
    if groups is None:
        return torch.arange(batch, device=device)[None]
    sizes = torch.unique(groups, return_counts=True)[1]
    if not bool((sizes == sizes[0]).all()):
        raise ValueError(f"groups of unequal size {sizes.tolist()}: every prompt needs the same number of samples")
    return torch.argsort(groups, stable=True).to(device).view(len(sizes), -1)


def draw_steps(n: int, k: int | None, generator: torch.Generator | None = None) -> list[int]:
    """K of n indices, uniformly without replacement, ascending (all n when K is None or ≥ n)."""
    if k is None or k >= n:
        return list(range(n))
    if k < 1:
        raise ValueError(f"regressed steps: need K >= 1, got {k}")
    device = generator.device if generator is not None else "cpu"
    return sorted(torch.randperm(n, generator=generator, device=device)[:k].tolist())


def steps_drawn(task: Task, k: int | None) -> int:
    """How many controlled steps `backward_drawn` regresses: K, or all n when K is None or ≥ n."""
    return min(k or len(task.controlled), len(task.controlled))


def backward_drawn(task: Task, k: int | None, step_loss: Callable[[int], Tensor]) -> Tensor:
    """`backward_each` on K controlled steps drawn afresh from the shared stream (every process the same) on each
    call: a batch reused for several updates (`optim.updates_per_batch`) regresses new steps each time."""
    controlled = task.controlled
    return backward_each(task, [controlled[i] for i in draw_steps(len(controlled), k, task.shared)], step_loss)


def backward_each(task: Task, steps: list[int], step_loss: Callable[[int], Tensor]) -> Tensor:
    """Backpropagate `step_loss(k)` for each of the steps on its own (memory: one model call's graph at a time), all
    but the last inside DDP's no_sync, so the processes all-reduce once, with the last. Returns the summed loss."""
    total = torch.zeros(())
    for i, k in enumerate(steps):
        with task.local() if i < len(steps) - 1 else nullcontext():
            loss = step_loss(k)
            task.backward(loss)
        total = total.to(loss.device) + loss.detach()
    return total


class Estimator(Protocol):
    name: str

    def __call__(self, task: Task) -> Estimate: ...


def make_estimator(objective) -> Estimator:
    """The estimator an `ObjectiveConfig` names, with its settings."""
    if objective.estimator == "pathwise":
        from .pathwise import Pathwise

        return Pathwise((objective.window_min, objective.window_max or 10**9), bool(objective.checkpointing), objective.kl_grad,
                        objective.kl_log_steps, objective.path_gradient, objective.unbiased_window)
    if objective.estimator == "adjoint":
        from .adjoint import AdjointMatching

        return AdjointMatching(objective.adjoint_steps)
    if objective.estimator == "weighted":
        from .weighted import WeightedRegression

        return WeightedRegression(objective.grad_steps, objective.min_ess, objective.weighted_target)
    if objective.estimator == "policy_gradient":
        from .policy_gradient import PolicyGradient

        return PolicyGradient(objective.grad_steps, objective.clip_ratio)
    if objective.estimator == "base_pool":
        from .base_pool import BasePool

        return BasePool(objective.grad_steps, objective.pool_size, objective.pool_hold, objective.pool_target)
    raise ValueError(f"objective.estimator {objective.estimator!r}: one of {ESTIMATORS}")
