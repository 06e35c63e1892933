"""Memoryless SDE samplers for VP (DDPM) and flow-matching models, as one-step transitions.

A sampler is a `Schedule`: N steps k = 0..N-1 from noise to data, each a Gaussian transition

    x_{k+1} = mean_k(x_k, pred_k) + std_k · z,    z ~ N(0, I)

whose std depends on the schedule only. So the controlled and the base transition at the same state
share std_k, and the per-step KL (nats, per sample) is  KL_k = ||μ_θ − μ_base||² / (2 std_k²).
A step with std_k = 0 is deterministic: it is taken on the base prediction, uncontrolled, no KL term.
`schedule.controlled` says which steps the control acts on: the stochastic ones, less (flow posterior) a steep
step onto the data (`controlled_steps`).

All arithmetic is fp32 on the model's own prediction (ε̂, v̂ or x̂0), never through the score.
Notation follows DESIGN.md: ᾱ (alpha_bar) for VP, σ (sigma) for flow with x_σ = (1−σ) x0 + σ ε.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

VPPrediction = Literal["epsilon", "v_prediction", "sample"]
FlowMethod = Literal["posterior", "euler_maruyama"]


@dataclass(frozen=True)
class VPSchedule:
    """DDIM(η) on a VP model. η = 1 is the DDPM posterior: memoryless. Grid points k = 0..N."""

    timesteps: Tensor  # [N] model timesteps t_k, descending
    alpha_bar: Tensor  # [N+1] ᾱ at t_k; alpha_bar[N] is the final ᾱ (1, or ᾱ_0 if set_alpha_to_one=False)
    prediction_type: VPPrediction = "epsilon"
    eta: float = 1.0
    clip_sample: float | None = None  # clamp x̂0 to [-c, c] (diffusers' clip_sample_range), None = off

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @cached_property
    def std(self) -> Tensor:
        # σ_k² = η² (1−ᾱ_s)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_s),  t = t_k, s = t_{k+1}
        a_t, a_s = self.alpha_bar[:-1].double(), self.alpha_bar[1:].double()
        var = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        return (self.eta * var.clamp_min(0).sqrt()).float()

    @cached_property
    def controlled(self) -> Tensor:
        # Every stochastic step, steep or not (see `controlled_steps`): these are diffusers' own DDPM/DDIM(η)
        # steps, so an adapter trained on them samples the same in the stock pipeline with load_lora_weights.
        return self.std > 0


@dataclass(frozen=True)
class FlowSchedule:
    """Flow matching (SD3/FLUX: x_σ = (1−σ) x0 + σ ε, the model predicts v = ε − x0). Grid σ_0 > … > σ_N = 0.

    method "posterior": the exact Gaussian posterior step (DDIM-like, no singularity at σ = 1),
        ρ² = η² σ_s² [1 − ((1−σ_t) σ_s / ((1−σ_s) σ_t))²];  η = 1 is memoryless. Its last step is
        deterministic (σ_s = 0), hence uncontrolled; so is the steep step onto diffusers' σ_min before it
        (see `controlled_steps`).
    method "euler_maruyama": dx = [−v̂ + (g²/2) s] dτ + g dW in τ = 1 − σ with g² = c · 2σ/(1−σ),
        c = η² (so η means the same noise level for both methods; c = 1 is memoryless). A step that
        starts at σ = 1, where g is singular, is taken as the posterior step instead.
    """

    timesteps: Tensor  # [N] model timesteps (σ_k · num_train_timesteps for diffusers' schedulers)
    sigmas: Tensor  # [N+1], sigmas[N] = 0
    eta: float = 1.0
    method: FlowMethod = "posterior"

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @cached_property
    def em_steps(self) -> Tensor:
        """Which steps are Euler–Maruyama steps (the rest are posterior steps)."""
        return torch.full((self.num_steps,), self.method == "euler_maruyama") & (self.sigmas[:-1] < 1 - 1e-6)

    @cached_property
    def std(self) -> Tensor:
        s_t, s_s = self.sigmas[:-1].double(), self.sigmas[1:].double()
        ratio = ((1 - s_t) * s_s / ((1 - s_s) * s_t)).nan_to_num(0.0)
        rho = self.eta * (s_s**2 * (1 - ratio**2)).clamp_min(0).sqrt()
        c, h = self.eta**2, s_t - s_s
        em = (h * c * 2 * s_t / (1 - s_t).clamp_min(1e-12)).sqrt()
        return torch.where(self.em_steps, em, rho).float()

    @cached_property
    def controlled(self) -> Tensor:
        s = self.sigmas.double()
        return controlled_steps(self.std, s / (1 - s), ~self.em_steps)


Schedule = VPSchedule | FlowSchedule


def schedule_tail(schedule: Schedule, k: int) -> Schedule:
    """Steps k … N−1 of a schedule: the chain that continues from x_k (same steps, same noise levels)."""
    from dataclasses import replace

    if isinstance(schedule, VPSchedule):
        return replace(schedule, timesteps=schedule.timesteps[k:], alpha_bar=schedule.alpha_bar[k:])
    return replace(schedule, timesteps=schedule.timesteps[k:], sigmas=schedule.sigmas[k:])

# A posterior step t → s prices a correction Δx̂0 of the prediction at KL = (1 − ν_s²/ν_t²) ||Δx̂0||² / (2 ν_s²),
# ν the noise-to-signal ratio (VP: sqrt((1−ᾱ)/ᾱ), flow: σ/(1−σ)). That is what the continuum charges for a
# Δx̂0 held constant over the interval, but near the data (ν below the data's scale, 1 for unit-variance data
# and latents) the optimal correction shrinks like ν², so a step that ends far below where it starts, at
# ν_s ≪ min(ν_t, 1), charges any control ≈ (min(ν_t, 1)/ν_s)² times its continuum price, for a move of the
# sample of order ν_s. Stock grids end so: diffusers' flow grids step from σ ≈ 1/N onto σ_min ≈ 0.001·shift
# (ν drops 20×), and so do few-step grids. For the flow posterior step (our sampler: diffusers has no stochastic
# flow step to agree with) such a step is sampled with the base's mean and its own noise: uncontrolled, no KL.
# VP steps keep their control (VPSchedule.controlled); a VP "leading" grid's step onto t = 0 (ν drops 8× at
# N = 50) is the same trap, which "trailing" spacing avoids.
MAX_CONTROLLED_NOISE_DROP = 4.0


def controlled_steps(std: Tensor, nsr: Tensor, posterior: Tensor) -> Tensor:
    """Which steps the control acts on (and pays KL for): stochastic, and not a steep posterior step onto the data.

    std: [N] step noise; nsr: [N+1] noise-to-signal ratio ν at the grid points; posterior: [N] posterior-type steps."""
    drop = nsr[:-1].clamp_max(1.0) / nsr[1:].clamp_min(1e-30)
    steep = posterior & (drop > MAX_CONTROLLED_NOISE_DROP)
    return (std > 0) & ~steep


def vp_split(x: Tensor, pred: Tensor, alpha_bar_t: float, prediction_type: VPPrediction) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̂) from the model output at x_t = sqrt(ᾱ) x0 + sqrt(1−ᾱ) ε."""
    a, b = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
    if prediction_type == "epsilon":
        return (x - b * pred) / a, pred
    if prediction_type == "v_prediction":  # v = sqrt(ᾱ) ε − sqrt(1−ᾱ) x0
        return a * x - b * pred, a * pred + b * x
    if prediction_type == "sample":
        return pred, (x - a * pred) / b
    raise ValueError(f"unknown prediction_type {prediction_type!r} (epsilon, v_prediction or sample)")


