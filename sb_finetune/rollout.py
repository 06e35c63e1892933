"""The controlled rollout: sample with the control (policy) drift, score every step against the base.

Model contract (one for every family): a `Denoiser` maps (x_k, t_k) to the model's own prediction
(ε̂, v̂ or x̂0 as the schedule says), with conditioning and classifier-free guidance bound inside, so
the guided prediction is the drift of both processes. `policy` is the adapted model, `base` the same
module with the adapter disabled (see `sb_finetune.control.base_denoiser`).

Gradient window: the last K *controlled* steps (`schedule.controlled`: a deterministic last step, or a
steep one onto the data, is uncontrolled and rides along) keep the autograd graph; K is drawn once per
rollout, fixed or uniform in [K_min, K_max]. The default, uniform in [1, N_controlled], gives every
controlled step a positive chance to be inside it: a short fixed window is biased (DESIGN.md,
"Truncation bias"). Steps before the window run without a graph. Inside it, the gradient flows through
the state into both the policy and the base prediction (the base's weights are frozen, its input is not).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from .sde import Schedule, step_kl, transition_mean

Denoiser = Callable[[Tensor, Tensor], Tensor]
PairedDenoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x_k, t_k) → (policy's, base's prediction)
WindowSpec = int | tuple[int, int] | None


@dataclass
class Rollout:
    x: Tensor  # final sample x_N, fp32
    kl: Tensor  # [B, N] per-step KL to the base, nats; outside the window detached (see `kl_backward`)
    window: int  # K: the last K controlled steps carried the graph
    trajectory: list[Tensor] | None = None  # x_0 … x_N, detached, when asked for
    log_ratio: Tensor | None = None  # [B, N] pathwise log dP_θ/dP_base per step, detached: its mean is the KL's,
    # and alpha·Σ log_ratio − R is constant along paths at the optimum (alpha·log Z), so it estimates the objective
    # with far less variance than the KL. Not a loss (its gradient is not the KL's).
    means: list[Tensor] | None = None  # μ_k of the transition each step took (the policy's where controlled), detached
    kl_steps: int = 0  # controlled steps whose KL was computed; fewer than all when `kl_sample` subsampled them
    path_terms: Tensor | None = None  # [B, N] with `frozen`: the window's log q_θ̄ − log p_base of the step taken,
    # differentiable in the path only (θ̄: the policy's weights held fixed); the KL elsewhere. The loss's KL part.
    pending: int = 0  # window steps whose KL and log-ratio the backward fills in (`base_in_backward`): 0 until then


def draw_window(spec: WindowSpec, num_steps: int, generator: torch.Generator | None = None) -> int:
    """K for one rollout: `None` → uniform in [1, N]; an int → fixed; (K_min, K_max) → uniform, inclusive.

    N is the number of controlled steps; a K_max above it is clipped to it (so "the full chain" can be
    said as a large number)."""
    lo, hi = _window_range(spec, num_steps)
    if not 0 <= lo <= hi:
        raise ValueError(f"gradient window {spec!r} must lie in [0, {num_steps}] with K_min <= K_max")
    if lo == hi:
        return lo
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(lo, hi + 1, (1,), generator=generator, device=device))


def _window_range(spec: WindowSpec, num_steps: int) -> tuple[int, int]:
    """(K_min, K_max) of a window spec, K_max clipped to the chain's `num_steps` controlled steps."""
    lo, hi = (1, num_steps) if spec is None else (spec, spec) if isinstance(spec, int) else spec
    return min(lo, num_steps), min(hi, num_steps)


