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

target (the config's `objective.pool_target`): what the regression's fixed point is.
forward: the tilted pool's denoiser E_w[target | x_t], above. Where the base is not exactly the denoiser of its own
    samples (any trained network), that fixed point carries the correction of the base toward its samples' denoiser as
    well as the tilt: on digits, 2.4 of the 3.1 nats the pool's control pays over the optimum, with the tilt switched off.
contrast: the same regression less the untilted pool's, so that only the tilt is learnt. The estimator trains a second
    control m_φ (a copy of the policy, `Task.module`, its own AdamW at the step's rate `Task.lr`, clipped at 1) on
    UNWEIGHTED draws of the pool, whose fixed point is the pool's own denoiser E[target | x_t], and the policy on

        ℓ = alpha · || μ_k(f_θ(x_t)) − μ_k(target − m_φ(x_t) + f_base(x_t)) ||² / (2σ_k²),   x_N ~ w,

    minimised by f_θ = f_base + E_w[target | x_t] − E[target | x_t] = f_base − σ_t ∇ log E[w | x_t]: the base plus the
    forward process's guidance toward the tilt, zero at R ≡ 0 whatever the base's own error. Per update: the
    policy's call with graph, m_φ's twice (once with graph on its own draws), the base's once; memory: a second copy
    of the denoiser (m_φ, discarded at the end). Checkpoints keep m_φ and its optimizer with the pool.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor

from ..rollout import rollout
from ..sde import forward_noise, transition_mean
from . import Estimate, Task, backward_drawn, steps_drawn
from .weighted import effective_sample_size


TARGETS = ("forward", "contrast")
POOL_MEAN = "pool_mean."  # state_dict keys of the contrast's second control (its trainable tensors, then its optimizer's)


class BasePool:
    name = "base_pool"

    def __init__(self, steps: int | None = None, pool_size: int = 2048, hold: int = 2, target: str = "forward"):
        if pool_size < 1:
            raise ValueError(f"objective.pool_size: at least 1 path, got {pool_size}")
        if target not in TARGETS:
            raise ValueError(f"objective.pool_target {target!r}: one of {TARGETS}")
        self.target = target
        self.pool_mean: PoolMean | None = None  # contrast: m_φ, made on the first call (a copy of the policy)
        self.saved_mean: dict[str, Tensor] = {}  # m_φ's state from a checkpoint, put in when m_φ is made
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
        """The pool (empty before the first call) and, for the contrast, m_φ and its optimizer: what a checkpoint keeps,
        so that a resumed run regresses on the same paths, does not pay for them again, and goes on as it would have."""
        if self.pool is None:
            return {}
        mean = self.pool_mean.state_dict() if self.pool_mean is not None else self.saved_mean
        return {"pool_ends": self.pool[0].contiguous(), "pool_rewards": self.pool[1].contiguous(),
                **{POOL_MEAN + k: v for k, v in mean.items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        ends, rewards = state["pool_ends"], state["pool_rewards"]
        if ends.shape[0] != rewards.shape[0] or rewards.dim() != 1:
            raise ValueError(f"base_pool: a saved pool of {ends.shape[0]} paths with rewards of shape {tuple(rewards.shape)}")
        self.pool = (ends, rewards)
        mean = {k[len(POOL_MEAN):]: v for k, v in state.items() if k.startswith(POOL_MEAN)}
        if self.target == "contrast" and not mean:
            raise ValueError("base_pool: this checkpoint holds the pool but not the contrast's second control (saved "
                             "with objective.pool_target=forward?): resume with the target it was trained with")
        if self.pool_mean is not None:
            self.pool_mean.load_state_dict(mean)
        else:
            self.saved_mean = mean

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

        mean_model = self._pool_mean(task) if self.target == "contrast" else None

        def regression(f, k: int, x_t: Tensor, target: Tensor) -> Tensor:  # in nats, as the chain pays: /2σ_k²
            mean = transition_mean(s, k, x_t, f(x_t, s.timesteps[k]))
            sq = (mean - transition_mean(s, k, x_t, target)).pow(2).flatten(1).sum(1)
            return scale * sq.mean() / (2 * float(s.std[k]) ** 2)

        def noised(k: int, drawn: Tensor) -> tuple[Tensor, Tensor]:
            x_end = ends[drawn]
            eps = torch.randn(x_end.shape, generator=task.generator, device=ends.device, dtype=ends.dtype)
            return forward_noise(s, k, x_end, eps)

        def step_loss(k: int) -> Tensor:
            x_t, target = noised(k, torch.multinomial(weights, b, replacement=True, generator=task.generator))  # from p*
            t = s.timesteps[k]
            if k in held:  # u_k = 0: the base's own prediction at the tilted state (no noise in the target)
                with torch.no_grad():
                    target = task.base(x_t, t)
            elif mean_model is not None:  # only the tilt: less the untilted pool's denoiser, plus the base's prediction
                mean_model.fit(regression, k, noised(k, torch.randint(len(ends), (b,), generator=task.generator,
                                                                     device=ends.device)))
                with torch.no_grad():
                    target = target - mean_model.denoiser(x_t, t) + task.base(x_t, t)
            return regression(task.policy, k, x_t, target)

        def backward() -> Tensor:
            loss = backward_drawn(task, self.steps, step_loss)
            if mean_model is not None:
                mean_model.step(task.lr)
            return loss

        none = ends.new_zeros(b, s.num_steps)
        ess = float(effective_sample_size(log_w.double())) / len(log_w)
        extra = {"pool_ess": ess, "pool_reward_tilted": float((weights * rewards).sum())}
        if mean_model is not None:
            extra["pool_mean_loss"] = mean_model.last_loss  # m_φ's regression loss on its last update (nats)
        return Estimate(rewards[:b], none, none, alpha, k_steps, backward, checks=(rewards,), extra=extra)

    def _pool_mean(self, task: Task) -> "PoolMean":
        if self.pool_mean is None:
            if task.module is None:
                raise ValueError("objective.pool_target=contrast trains a second control beside the policy, a copy of "
                                 "it: the task must carry the policy's module (Task.module)")
            self.pool_mean = PoolMean(task.module)
            if self.saved_mean:
                self.pool_mean.load_state_dict(self.saved_mean)
                self.saved_mean = {}
        self.pool_mean.bind(task)
        return self.pool_mean


class PoolMean:
    """m_φ: the untilted pool's denoiser, a copy of the policy's module (its adapter as it stands at the first call)
    trained on its own by plain regression (AdamW at the policy's rate, `Task.lr`, 1e-3 where the task gives none; the
    gradient's norm clipped at 1; its own gradients, not all-reduced: each process fits its own pool)."""

    def __init__(self, module: torch.nn.Module):
        self.module = copy.deepcopy(module)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("objective.pool_target=contrast: the policy's module has no trainable parameters to copy")
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, weight_decay=0.0)
        self.last_loss = float("nan")
        self.denoiser = self.module

    def bind(self, task: Task) -> None:
        """This batch's denoiser of the copy (the family's, with the batch's conditioning), or the copy itself."""
        self.denoiser = self.module if task.bind is None else task.bind(self.module)

    def fit(self, regression, k: int, noised: tuple[Tensor, Tensor]) -> None:
        """Backpropagate its regression at step k on unweighted draws (a local backward: the policy's is untouched)."""
        loss = regression(self.denoiser, k, *noised)
        if bool(torch.isfinite(loss)):
            loss.backward()
            self.last_loss = float(loss.detach())

    def step(self, lr: float | None) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and all(bool(torch.isfinite(g).all()) for g in grads):
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            for group in self.optimizer.param_groups:
                group["lr"] = 1e-3 if lr is None else lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"param.{i}": p.detach() for i, p in enumerate(self.params)}
        for i, p in enumerate(self.params):
            for key, value in self.optimizer.state.get(p, {}).items():
                state[f"adam.{i}.{key}"] = value.detach()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        shapes = [tuple(state[f"param.{i}"].shape) if f"param.{i}" in state else None for i in range(len(self.params))]
        if shapes != [tuple(p.shape) for p in self.params] or any(k.startswith("param.") and
                                                                   int(k.split(".")[1]) >= len(self.params) for k in state):
            raise ValueError("base_pool: the saved second control (objective.pool_target=contrast) does not fit this "
                             "policy's adapter (another rank or target modules?)")
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(state[f"param.{i}"])
                moments = {key.split(".", 2)[2]: v for key, v in state.items() if key.startswith(f"adam.{i}.")}
                if moments:
                    self.optimizer.state[p] = {k: v.clone().to(p.device) for k, v in moments.items()}


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