def vp_mean(schedule: VPSchedule, k: int, x: Tensor, pred: Tensor) -> Tensor:
    """μ_k = sqrt(ᾱ_s) x̂0 + sqrt(1 − ᾱ_s − σ_k²) ε̂."""
    a_t, a_s = float(schedule.alpha_bar[k]), float(schedule.alpha_bar[k + 1])
    x0, eps = vp_split(x, pred, a_t, schedule.prediction_type)
    if schedule.clip_sample is not None:  # as diffusers: clamp x̂0, then re-derive ε̂ from it
        x0 = x0.clamp(-schedule.clip_sample, schedule.clip_sample)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    var = float(schedule.std[k]) ** 2
    return math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - var, 0.0)) * eps


def flow_mean(schedule: FlowSchedule, k: int, x: Tensor, v: Tensor) -> Tensor:
    s_t, s_s = float(schedule.sigmas[k]), float(schedule.sigmas[k + 1])
    if bool(schedule.em_steps[k]):
        # EM: x + h·b, b = −(1+c) v̂ − c x/(1−σ)   (the score term (g²/2)s with s = −(x + (1−σ)v̂)/σ)
        c, h = schedule.eta**2, s_t - s_s
        return x + h * (-(1 + c) * v - c * x / (1 - s_t))
    # posterior: μ = (1−σ_s) x̂0 + sqrt(σ_s² − ρ²) ε̂ with x̂0 = x − σ_t v̂, ε̂ = x + (1−σ_t) v̂
    rho2 = float(schedule.std[k]) ** 2
    x0, eps = x - s_t * v, x + (1 - s_t) * v
    return (1 - s_s) * x0 + math.sqrt(max(s_s**2 - rho2, 0.0)) * eps


