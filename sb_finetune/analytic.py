"""A Gaussian mixture: a *perfect* pretrained model with a closed-form noised prediction at every t.

For an interpolant x = a·x0 + b·ε (VP: a = sqrt(ᾱ), b = sqrt(1−ᾱ); flow: a = 1−σ, b = σ), component k
of the noised data is N(a m_k, C_k) with C_k = a² S_k + b² I, and

    E[x0 | x, k] = m_k + a S_k C_k⁻¹ (x − a m_k),     E[ε | x, k] = b C_k⁻¹ (x − a m_k),

mixed by the responsibilities r_k(x) ∝ w_k N(x; a m_k, C_k). With a linear reward R(x) = aᵀx the base
tilted by exp(R/alpha) is again a mixture: N(m_k + S_k a/alpha, S_k) with weight
∝ w_k exp(aᵀm_k/alpha + aᵀS_k a/(2 alpha²)), and the optimal objective is −alpha · log Z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .rollout import Denoiser, Rollout
from .sde import FlowMethod, Schedule, make_schedule


@dataclass(frozen=True)
class GaussianMixture:
    weights: Tensor  # [K], sums to 1
    means: Tensor  # [K, d]
    covs: Tensor  # [K, d, d]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _tilt_exponents(self, a: Tensor, alpha: float) -> Tensor:
        a = a.to(self.means)
        return self.means @ a / alpha + torch.einsum("i,kij,j->k", a, self.covs, a) / (2 * alpha**2)

    def tilted(self, a: Tensor, alpha: float) -> GaussianMixture:
        """p(x) exp(aᵀx / alpha) / Z."""
        logits = self.weights.log() + self._tilt_exponents(a, alpha)
        means = self.means + torch.einsum("kij,j->ki", self.covs, a.to(self.means)) / alpha
        return GaussianMixture(torch.softmax(logits, 0), means, self.covs)

    def log_z(self, a: Tensor, alpha: float) -> float:
        """log E_p[exp(aᵀx / alpha)]."""
        return float(torch.logsumexp(self.weights.log() + self._tilt_exponents(a, alpha), 0))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[k] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(self.covs)[k], z)

    def _solve(self, x: Tensor, a: float, b: float) -> tuple[Tensor, Tensor]:
        """(C_k⁻¹ (x − a m_k) [n, K, d], log w_k N(x; a m_k, C_k) up to a constant [n, K]) for x = a·x0 + b·ε, float64."""
        x = x.double()
        eye = torch.eye(self.dim, dtype=torch.float64)
        cov = a**2 * self.covs.double() + b**2 * eye  # C_k
        diff = x[:, None, :] - a * self.means.double()[None]  # [n, K, d]
        sol = torch.linalg.solve(cov[None], diff.unsqueeze(-1)).squeeze(-1)  # C_k⁻¹ (x − a m_k)
        return sol, self.weights.double().log() - 0.5 * (torch.logdet(cov) + (diff * sol).sum(-1))

    def posterior(self, x: Tensor, a: float, b: float) -> tuple[Tensor, Tensor, Tensor]:
        """(E[x0|x], E[ε|x], responsibilities [n, K]) for x = a·x0 + b·ε, in float64."""
        sol, log_r = self._solve(x, a, b)
        r = torch.softmax(log_r, dim=1)
        x0 = self.means.double()[None] + a * torch.einsum("kij,nkj->nki", self.covs.double(), sol)
        return (r[..., None] * x0).sum(1), (r[..., None] * (b * sol)).sum(1), r

    def responsibilities(self, x: Tensor) -> Tensor:
        return self.posterior(x, 1.0, 0.0)[2]

    def log_responsibility(self, x: Tensor, k: int) -> Tensor:
        """log p(k | x) at the data (differentiable, float64): a classifier's log-probability, the mixture's own.

        As a reward at alpha = 1 it tilts the mixture to component k alone (p(x)·p(k|x) = w_k N(x; m_k, S_k)):
        `component(k)`, with log Z = log w_k. Digits' reward (log p(target | x)) in closed form."""
        return torch.log_softmax(self._solve(x, 1.0, 0.0)[1], dim=1)[:, k]

    def component(self, k: int) -> GaussianMixture:
        return GaussianMixture(self.weights.new_ones(1), self.means[k : k + 1], self.covs[k : k + 1])

    def fit_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(weights, means) of samples x under this mixture's components (soft assignment)."""
        r = self.responsibilities(x)
        weights = r.mean(0)
        means = (r.T @ x.double()) / r.sum(0)[:, None]
        return weights, means

    def vp_denoiser(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon") -> Denoiser:
        """The exact ε̂ (or v̂, x̂0) of a VP model with these ᾱ (indexed by the integer timestep)."""

        def predict(x: Tensor, t: Tensor) -> Tensor:
            ab = float(alphas_cumprod[int(t)])
            a, b = math.sqrt(ab), math.sqrt(1 - ab)
            x0, eps, _ = self.posterior(x, a, b)
            out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - b * x0}[prediction_type]
            return out.to(x.dtype)

        return predict

    def flow_denoiser(self, num_train_timesteps: int = 1000) -> Denoiser:
        """The exact v̂ = E[ε − x0 | x] of a flow model, called with t = σ · num_train_timesteps."""

        def predict(x: Tensor, t: Tensor) -> Tensor:
            sigma = float(t) / num_train_timesteps
            x0, eps, _ = self.posterior(x, 1 - sigma, sigma)
            return (eps - x0).to(x.dtype)

        return predict


