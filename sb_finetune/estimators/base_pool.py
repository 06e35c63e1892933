"""Tilted regression on a pool of base paths: any reward, exact weights, no rollout of the control while it trains.

The optimum is p* = p_base · exp(R/alpha) / Z (a memoryless base). Paths of the BASE need no log-ratio: their weights

    w_i = exp(R(x_i)/alpha) / Σ_j exp(R(x_j)/alpha)

are exact for any control, so the base's paths never go stale. Each process draws `pool_size` of them once (no graph,
the reward without a gradient) and keeps their endpoints x_N and rewards; every update then resamples a batch from the
pool in proportion to w (draws from p*, up to the pool's self-normalisation) and regresses the model's own prediction
on them, noised forward at K grid steps drawn per update (weight n/K), in nats (σ_k² scaled, as the chain pays):

    ℓ = alpha · Σ_k || μ_k(f_θ(x_t)) − μ_k(target) ||² / (2σ_k²),   x_t, target = `sde.forward_noise`(x_N ~ w, ε)

minimised by f = E_p*[target | x_t]: the denoiser of the tilted pool (DESIGN.md, "Reciprocal property": the
optimal control's prediction for an exact base). Each update costs K policy calls with graph on one batch, against a
rollout's N, so updates are an order of magnitude cheaper than a rollout's; the pool's N calls a path are paid once.

What it does not do: reach the chain's own optimum in path KL. The pool's denoiser at low noise is close to its
samples, and the chain pays a control there at σ_k⁻²: on the digits default it lands on the optimum's target fraction
and reward with most of the KL's excess in the last two steps (README, "Rewards without a gradient"). `hold` (the
config's `objective.pool_hold`) regresses the last `hold` controlled steps on the base's own prediction instead, a
target without noise whose fixed point is no control there (the tilt's own control is small at low noise: σ_k²∇log h):
on digits, holding the last 2 of 19 halves the KL's excess at 0.91 of the samples on 0. Holding more gives up what the
late steps decide (7 held: 0.63). The pool is one
prompt's (a prompt's Z is its own): several prompts are refused. The log's reward and KL are the pool's (the base's);
the trained control shows in `logging.eval_every` and summary.json. Paths whose reward is not finite are left out of
the pool (one warning). Checkpoints keep each process's pool (`state_dict`), so a resumed run goes on with it.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..rollout import rollout
from ..sde import forward_noise, transition_mean
from . import Estimate, Task, backward_drawn, steps_drawn
from .weighted import effective_sample_size


class BasePool:
    name = "base_pool"

    def __init__(self, steps: int | None = None, pool_size: int = 2048, hold: int = 2):
        if pool_size < 1:
            raise ValueError(f"objective.pool_size: at least 1 path, got {pool_size}")
        self.steps = steps  # K grid steps regressed per update; None = all
        self.pool_size = pool_size
        self.hold = hold  # the last `hold` controlled steps regress on the base's prediction: no control there
        self.pool: tuple[Tensor, Tensor] | None = None  # (x_N [P, ...], R [P]) of base paths, drawn on the first call
        self.base_calls = 0  # base model calls spent on the pool (each call: one batch of paths, one step)

    def fill(self, task: Task) -> tuple[Tensor, Tensor]:
        """`pool_size` base paths in batches of the task's size, from this process's stream: endpoints and rewards."""
        ends, rewards = [], []
        with torch.no_grad():
            while sum(len(x) for x in ends) < self.pool_size:
                x0 = torch.randn(task.x0.shape, generator=task.generator, device=task.x0.device, dtype=task.x0.dtype)
                out = rollout(task.base, task.base, task.schedule, x0, window=0, generator=task.generator)
                self.base_calls += task.schedule.num_steps
                ends.append(out.x.detach())
                rewards.append(task.reward(out.x).detach().float().reshape(-1))
        return finite_paths(torch.cat(ends)[: self.pool_size], torch.cat(rewards)[: self.pool_size])

    def state_dict(self) -> dict[str, Tensor]:
        """The pool (empty before the first call): what a checkpoint keeps, so that a resumed run regresses on the same
        paths and does not pay for them again."""
        return {} if self.pool is None else {"pool_ends": self.pool[0].contiguous(), "pool_rewards": self.pool[1].contiguous()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        ends, rewards = state["pool_ends"], state["pool_rewards"]
        if ends.shape[0] != rewards.shape[0] or rewards.dim() != 1:
            raise ValueError(f"base_pool: a saved pool of {ends.shape[0]} paths with rewards of shape {tuple(rewards.shape)}")
        self.pool = (ends, rewards)

    def __call__(self, task: Task) -> Estimate:
        if self.pool is None:
            self.pool = self.fill(task)
        ends, rewards = (v.to(task.x0.device) for v in self.pool)
        s, alpha, b = task.schedule, task.alpha, task.x0.shape[0]
        log_w = rewards / alpha
        weights = torch.softmax(log_w.double(), 0).float()
        if self.hold >= len(task.controlled):
            raise ValueError(f"objective.pool_hold={self.hold} holds every one of the chain's {len(task.controlled)} "
                             f"controlled steps to the base: nothing would be trained")
        held = set(task.controlled[len(task.controlled) - self.hold:])
        k_steps = steps_drawn(task, self.steps)
        scale = alpha * len(task.controlled) / max(k_steps, 1)

        def step_loss(k: int) -> Tensor:
            drawn = torch.multinomial(weights, b, replacement=True, generator=task.generator)  # draws from p*
            x_end = ends[drawn]
            eps = torch.randn(x_end.shape, generator=task.generator, device=x_end.device, dtype=x_end.dtype)
            x_t, target = forward_noise(s, k, x_end, eps)
            if k in held:  # u_k = 0: the base's own prediction at the tilted state (no noise in the target)
                with torch.no_grad():
                    target = task.base(x_t, s.timesteps[k])
            mean = transition_mean(s, k, x_t, task.policy(x_t, s.timesteps[k]))
            sq = (mean - transition_mean(s, k, x_t, target)).pow(2).flatten(1).sum(1)
            return scale * sq.mean() / (2 * float(s.std[k]) ** 2)

        def backward() -> Tensor:
            return backward_drawn(task, self.steps, step_loss)

        none = ends.new_zeros(b, s.num_steps)
        ess = float(effective_sample_size(log_w.double())) / len(log_w)
        return Estimate(rewards[:b], none, none, alpha, k_steps, backward, checks=(rewards,),
                        extra={"pool_ess": ess, "pool_reward_tilted": float((weights * rewards).sum())})


def finite_paths(ends: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    """The pool without the paths whose reward is not finite (their weight exp(R/alpha) is no weight), said in one
    warning; a ValueError when no path is left."""
    keep = torch.isfinite(rewards)
    if bool(keep.all()):
        return ends, rewards
    n, kept = len(rewards), int(keep.sum())
    if kept == 0:
        raise ValueError(f"base_pool: the reward was not finite on any of the {n} base paths of the pool "
                         f"(e.g. {float(rewards[0]):g}); nothing to regress on")
    warnings.warn(f"base_pool: {n - kept} of the pool's {n} base paths have a non-finite reward and are left out")
    return ends[keep], rewards[keep]