def transition_mean(schedule: Schedule, k: int, x: Tensor, pred: Tensor) -> Tensor:
    """Mean of step k's Gaussian transition, in fp32, from the state and the model's own prediction."""
    x, pred = x.float(), pred.float()
    if isinstance(schedule, VPSchedule):
        return vp_mean(schedule, k, x, pred)
    return flow_mean(schedule, k, x, pred)


def forward_noise(schedule: Schedule, k: int, x0: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, the model's regression target) for data x0 noised to grid point k with noise ε: the forward process.

    VP: x_t = sqrt(ᾱ_k) x0 + sqrt(1−ᾱ_k) ε, target ε, x0 or v = sqrt(ᾱ) ε − sqrt(1−ᾱ) x0 (`prediction_type`);
    flow: x_σ = (1−σ_k) x0 + σ_k ε, target v = ε − x0. The denoiser that minimises E||f(x_t) − target||² over data
    x0 is the exact model of that data, so `transition_mean(schedule, k, x_t, target)` is the bridge's mean."""
    x0, eps = x0.float(), eps.float()
    if isinstance(schedule, VPSchedule):
        a, b = math.sqrt(float(schedule.alpha_bar[k])), math.sqrt(1 - float(schedule.alpha_bar[k]))
        target = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - b * x0}.get(schedule.prediction_type)
        if target is None:
            raise ValueError(f"unknown prediction_type {schedule.prediction_type!r} (epsilon, v_prediction or sample)")
        return a * x0 + b * eps, target
    sigma = float(schedule.sigmas[k])
    return (1 - sigma) * x0 + sigma * eps, eps - x0


def step_kl(mean_policy: Tensor, mean_base: Tensor, std: float) -> Tensor:
    """KL(N(μ_θ, std²I) || N(μ_base, std²I)) per sample, in nats; 0 for a deterministic step."""
    if std == 0.0:
        return mean_policy.new_zeros(mean_policy.shape[0])
    return (mean_policy - mean_base).pow(2).flatten(1).sum(1) / (2 * std**2)


def balanced_timesteps(kl_per_step: list[float], timesteps: list[int], num_steps: int | None = None, *,
                       power: float = 0.5, floor: float = 0.2) -> list[int]:
    """A VP grid of `num_steps` (default: as many) timesteps placed where a control's KL is spent.

    A Gaussian step of variance σ_k² misses the optimal transition N(μ, σ_k²)·h/Z by ≈ ¼ σ_k⁴ ||∇² log h||² (for a
    quadratic log h the optimal step is Gaussian with covariance σ_k² (I − σ_k² ∇² log h)⁻¹, which a mean shift cannot
    give), so where the tilt decides (h changes fast) a coarse step costs most, and there the KL rate is high too.

    From a run's per-step KL on the grid `timesteps` (summary.json's `kl_per_step_after` and `timesteps`: step k
    covers (t_{k+1}, t_k]) the new grid has a density in t ∝ (KL per unit t)^power + floor (the floor relative to the
    mean, so quiet stretches keep some steps). The grid's last timestep, the data end's step, is kept as it is.
    power 1 would balance ¼σ⁴||∇²log h||² where ||∇²log h|| ~ ||∇log h||²; on the mixture's class tilt
    (benchmarks/decision_chain.py) powers 0.5–1 and floors 0.05–0.3 came within 0.02 nats of each other."""
    ts = [int(t) for t in timesteps]
    n = len(ts) if num_steps is None else num_steps
    if len(kl_per_step) != len(ts) or any(a <= b for a, b in zip(ts, ts[1:])) or n < 2 or power < 0 or floor <= 0:
        raise ValueError(f"balanced_timesteps: need one KL per step of a strictly descending grid, num_steps >= 2, "
                         f"power >= 0, floor > 0 (got {len(kl_per_step)} KLs, {len(ts)} timesteps, {n}, {power}, {floor})")
    # density over the steps above the last timestep: step k of the old grid covers (t_{k+1}, t_k]
    width = torch.tensor([a - b for a, b in zip(ts[:-1], ts[1:])], dtype=torch.float64)
    rate = torch.tensor(kl_per_step[:-1], dtype=torch.float64).clamp_min(0) / width
    dens = rate**power
    dens = dens / (dens * width).sum().clamp_min(1e-300) * width.sum() + floor
    cum = torch.cat([dens.new_zeros(1), torch.cumsum(dens * width, 0)])
    cum = cum / cum[-1]
    levels = torch.linspace(0, 1, n, dtype=torch.float64)[:-1]  # n − 1 steps above the kept last timestep
    j = (torch.searchsorted(cum, levels, right=True) - 1).clamp(0, len(width) - 1)
    t = torch.tensor(ts[:-1], dtype=torch.float64)[j] - (levels - cum[j]) / (cum[j + 1] - cum[j]) * width[j]
    out = [int(round(float(v))) for v in t] + [ts[-1]]
    for i in range(len(out) - 2, -1, -1):  # strictly descending after rounding (steps of at least 1)
        out[i] = max(out[i], out[i + 1] + 1)
    if out[0] > ts[0]:
        raise ValueError(f"balanced_timesteps: {n} steps do not fit between t = {ts[-1]} and {ts[0]}")
    return out