def three_blobs() -> GaussianMixture:
    """The 2-D mixture of the tests and benchmarks: three well-separated, anisotropic components."""
    covs = torch.tensor([[[0.30, 0.10], [0.10, 0.20]], [[0.20, -0.05], [-0.05, 0.25]], [[0.25, 0.0], [0.0, 0.15]]])
    return GaussianMixture(
        weights=torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64),
        means=torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=torch.float64),
        covs=covs.double(),
    )


def with_nuisance(gmm: GaussianMixture, dim: int, var: float = 0.2) -> GaussianMixture:
    """`gmm` in `dim` dimensions: the extra ones N(0, var) in every component, so no component's responsibility (nor
    a reward made of them) depends on them, and the tilt's control is zero there. What a control gains or loses from
    seeing state it should ignore (an image's pixels beside its class), in closed form."""
    k, d = gmm.means.shape
    means = gmm.means.new_zeros(k, dim)
    means[:, :d] = gmm.means
    covs = torch.eye(dim, dtype=gmm.covs.dtype).repeat(k, 1, 1) * var
    covs[:, :d, :d] = gmm.covs
    return GaussianMixture(gmm.weights, means, covs)


def mixture_chain(process: str, num_steps: int, eta: float = 1.0, flow_method: FlowMethod = "posterior"
                  ) -> tuple[Schedule, Callable[[GaussianMixture], Denoiser]]:
    """The stock chain the tests and benchmarks run a mixture through, and a mixture's exact denoiser on it.

    VP: diffusers' DDPMScheduler (linear betas, "trailing" grid); flow: FlowMatchEulerDiscreteScheduler(shift=1)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if process == "vp":
        sched = DDPMScheduler(clip_sample=False, timestep_spacing="trailing")
        return make_schedule(sched, num_steps, eta), lambda mixture: mixture.vp_denoiser(sched.alphas_cumprod)
    if process == "flow":
        schedule = make_schedule(FlowMatchEulerDiscreteScheduler(shift=1.0), num_steps, eta, flow_method)
        return schedule, lambda mixture: mixture.flow_denoiser()
    raise ValueError(f"process {process!r}: vp or flow")


def objective_gap(out: Rollout, mixture: GaussianMixture, a: Tensor, alpha: float) -> tuple[float, float]:
    """objective − (−alpha·log Z) of a rollout on `mixture` with reward aᵀx, and its standard error.

    Estimated path by path as alpha·Σ log_ratio − aᵀx + alpha·log Z: at the optimum that is constant, so its noise is
    a fraction of the plain alpha·Σ KL − R's (0.004 against 0.013 on 5,000 samples of the exact control)."""
    per_path = alpha * out.log_ratio.sum(1).double() - out.x.double() @ a.double() + alpha * mixture.log_z(a.double(), alpha)
    return float(per_path.mean()), float(per_path.std()) / per_path.numel() ** 0.5