def window_inclusion(spec: WindowSpec, num_steps: int) -> list[float]:
    """p_m = P(the m-th controlled step from the end lies inside the window), m = 1 … N, for K drawn as `draw_window`
    draws it: P(K >= m) = (K_max − max(m, K_min) + 1) / (K_max − K_min + 1), 0 past K_max (DESIGN.md, "Random window")."""
    lo, hi = _window_range(spec, num_steps)
    return [(hi - max(m, lo) + 1) / (hi - lo + 1) if m <= hi else 0.0 for m in range(1, num_steps + 1)]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by `c`."""

    @staticmethod
    def forward(ctx, x: Tensor, c: float) -> Tensor:
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.c, None


def _scale_grad(x: Tensor, c: float) -> Tensor:
    return _ScaleGrad.apply(x, c) if c != 1.0 and x.requires_grad else x


def _reweighted(window_step: Callable, c: float) -> Callable:
    """`window_step` whose parameter gradient is c times its own while the gradient it passes back to x_k is unchanged:
    the outputs' incoming gradients are scaled by c, and what leaves through the input by 1/c."""

    def call(schedule: Schedule, k: int, x: Tensor, z: Tensor, compute_kl: bool = True):
        x_next, kl, log_ratio, mean, term = window_step(schedule, k, _scale_grad(x, 1.0 / c), z, compute_kl=compute_kl)
        return _scale_grad(x_next, c), _scale_grad(kl, c), log_ratio, mean, _scale_grad(term, c)

    return call


class _Late:
    """A checkpointed window whose base is called in the backward only: the raw (not checkpointed) `base`, and with
    the adapter's weights `params` the raw `policy` and `both` (or None) for `_InBackward`; and where the window steps'
    KL_k and log-ratio go once their backward has made them: column k of the rollout's [B, N] `kl` and `log_ratio`,
    which exist once the loop is done."""

    def __init__(self, base: Denoiser, policy: Denoiser | None = None, both: PairedDenoiser | None = None,
                 params: tuple[Tensor, ...] = ()):
        self.base, self.policy, self.both, self.params = base, policy, both, params
        self.steps: list[int] = []  # the steps whose KL the backward makes
        self.checked = False  # `_InBackward`: its graph's weights checked against `params` (once a rollout)
        self.kl: Tensor | None = None
        self.log_ratio: Tensor | None = None

    def fill(self, k: int, kl: Tensor, log_ratio: Tensor) -> None:
        self.kl[:, k] = kl
        self.log_ratio[:, k] = log_ratio