# --------------------------------------------------------------------------- schedules from diffusers


def vp_schedule(scheduler, num_steps: int, eta: float = 1.0, timesteps: list[int] | None = None) -> VPSchedule:
    """The VP schedule of a diffusers DDPM/DDIM-family scheduler (ᾱ and grid read from it).

    Step k goes from t_k to t_{k+1} (the next timestep of the grid, so any subset works); the last step
    goes to the scheduler's final ᾱ (1, or ᾱ_0 where a DDIM config has set_alpha_to_one=False).
    """
    config = scheduler.config
    if timesteps is None:
        scheduler.set_timesteps(num_steps)
        timesteps = [int(t) for t in scheduler.timesteps]
    ts = torch.tensor(timesteps, dtype=torch.long)
    alphas_cumprod = scheduler.alphas_cumprod.double()
    if len(ts) != num_steps or not bool((ts[:-1] > ts[1:]).all()) or int(ts.min()) < 0 or int(ts.max()) >= len(alphas_cumprod):
        raise ValueError(f"vp_schedule: need {num_steps} strictly descending timesteps in [0, {len(alphas_cumprod) - 1}], "
                         f"got {ts.tolist()}")
    final = getattr(scheduler, "final_alpha_cumprod", None)
    final = 1.0 if final is None else float(final)
    alpha_bar = torch.cat([alphas_cumprod[ts], torch.tensor([final], dtype=torch.float64)])
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
    return VPSchedule(ts, alpha_bar, config.get("prediction_type", "epsilon"), eta, clip)


def flow_schedule(scheduler, num_steps: int, eta: float = 1.0, method: FlowMethod = "posterior", **set_timesteps_kwargs) -> FlowSchedule:
    """The flow schedule of a diffusers FlowMatchEulerDiscreteScheduler (shifted sigmas as it makes them).

    Pass `mu=` for dynamically shifted models (FLUX), as their pipelines do.
    """
    scheduler.set_timesteps(num_steps, **set_timesteps_kwargs)
    sigmas = scheduler.sigmas.double().cpu()
    if float(sigmas[-1]) != 0.0:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return FlowSchedule(scheduler.timesteps.float().cpu(), sigmas, eta, method)


def make_schedule(scheduler, num_steps: int, eta: float = 1.0, flow_method: FlowMethod = "posterior",
                  timesteps: list[int] | None = None, **kwargs) -> Schedule:
    """VP or flow schedule, by the scheduler's kind; `timesteps`: a VP grid of one's own (`sampler.timesteps`)."""
    if hasattr(scheduler, "alphas_cumprod"):
        return vp_schedule(scheduler, num_steps, eta, timesteps)
    if timesteps is not None:
        raise ValueError(f"timesteps of one's own (sampler.timesteps, a pipeline's timesteps=) are for VP (DDPM/DDIM) "
                         f"schedulers; {type(scheduler).__name__} makes its own grid from the step count")
    if "FlowMatch" in type(scheduler).__name__:
        return flow_schedule(scheduler, num_steps, eta, flow_method, **kwargs)
    raise TypeError(f"{type(scheduler).__name__} is neither a VP (alphas_cumprod) nor a flow-matching scheduler")