class MLPControl(torch.nn.Module):
    """A small control network for low-dimensional tests: policy(x, t) = base(x, t) + net(x, features(t/T)).

    features: t/T, plus sin/cos(π j t/T) for j = 1..time_features (the control's dependence on time is steep
    near the data end). The last layer starts at zero, so training starts from the base process (zero control)."""

    def __init__(self, base: Denoiser, dim: int = 2, hidden: int = 64, t_scale: float = 1000.0, time_features: int = 0):
        super().__init__()
        self.base, self.t_scale = base, t_scale
        self.register_buffer("freqs", math.pi * torch.arange(1, time_features + 1, dtype=torch.float32))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1 + 2 * time_features, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, dim)
        )
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        tau = float(t) / self.t_scale
        feats = torch.cat([torch.tensor([tau]), torch.sin(self.freqs * tau), torch.cos(self.freqs * tau)]).to(x)
        return self.base(x, t) + self.net(torch.cat([x, feats.expand(x.shape[0], -1)], dim=1))

    def frozen(self, x: Tensor, t: Tensor) -> Tensor:
        """The same prediction with the weights held fixed (a gradient to x only): `Task.frozen` for pathwise's stl."""
        return torch.func.functional_call(self, {n: p.detach() for n, p in self.named_parameters()}, (x, t))


def fit_control(
    control: MLPControl,
    schedule,
    reward,
    alpha: float,
    *,
    iterations: int,
    batch: int,
    lr: float = 3e-3,
    final_lr: float | None = None,
    window=None,
    seed: int = 0,
    dim: int = 2,
    estimator=None,
    costs=None,
    updates: int = 1,
    weight_decay: float = 0.0,
) -> list[float]:
    """Train `control` on the SOC objective with an estimator (default: pathwise with `window`); returns the
    objective per iteration. With `final_lr` the learning rate follows a cosine from `lr` down to `final_lr`;
    `costs` (a `sb_finetune.costs.Costs`) counts the model calls and reward queries; `updates` > 1 reuses each batch
    of paths for that many optimizer steps (the estimators that allow it: adjoint, weighted, policy_gradient);
    `weight_decay` > 0: AdamW's decoupled decay (else Adam)."""
    from .estimators import Task
    from .estimators.pathwise import Pathwise

    estimator = estimator or Pathwise(window)
    opt = torch.optim.AdamW(control.net.parameters(), lr=lr, weight_decay=weight_decay) if weight_decay \
        else torch.optim.Adam(control.net.parameters(), lr=lr)
    sched = None if final_lr is None else torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations * updates, eta_min=final_lr)
    g = torch.Generator().manual_seed(seed)
    policy, base, frozen = control, control.base, control.frozen
    if costs is not None:
        policy, base, reward = costs.count("policy", policy), costs.count("base", base), costs.count("reward", reward)
        frozen = costs.count("policy", frozen)
    history = []
    for _ in range(iterations):
        x0 = torch.randn(batch, dim, generator=g)
        est = estimator(Task(policy, base, schedule, x0, reward, alpha, generator=g, shared=g, frozen=frozen,
                             module=control, lr=opt.param_groups[0]["lr"]))
        for _ in range(updates):
            opt.zero_grad(set_to_none=True)
            est.backward()
            opt.step()
            if sched is not None:
                sched.step()
        history.append(est.objective)
    return history