class _KLBaseInBackward(torch.autograd.Function):
    """KL_k = |μ_θ − μ_base(x_k)|² / 2σ² (`step_kl`) whose forward does not call the base: it returns zeros, and the
    backward calls the base once, with graph, gives μ_θ and x_k their exact gradients (x_k's through the base, as a
    checkpointed call's recompute would) and writes KL_k and the log-ratio into `late`. Under checkpointing the base's
    first-pass call made only that value, and its recompute came anyway: one model call less a window step, the
    gradient and the numbers the same. The backward runs the base under the forward's autocast, as checkpointing does."""

    @staticmethod
    def forward(ctx, x: Tensor, mean: Tensor, base_mean: Callable[[Tensor], Tensor], std: float, z: Tensor, late: _Late,
                k: int):
        ctx.save_for_backward(x, mean, z)
        ctx.base_mean, ctx.std, ctx.late, ctx.k = base_mean, std, late, k
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return mean.new_zeros(mean.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, mean, z = ctx.saved_tensors
        device, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            x_in = x.detach().requires_grad_(ctx.needs_input_grad[0])
            kl, mean_base, grad_mean, grad_x = _base_kl_backward(ctx.base_mean, x_in, mean, ctx.std, grad)
        ctx.late.fill(ctx.k, kl.detach(), step_log_ratio(kl, mean, mean_base, z, ctx.std))
        return grad_x, grad_mean, None, None, None, None, None


def _base_kl_backward(base_mean: Callable[[Tensor], Tensor], x_in: Tensor, mean: Tensor, std: float, grad: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """KL_k at the policy's mean `mean` (held as a value) and the base's μ_base(x_in), called here with graph; its
    vector–Jacobian products with `grad`: (KL_k, μ_base, ∂/∂μ_θ, ∂/∂x_k or None where x_in needs none). The base's graph
    is gone when it returns."""
    mean_in = mean.detach().requires_grad_(True)
    mean_base = base_mean(x_in)
    kl = step_kl(mean_in, mean_base, std)
    grads = torch.autograd.grad(kl, [mean_in] + [x_in] * x_in.requires_grad, grad)
    return kl, mean_base, grads[0], grads[1] if x_in.requires_grad else None


class _InBackward(torch.autograd.Function):
    """μ_θ(x_k) and KL_k of a checkpointed window step whose forward calls the policy alone, without a graph, and whose
    backward makes the calls with graph: the policy's recompute and the base's call as ONE paired call (`both_means`,
    where calls are small: one call of 2B costs less than two of B, and the peak holds both halves' activations), or
    else the base's call and then the policy's, one after the other (the base's graph freed first: the peak holds one
    call's). It gives x_k and the adapter's weights (`params`: inputs of this function, so that their gradients reach
    the weights' accumulators in the one backward, where DDP's hooks wait for them) their exact gradients, and writes
    KL_k and the log-ratio into `late`; under the forward's autocast, as checkpointing restores it. Without torch's
    checkpoint the first pass records no graph at all (5–9 % off a digits step at K = 10–19, benchmarks/README.md).
    The model must be deterministic (no active dropout: diffusers' models default to dropout 0, and `from_pretrained`
    leaves them in eval mode): unlike torch's checkpoint, nothing replays the first pass's random state."""

    @staticmethod
    def forward(ctx, x: Tensor, policy_mean: Callable[[Tensor], Tensor], base_mean: Callable[[Tensor], Tensor],
                both_means: Callable[[Tensor], tuple[Tensor, Tensor]] | None, std: float, z: Tensor, late: _Late, k: int,
                *params: Tensor):
        ctx.policy_mean, ctx.base_mean, ctx.both_means = policy_mean, base_mean, both_means
        ctx.std, ctx.late, ctx.k, ctx.params = std, late, k, params
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        mean = policy_mean(x)  # no graph: a custom function's forward runs without one
        ctx.save_for_backward(x, z, mean)
        return mean, mean.new_zeros(mean.shape[0])

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_kl: Tensor):
        x, z, first = ctx.saved_tensors
        device, dtype, enabled = ctx.autocast
        need_x, need = ctx.needs_input_grad[0], ctx.needs_input_grad[8:]
        wanted = [p for p, n in zip(ctx.params, need) if n]
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            x_in = x.detach().requires_grad_(need_x)
            if ctx.both_means is not None:  # one paired call: the KL from its two halves
                mean, mean_base = ctx.both_means(x_in)
                kl = step_kl(mean, mean_base, ctx.std)
                outputs, grads_out, grad_x_base = (mean, kl), (grad_mean, grad_kl), None
            else:  # the base first, its graph gone before the policy's is made; the KL at the first pass's μ_θ
                kl, mean_base, grad_mean_kl, grad_x_base = _base_kl_backward(ctx.base_mean, x_in, first, ctx.std,
                                                                             grad_kl)
                mean = ctx.policy_mean(x_in)
                outputs, grads_out = mean, grad_mean + grad_mean_kl
            if not ctx.late.checked:
                _check_leaves(mean, (x_in, *ctx.params))
                ctx.late.checked = True
            grads = iter(torch.autograd.grad(outputs, [x_in] * need_x + wanted, grads_out, allow_unused=True))
        ctx.late.fill(ctx.k, kl.detach(), step_log_ratio(kl, first, mean_base, z, ctx.std))
        grad_x = next(grads) if need_x else None
        if grad_x_base is not None:
            grad_x = grad_x + grad_x_base
        return grad_x, None, None, None, None, None, None, None, *(next(grads) if n else None for n in need)


def _check_leaves(out: Tensor, params: tuple[Tensor, ...]) -> None:
    """Raise if `out`'s graph reads a tensor that needs a gradient and is not in `params`: `_InBackward` would silently
    give it none."""
    known, seen, stack = {id(p) for p in params}, set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf that needs a gradient
        if leaf is not None and id(leaf) not in known:
            raise ValueError(f"the policy's prediction reads a tensor that needs a gradient ({tuple(leaf.shape)}) but is "
                             "not in rollout's `params`: the window's backward would give it none")
        stack.extend(fn for fn, _ in node.next_functions)


def _step(policy: Denoiser, base: Denoiser, schedule: Schedule, k: int, x: Tensor, z: Tensor, compute_kl: bool = True,
          both: PairedDenoiser | None = None, frozen: Denoiser | None = None,
          late: _Late | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One transition x_k → x_{k+1} under the policy; KL_k to the base at the same x_k; the pathwise log-ratio
    (`step_log_ratio`, detached); the transition's mean μ_k; and the step's term of the loss: KL_k, or with `frozen`
    (the policy with its weights held fixed) `path_term`. `both`, if given, makes the two predictions in one call."""
    t = schedule.timesteps[k]
    std = float(schedule.std[k])
    no_kl = x.new_zeros(x.shape[0])
    if not bool(schedule.controlled[k]):  # deterministic or steep step: the base's, uncontrolled, no KL
        mean = transition_mean(schedule, k, x, base(x, t))
        return mean + std * z, no_kl, no_kl, mean, no_kl
    if policy is base or not compute_kl:
        mean = transition_mean(schedule, k, x, policy(x, t))
        return mean + std * z, no_kl, no_kl, mean, no_kl
    if late is not None and std > 0 and late.params:  # the policy without graph; its calls with graph in the backward
        late.steps.append(k)
        paired = None if late.both is None else (
            lambda x_in: tuple(transition_mean(schedule, k, x_in, p) for p in late.both(x_in, t)))
        mean, kl = _InBackward.apply(x, lambda x_in: transition_mean(schedule, k, x_in, late.policy(x_in, t)),
                                     lambda x_in: transition_mean(schedule, k, x_in, late.base(x_in, t)), paired, std, z,
                                     late, k, *late.params)
        return mean + std * z, kl, kl.detach(), mean, kl
    if late is not None and std > 0:  # the base only in the backward
        mean = transition_mean(schedule, k, x, policy(x, t))
        late.steps.append(k)
        kl = _KLBaseInBackward.apply(x, mean, lambda x_in: transition_mean(schedule, k, x_in, late.base(x_in, t)), std,
                                     z, late, k)
        return mean + std * z, kl, kl.detach(), mean, kl
    if both is not None:
        pred, pred_base = both(x, t)
        mean, mean_base = transition_mean(schedule, k, x, pred), transition_mean(schedule, k, x, pred_base)
    else:
        mean = transition_mean(schedule, k, x, policy(x, t))
        mean_base = transition_mean(schedule, k, x, base(x, t))
    kl = step_kl(mean, mean_base, std)
    x_next = mean + std * z
    term = kl if frozen is None else path_term(x_next, transition_mean(schedule, k, x, frozen(x, t)), mean_base, std)
    return x_next, kl, step_log_ratio(kl, mean, mean_base, z, std), mean, term


def path_term(x_next: Tensor, mean_frozen: Tensor, mean_base: Tensor, std: float) -> Tensor:
    """log N(x_{k+1}; μ_θ̄, std²) − log N(x_{k+1}; μ_base, std²) per sample, θ̄ the policy's weights held fixed, written
    as (e·d + |d|²/2) / std² with e = x_{k+1} − μ_θ̄ (= std·z) and d = μ_θ̄ − μ_base (no difference of large squares).

    Sticking the landing (Roeder et al. 2017) on paths: Σ_k of these minus R/alpha is log dP_θ/dP* + log Z, CONSTANT
    along paths at the optimum; differentiated through the path alone (the score term ∂_θ log q_θ at a fixed path,
    mean zero, left out), its gradient is the objective's (the same mean as the KL's) and vanishes path by path at an
    optimum the Gaussian steps reach (near it on a coarse chain, whose optimal step is not Gaussian), where the KL's
    keeps the noise of every path. Its value is `step_log_ratio`'s: KL_k + d·z/std."""
    if std == 0.0:
        return step_kl(mean_frozen, mean_base, std)
    e, d = x_next - mean_frozen, mean_frozen - mean_base
    return ((e * d).flatten(1).sum(1) + 0.5 * d.pow(2).flatten(1).sum(1)) / std**2


def step_log_ratio(kl: Tensor, mean_policy: Tensor, mean_base: Tensor, z: Tensor, std: float) -> Tensor:
    """log N(x_{k+1}; μ_θ, std²) − log N(x_{k+1}; μ_base, std²) per sample (detached), for the step taken as
    x_{k+1} = μ_θ + std·z: KL_k + (μ_θ − μ_base)·z / std."""
    if std == 0.0:
        return kl.detach()
    return kl.detach() + ((mean_policy - mean_base).detach() * z).flatten(1).sum(1) / std


def rollout(
    policy: Denoiser,
    base: Denoiser,
    schedule: Schedule,
    x: Tensor,
    *,
    window: WindowSpec = None,
    generator: torch.Generator | None = None,
    checkpoint: bool = False,
    kl_backward: Callable[[Tensor], None] | None = None,
    local: Callable[[], ContextManager] | None = None,
    return_trajectory: bool = False,
    return_means: bool = False,
    on_step: Callable[[int, Tensor], Tensor | None] | None = None,
    compute_kl: bool = True,
    kl_sample: int | None = None,
    both: PairedDenoiser | None = None,
    frozen: Denoiser | None = None,
    inclusion: list[float] | None = None,
    base_in_backward: bool = False,
    params: tuple[Tensor, ...] = (),
) -> Rollout:
    """Run the N-step controlled chain from the start noise `x`.

    checkpoint: per-step activation checkpointing (non-reentrant) inside the window, so a long window
        costs memory for the states only.
    kl_backward: which KL terms carry gradient. None (default): only the window's, through the
        state and the predictions. Given a function, each step before the window also gets its KL's
        gradient with respect to the policy's parameters at once (x held fixed), by calling
        `kl_backward(kl_k)` (e.g. `lambda kl: accelerator.backward(alpha * kl.mean())`), so memory stays
        constant; the returned KL is then detached there, so the caller must not count it again.
    local: with `kl_backward`, entered around each such step's forward and backward to keep them local
        (DDP's `no_sync`): their gradients then reach the other processes with the window's backward, in one
        all-reduce per rollout instead of one per step. Not entered when the window is empty (K = 0), where
        no later backward would carry them.
    on_step: called after every step with (k, x_{k+1}); may return a replacement state (pipelines'
        `callback_on_step_end`).
    compute_kl: False skips the base's prediction on controlled steps (sampling only; KL returned as 0).
        Uncontrolled steps always use the base, so the samples are the same either way.
    return_trajectory / return_means: keep the states x_0 … x_N / the means μ_k each step took (detached).
    kl_sample: without `kl_backward`, the KL before the window carries no gradient and serves only the log. An int m
        calls the base on m of those n_before steps only: the steps split into m runs in order, one step drawn from
        each (from `generator`, after the chain, so its noise is the same either way), its KL and log-ratio scaled by
        its run's length (stratified Horvitz–Thompson), so Σ_k KL_k stays an unbiased estimate of the path KL for m
        base calls instead of n_before. None: every step (exact).
    both: the policy's and the base's predictions at one state in one model call (`control.paired_denoiser`, made for
        this `policy` and `base`): used wherever a step needs both; alone they are called apart. Ignored when `policy`
        is `base`.
    frozen: the policy with its weights held fixed (`control.frozen_denoiser`): the window's steps then also return
        `path_term` (one more model call each) in `Rollout.path_terms`, the loss's KL part for sticking the landing.
    inclusion: p_m, the chance of the m-th controlled step from the end to lie inside the window (m = 1 … N:
        `window_inclusion` of the spec K was drawn from). Each window step's parameter gradient is then scaled by 1/p_m
        and the gradient it passes back along the states left as it is: the full-chain gradient in expectation over
        K, at the random window's cost (DESIGN.md, "Random window"). Not with `kl_backward`, whose steps before the
        window already give their KL's direct gradient.
    base_in_backward: with `checkpoint`, each window step calls the base in the backward only: one model call less a
        step, the same gradient and numbers, but the window's KL_k and log-ratio columns read 0 until a backward through
        them has run (`Rollout.pending` of them), so a caller checks and logs them after it. A step whose KL gets no
        gradient keeps its 0. Not with `frozen`. With `params`, a window step is `_InBackward`: the first pass calls
        the policy alone, without a graph, and the backward makes the calls with graph, as one paired call with `both`
        or the base's and the policy's one after the other; without `params` the policy is checkpointed (torch's) and
        the base called in the backward apart (`_KLBaseInBackward`). benchmarks/README.md, "The base in the backward
        of a checkpointed window".
    params: with `base_in_backward`, the tensors with a gradient that the policy's prediction reads besides x (the
        adapter's weights): the window's backward gives gradients to these and x only, and raises if the prediction
        reads another tensor that needs one.
    """
    n = schedule.num_steps
    controlled = [k for k in range(n) if bool(schedule.controlled[k])]
    if inclusion is not None and kl_backward is not None:
        raise ValueError("inclusion scales the window's whole gradient, kl_backward the KL before it: not both")
    k_window = draw_window(window, len(controlled), generator)
    start = controlled[-k_window] if k_window > 0 else n
    if kl_sample is not None and kl_sample < 1:
        raise ValueError(f"kl_sample={kl_sample} must be >= 1 (or None: every step)")
    # the KL before the window, when only logged, may be left to a random subset of its steps, scored after the loop
    n_before = len([k for k in controlled if k < start])
    defer = kl_sample is not None and kl_backward is None and compute_kl and policy is not base and kl_sample < n_before
    deferred: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # k → (x_k, μ_k, z_k) of the steps not yet scored
    x = x.float()
    kls: list[Tensor] = []
    log_ratios: list[Tensor] = []
    trajectory = [x.detach()] if return_trajectory else None
    means: list[Tensor] | None = [] if return_means else None
    # checkpointing: each model call on its own (the paired call as one), so the backward recomputes one call at a
    # time, keeping only the states and predictions of the window
    late = None  # with base_in_backward: the window steps whose KL the backward will fill in
    if checkpoint:
        wrapped = _checkpointed(policy)
        paired = None if both is None else _checkpointed(both)
        if base_in_backward and policy is not base and frozen is None:  # one call less a step than the two passes
            late = _Late(base, policy, both, tuple(params))
            window_step = functools.partial(_step, wrapped, _checkpointed(base), both=paired, late=late)
        else:
            window_step = functools.partial(_step, wrapped, wrapped if base is policy else _checkpointed(base),
                                            both=paired, frozen=None if frozen is None else _checkpointed(frozen))
    else:
        window_step = functools.partial(_step, policy, base, both=both, frozen=frozen)
    terms: list[Tensor] = []
    for k in range(n):
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        if k >= start:
            step_fn = window_step
            if inclusion is not None and bool(schedule.controlled[k]):  # the m-th controlled step from the end
                step_fn = _reweighted(window_step, 1.0 / inclusion[len(controlled) - controlled.index(k) - 1])
            x, kl, log_ratio, mean, term = step_fn(schedule, k, x, z, compute_kl=compute_kl)
            terms.append(term)
        else:  # x is detached: a graph, if any, reaches the policy's parameters only (x held fixed)
            keep_local = local() if local is not None and kl_backward is not None and k_window > 0 else nullcontext()
            with keep_local, torch.set_grad_enabled(kl_backward is not None):
                x_k = x.detach()
                x, kl, log_ratio, mean, _ = _step(policy, base, schedule, k, x_k, z, compute_kl=compute_kl and not defer,
                                               both=both)
                if kl.requires_grad:  # deterministic steps carry no KL and no graph
                    kl_backward(kl)
            x, kl = x.detach(), kl.detach()
            if defer and bool(schedule.controlled[k]):
                deferred[k] = (x_k, mean.detach(), z)
        kls.append(kl)
        log_ratios.append(log_ratio)
        if means is not None:
            means.append(mean.detach())
        if on_step is not None:
            replaced = on_step(k, x)
            x = x if replaced is None else replaced
        if trajectory is not None:
            trajectory.append(x.detach())
    if defer:  # stratified Horvitz–Thompson: the n_before steps in m runs, one step of each, weighted by its run's size
        steps = sorted(deferred)
        device = generator.device if generator is not None else "cpu"
        with torch.no_grad():
            for run in torch.tensor_split(torch.arange(n_before), kl_sample):
                k = steps[int(run[torch.randint(len(run), (1,), generator=generator, device=device).cpu()])]
                x_k, mean, z = deferred[k]
                std = float(schedule.std[k])
                mean_base = transition_mean(schedule, k, x_k, base(x_k, schedule.timesteps[k]))
                kl = step_kl(mean, mean_base, std)
                kls[k], log_ratios[k] = len(run) * kl, len(run) * step_log_ratio(kl, mean, mean_base, z, std)
    kl_steps = 0 if not compute_kl or policy is base else len(controlled) - n_before + (kl_sample if defer else n_before)
    path_terms = None if frozen is None else torch.stack(kls[:start] + terms, dim=1)
    out = Rollout(x, torch.stack(kls, dim=1), k_window, trajectory, torch.stack(log_ratios, dim=1), means, kl_steps,
                  path_terms, 0 if late is None else len(late.steps))
    if late is not None:  # their columns hold 0 until the backward fills them in
        late.kl, late.log_ratio = out.kl.detach(), out.log_ratio
    return out


def _checkpointed(denoiser: Callable) -> Callable:
    """The denoiser under activation checkpointing (non-reentrant): its activations are recomputed in the backward."""

    def call(x: Tensor, t: Tensor):
        return _checkpoint(denoiser, x, t, use_reentrant=False)

    return call


def path_log_ratio(policy: Denoiser, schedule: Schedule, trajectory: list[Tensor], means: list[Tensor]) -> Tensor:
    """[B, N] log dP_policy/dP_sampler of each transition of paths already sampled (`trajectory` x_0 … x_N and the
    sampler's `means`, as `rollout(..., return_trajectory=True, return_means=True)` gives them): the policy's mean on
    the controlled steps, the sampler's elsewhere (uncontrolled steps are the base's in both processes)."""
    ratios = [trajectory[0].new_zeros(trajectory[0].shape[0])] * schedule.num_steps
    for k in range(schedule.num_steps):
        std = float(schedule.std[k])
        if bool(schedule.controlled[k]) and std > 0:
            x, mean = trajectory[k], means[k]
            mean_policy = transition_mean(schedule, k, x, policy(x, schedule.timesteps[k]))
            kl = step_kl(mean, mean_policy, std)  # the sampler's step against the policy's, at the sampler's noise
            ratios[k] = -step_log_ratio(kl, mean, mean_policy, (trajectory[k + 1] - mean) / std, std)
    return torch.stack(ratios, dim=1)


@torch.no_grad()
def sample(denoiser: Denoiser, schedule: Schedule, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The uncontrolled sampler (policy = base): x_N from the start noise."""
    return rollout(denoiser, denoiser, schedule, x, window=0, generator=generator).x
