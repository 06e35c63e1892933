"""The control engine: samplers equal diffusers', KL in nats, window gradients, the tilted-target anchor."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from sb_finetune.analytic import mixture_chain, objective_gap, three_blobs, with_nuisance
from sb_finetune.objective import soc_loss
from sb_finetune.rollout import draw_window, rollout, window_inclusion
from sb_finetune.sde import FlowSchedule, VPSchedule, make_schedule, step_kl, transition_mean


def toy_denoiser(x, t):
    """A smooth nonlinear stand-in model: depends on x and t, so gradients flow through its input."""
    return 0.5 * torch.tanh(x) + 0.1 * torch.sin(x.flip(-1)) + float(t) / 2000


# ----------------------------------------------------------------------------- 1. base sampler = diffusers


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
def test_vp_eta1_equals_diffusers_ddim(prediction_type, clip):
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=clip,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    s = make_schedule(sched, 10, eta=1.0)
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    ours, ref = x.clone(), x.clone()
    g = torch.Generator().manual_seed(1)
    for k, t in enumerate(sched.timesteps):
        z = torch.randn(x.shape, generator=g)
        # with clip_sample we re-derive ε̂ from the clipped x̂0 (as DDPM does): diffusers' use_clipped_model_output
        ref = sched.step(toy_denoiser(ref, t), t, ref, eta=1.0, variance_noise=z, use_clipped_model_output=True).prev_sample
        ours = transition_mean(s, k, ours, toy_denoiser(ours, t)) + float(s.std[k]) * z
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_vp_rollout_equals_diffusers_ddpm():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    s = make_schedule(sched, 20)
    assert float(s.std[-1]) == 0.0 and bool((s.std[:-1] > 0).all())  # t = 0 → ᾱ = 1: deterministic last step
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = rollout(toy_denoiser, toy_denoiser, s, x, window=0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    ref = x.clone()
    for t in sched.timesteps:
        z = torch.randn(x.shape, generator=g)  # the rollout draws one z per step, used or not
        out = sched.step(toy_denoiser(ref, t), t, ref).pred_original_sample
        prev = sched.previous_timestep(t)
        a_s = sched.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        a_t = sched.alphas_cumprod[t]
        # DDPM posterior: mean coefficients and fixed_small variance, noise z
        beta = 1 - a_t / a_s
        mean = (a_s.sqrt() * beta / (1 - a_t)) * out + ((1 - beta).sqrt() * (1 - a_s) / (1 - a_t)) * ref
        ref = mean + ((1 - a_s) / (1 - a_t) * beta).sqrt() * z if t > 0 else mean
    torch.testing.assert_close(ours.x, ref, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(ours.kl) == 0


@pytest.mark.parametrize("method", ["posterior", "euler_maruyama"])
def test_flow_eta0_equals_diffusers_euler(method):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s = make_schedule(sched, 8, eta=0.0, flow_method=method)
    assert float(s.sigmas[0]) == 1.0 and float(s.sigmas[-1]) == 0.0
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    ours, ref = x.clone(), x.clone()
    for k, t in enumerate(sched.timesteps):
        ref = sched.step(toy_denoiser(ref, t), t, ref).prev_sample
        ours = transition_mean(s, k, ours, toy_denoiser(ours, t))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["posterior", "euler_maruyama"])
def test_flow_zero_control_keeps_the_mixture_marginals(method):
    gmm = three_blobs()
    s, denoiser = mixture_chain("flow", 50, flow_method=method)
    base = denoiser(gmm)
    g = torch.Generator().manual_seed(0)
    out = rollout(base, base, s, torch.randn(20000, 2, generator=g), window=0, generator=g, return_trajectory=True)
    mean0 = (gmm.weights[:, None] * gmm.means).sum(0)
    second = (gmm.weights[:, None, None] * (gmm.covs + gmm.means[:, :, None] * gmm.means[:, None, :])).sum(0)
    for k in (10, 25, 40, 50):  # x at σ_k ~ (1−σ) x0 + σ ε: mean (1−σ) m̄, covariance (1−σ)² Cov(x0) + σ² I
        sigma = float(s.sigmas[k])
        x = out.trajectory[k].double()
        cov = (1 - sigma) ** 2 * (second - mean0[:, None] * mean0[None]) + sigma**2 * torch.eye(2, dtype=torch.float64)
        assert torch.allclose(x.mean(0), (1 - sigma) * mean0, atol=0.05), k
        # the 50-step chain's own O(1/N) error is ≤ 0.11 here (0.03 at N = 200); a wrong std scale is O(1)
        assert torch.allclose(torch.cov(x.T), cov, atol=0.15), k
    weights, _ = gmm.fit_stats(out.x)
    assert torch.allclose(weights, gmm.weights, atol=0.02)
    assert torch.count_nonzero(out.kl) == 0


# ----------------------------------------------------------------------------- 2. KL in nats, by hand


def test_vp_step_kl_by_hand():
    # ᾱ_t = 0.5 → ᾱ_s = 0.8. η = 1: σ² = (0.2/0.5)(1 − 0.625) = 0.15; Δμ = (−sqrt(0.8) + sqrt(0.05)) Δε, Δμ² = 0.45
    s = VPSchedule(torch.tensor([500]), torch.tensor([0.5, 0.8], dtype=torch.float64), eta=1.0)
    assert math.isclose(float(s.std[0]) ** 2, 0.15, rel_tol=1e-6)
    x = torch.zeros(1, 2)
    eps_b, eps_p = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    kl = step_kl(transition_mean(s, 0, x, eps_p), transition_mean(s, 0, x, eps_b), float(s.std[0]))
    assert math.isclose(float(kl), 0.45 / (2 * 0.15), rel_tol=1e-5)  # 1.5 nats
    # η = 0.5: σ² = 0.0375, Δμ = (−sqrt(0.8) + sqrt(1 − 0.8 − 0.0375))
    s = VPSchedule(torch.tensor([500]), torch.tensor([0.5, 0.8], dtype=torch.float64), eta=0.5)
    kl = step_kl(transition_mean(s, 0, x, eps_p), transition_mean(s, 0, x, eps_b), float(s.std[0]))
    coef = -math.sqrt(0.8) + math.sqrt(1 - 0.8 - 0.0375)
    assert math.isclose(float(kl), coef**2 / (2 * 0.0375), rel_tol=1e-5)  # 3.2185 nats


@pytest.mark.parametrize("eta, expected", [(1.0, 0.1), (0.5, 0.15625)])
def test_flow_em_step_kl_by_hand(eta, expected):
    # σ: 0.5 → 0.4, h = 0.1, c = η²; KL = h (1+c)² ||Δv||² (1−σ) / (4 c σ)
    s = FlowSchedule(torch.tensor([500.0]), torch.tensor([0.5, 0.4], dtype=torch.float64), eta, "euler_maruyama")
    x = torch.randn(1, 2)
    kl = step_kl(transition_mean(s, 0, x, torch.tensor([[1.0, 0.0]])), transition_mean(s, 0, x, torch.zeros(1, 2)), float(s.std[0]))
    assert math.isclose(float(kl), expected, rel_tol=1e-5)
    assert math.isclose(float(s.std[0]) ** 2, 0.1 * eta**2 * 2 * 0.5 / 0.5, rel_tol=1e-6)  # h g², g² = c·2σ/(1−σ)


def test_flow_posterior_step_kl_by_hand():
    st, ss = 0.6, 0.3
    rho2 = ss**2 * (1 - ((1 - st) * ss / ((1 - ss) * st)) ** 2)
    coef = -(1 - ss) * st + math.sqrt(ss**2 - rho2) * (1 - st)  # μ's coefficient on v̂
    s = FlowSchedule(torch.tensor([600.0]), torch.tensor([st, ss], dtype=torch.float64), 1.0, "posterior")
    x = torch.randn(1, 3)
    dv = torch.tensor([[0.3, -0.2, 0.5]])
    kl = step_kl(transition_mean(s, 0, x, dv), transition_mean(s, 0, x, torch.zeros(1, 3)), float(s.std[0]))
    assert math.isclose(float(kl), coef**2 * 0.38 / (2 * rho2), rel_tol=1e-5)


def test_rollout_kl_is_the_sum_of_step_kls_with_a_constant_offset():
    s = make_schedule(FlowMatchEulerDiscreteScheduler(shift=1.0), 10, flow_method="euler_maruyama")
    out = rollout(lambda x, t: toy_denoiser(x, t) + 0.1, toy_denoiser, s, torch.randn(5, 2), window=0)
    sig = s.sigmas.double()
    h = sig[:-1] - sig[1:]
    expected = torch.where(sig[:-1] < 1, h * 4 * 0.01 * 2 * (1 - sig[:-1]) / (4 * sig[:-1]), torch.nan)
    # every EM step: KL = h (1+1)² ||0.1·1||² (1−σ)/(4σ) for 2 coordinates; the σ = 1 step is a posterior step
    assert torch.allclose(out.kl[:, 1:].double(), expected[1:].expand(5, -1), rtol=1e-3)
    assert (out.kl[:, 0] > 0).all()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_steep_posterior_step_onto_the_data_is_uncontrolled(shift):
    """Diffusers' flow grid ends σ ≈ 1/N → σ_min → 0. The posterior step onto σ_min prices a change of x̂0 at
    1/(2σ_min²) per unit: the exact control would pay 0.056 nats there, over 100× the continuum's cost over that
    interval. It is sampled with the base's mean and its own noise, free; the EM step there is fine."""
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    post = make_schedule(sched, 50, flow_method="posterior")
    assert post.controlled.tolist() == [True] * 48 + [False, False] and float(post.std[48]) > 0
    assert bool(make_schedule(sched, 50, flow_method="euler_maruyama").controlled.all())
    # VP keeps every stochastic step controlled, even "leading"'s steep t = 20 → 0 (stock DDPM/DDIM + LoRA agree)
    assert make_schedule(DDPMScheduler(timestep_spacing="leading"), 50).controlled.tolist() == [True] * 49 + [False]
    policy = lambda x, t: toy_denoiser(x, t) + 0.3  # noqa: E731
    x0 = torch.randn(4, 2)
    out = rollout(policy, toy_denoiser, post, x0, window=0, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(4, 2, generator=g) for _ in range(50)]
    x = out.trajectory[48]
    expected = transition_mean(post, 48, x, toy_denoiser(x, post.timesteps[48])) + float(post.std[48]) * zs[48]
    torch.testing.assert_close(out.trajectory[49], expected)
    assert (out.kl[:, :48] > 0).all() and (out.kl[:, 48:] == 0).all() and (out.log_ratio[:, 48:] == 0).all()


# ----------------------------------------------------------------------------- 3. window gradients


class PerStepControl(torch.nn.Module):
    """policy = base + u_k: one parameter vector per step, so a step's gradient is visible on its own."""

    def __init__(self, schedule, dim):
        super().__init__()
        self.index = {float(t): k for k, t in enumerate(schedule.timesteps)}
        self.u = torch.nn.Parameter(0.05 * torch.randn(schedule.num_steps, dim, generator=torch.Generator().manual_seed(3)))

    def forward(self, x, t):
        return toy_denoiser(x, t) + self.u[self.index[float(t)]]


def vp_reference_loss(control, s, x, zs, alpha):
    """The whole chain with plain autograd, written out from DESIGN.md (ε-prediction)."""
    kl = 0.0
    for k in range(s.num_steps):
        t, a_t, a_s = s.timesteps[k], float(s.alpha_bar[k]), float(s.alpha_bar[k + 1])
        var = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)

        def mean(eps):
            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            return math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - var) * eps

        mu, mu_b = mean(control(x, t)), mean(toy_denoiser(x, t))
        if var == 0:
            x = mu_b
            continue
        kl = kl + (mu - mu_b).pow(2).sum(1) / (2 * var)
        x = mu + math.sqrt(var) * zs[k]
    return (alpha * kl - x.sum(1)).mean()


def _vp_setup(n=12):
    sched = DDPMScheduler(clip_sample=False)
    return make_schedule(sched, n)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_full_window_gradient_equals_plain_autograd(checkpoint):
    s = _vp_setup()
    control = PerStepControl(s, 2)
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    out = rollout(control, toy_denoiser, s, x0, window=s.num_steps, generator=torch.Generator().manual_seed(1), checkpoint=checkpoint)
    soc_loss(out.x.sum(1), out.kl, alpha=0.7).loss.backward()
    ours = control.u.grad.clone()
    g = torch.Generator().manual_seed(1)
    zs = [torch.randn(x0.shape, generator=g) for _ in range(s.num_steps)]
    control.u.grad = None
    vp_reference_loss(control, s, x0, zs, alpha=0.7).backward()
    torch.testing.assert_close(ours, control.u.grad, atol=1e-5, rtol=1e-4)


class LinearBase(torch.nn.Module):
    """toy_denoiser plus a linear layer: under CPU autocast its output is bf16, so the precision a call ran in shows."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        torch.nn.init.normal_(self.lin.weight, generator=torch.Generator().manual_seed(4))
        torch.nn.init.normal_(self.lin.bias, generator=torch.Generator().manual_seed(5))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return toy_denoiser(x, t) + 0.3 * self.lin(x)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("k_window, unbiased", [(1, False), (5, False), (11, False), (5, True)])
def test_the_base_called_in_the_backward_gives_a_checkpointed_window_its_numbers_with_one_call_less(k_window, unbiased,
                                                                                                  autocast):
    """`base_in_backward`: the window's KL, log-ratio, parameter and state gradients are the checkpointed window's
    (and under autocast the base runs in the forward's precision), the base is called once a window step instead of
    twice, and before the backward the window's KL columns read 0 (`pending`)."""
    s = _vp_setup()
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    inclusion = window_inclusion(None, 11) if unbiased else None

    def run(late, cast=autocast):
        base = LinearBase()
        control = PerStepControl(s, 2)
        policy = lambda x, t: control(x, t) + 0.3 * base.lin(x)  # noqa: E731
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            out = rollout(policy, base, s, x, window=k_window, generator=torch.Generator().manual_seed(1), checkpoint=True,
                          base_in_backward=late, inclusion=inclusion, kl_sample=2)
            before, calls = out.kl.detach().clone(), base.calls
            soc_loss(out.x.pow(2).sum(1), out.kl, alpha=0.7).loss.backward()
        return out, before, calls, base.calls - calls, control.u.grad, x.grad

    plain, late = run(False), run(True)
    start = 11 - k_window
    assert plain[0].pending == 0 and late[0].pending == k_window
    assert (late[1][:, start:11] == 0).all() and (plain[1][:, start:11] > 0).all()  # filled by the backward only
    torch.testing.assert_close(late[1][:, :start], plain[1][:, :start])  # the KL logged before the window
    torch.testing.assert_close(late[0].kl, plain[0].kl, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(late[0].log_ratio, plain[0].log_ratio, atol=1e-6, rtol=1e-5)
    for a, b in zip(plain[4:], late[4:]):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.abs().sum() > 0
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    # base calls: the first pass makes the logged steps' (2 of those before the window) and the window's (its K
    # controlled steps and the last, uncontrolled one), the backward recomputes the window's; with the base in the
    # backward the K controlled steps' first-pass calls go
    logged = min(2, start)
    assert plain[2] == logged + k_window + 1 and late[2] == logged + 1 and plain[3] == late[3] == k_window + 1
    if autocast:  # the base's backward call ran in bf16 as the forward's did: fp32 would differ
        assert (run(True, cast=False)[0].kl - late[0].kl).abs().max() > 1e-4


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("k_window, unbiased", [(1, False), (6, False), (11, True)])
def test_a_checkpointed_window_with_params_calls_the_policy_without_graph_then_its_calls_with_graph_in_the_backward(
        k_window, unbiased, autocast):
    """`base_in_backward` with `params` (`_InBackward`): the first pass calls the policy alone, without a graph, and no
    base in the window; the backward makes one paired call a window step with `both`, else the base's call and the
    policy's; the KL, log-ratio and the adapter's and the state's gradients are those of the window whose policy is
    checkpointed by torch (under autocast too, whose precision the backward keeps)."""
    s = _vp_setup()
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    inclusion = window_inclusion(None, 11) if unbiased else None

    def run(way, cast=autocast):  # "torch": no params (torch's checkpoint, `_KLBaseInBackward`); "apart"; "paired"
        base = LinearBase().requires_grad_(False)  # the base's weights frozen; the adapter (control.u) is the policy's
        control = PerStepControl(s, 2)
        calls = {"policy": [], "both": []}  # grad mode of each call

        def policy(x, t):
            calls["policy"].append(torch.is_grad_enabled())
            return control(x, t) + 0.3 * base.lin(x)

        def both(x, t):
            calls["both"].append(torch.is_grad_enabled())
            return control(x, t) + 0.3 * base.lin(x), base(x, t)

        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            out = rollout(policy, base, s, x, window=k_window, generator=torch.Generator().manual_seed(1),
                          checkpoint=True, base_in_backward=True, inclusion=inclusion, kl_sample=2,
                          both=both if way == "paired" else None, params=() if way == "torch" else (control.u,))
            first = {"base": base.calls, **{k: list(v) for k, v in calls.items()}}
            soc_loss(out.x.pow(2).sum(1), out.kl, alpha=0.7).loss.backward()
        return out, first, calls, base.calls, control.u.grad, x.grad

    ref = run("torch")
    logged = min(2, 11 - k_window)
    for way in ("apart", "paired"):
        ours = run(way)
        assert ours[0].pending == ref[0].pending == k_window
        torch.testing.assert_close(ours[0].kl, ref[0].kl, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours[0].log_ratio, ref[0].log_ratio, atol=1e-6, rtol=1e-5)
        for a, b in zip(ref[4:], ours[4:]):  # the adapter's; x_0's where the window reaches it
            assert (a is None) == (b is None) and (a is not None or k_window < 11)
            if a is not None:
                # bf16: the paired call's two halves share autocast's cast of x_k, so their gradients to it are summed
                # in bf16 before the cast back, where two calls sum them in fp32 (a rounding of the order of 1e-3)
                assert a.abs().sum() > 0
                torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-2 if autocast and way == "paired" else 1e-5)
        first, calls, base_calls = ours[1:4]
        # first pass: every controlled step's policy call without a graph, no paired call, the base only for the
        # logged steps and the uncontrolled last step; the backward, a window step: one paired call with graph, or the
        # base's and the policy's; and the last step's checkpointed base
        assert first["policy"] == [False] * 11 and first["both"] == [] and first["base"] == logged + 1
        if way == "paired":
            assert calls["policy"] == first["policy"] and calls["both"] == [True] * k_window
        else:
            assert calls["policy"] == first["policy"] + [True] * k_window and calls["both"] == []
        assert base_calls - first["base"] == k_window + 1
        if autocast:  # the backward's calls ran in bf16 as the forward's did: fp32 would differ
            assert (run(way, cast=False)[0].kl - ours[0].kl).abs().max() > 1e-4


@pytest.mark.parametrize("paired", [True, False])
def test_the_window_backward_refuses_a_policy_that_reads_a_weight_missing_from_params(paired):
    """A tensor the policy reads that needs a gradient but is not in `params` would get none from `_InBackward`: it
    raises instead, naming `params`, paired or apart."""
    s = _vp_setup()
    base = LinearBase()  # its weights need a gradient, and the policy reads them
    control = PerStepControl(s, 2)
    policy = lambda x, t: control(x, t) + 0.3 * base.lin(x)  # noqa: E731
    out = rollout(policy, base, s, torch.randn(4, 2), window=3, generator=torch.Generator().manual_seed(1),
                  checkpoint=True, base_in_backward=True, both=(lambda x, t: (policy(x, t), base(x, t))) if paired else None,
                  params=(control.u,))
    with pytest.raises(ValueError, match="not in rollout's `params`"):
        out.kl.sum().backward()


def test_gradient_flows_through_the_base_prediction_inside_the_window():
    s = _vp_setup()
    x0 = torch.randn(4, 2, requires_grad=True)
    out = rollout(toy_denoiser, toy_denoiser, s, x0, window=s.num_steps)
    out.x.sum().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0


@pytest.mark.parametrize("k_window", [1, 4, 7])
def test_no_gradient_reaches_steps_before_the_window(k_window):
    s = _vp_setup()
    control = PerStepControl(s, 2)
    out = rollout(control, toy_denoiser, s, torch.randn(5, 2), window=k_window)
    assert out.window == k_window
    soc_loss(out.x.sum(1), out.kl, alpha=1.0).loss.backward()
    assert s.controlled.tolist() == [True] * 11 + [False]  # the deterministic last step (t = 0 → ᾱ = 1)
    start = 11 - k_window  # the window is the last K controlled steps
    grad = control.u.grad.abs().sum(1)
    assert torch.all(grad[:start] == 0)
    assert torch.all(grad[start:11] > 0)
    assert grad[11] == 0


def test_kl_backward_gives_outside_window_steps_their_kl_gradient():
    s = _vp_setup()
    control = PerStepControl(s, 2)
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    out = rollout(control, toy_denoiser, s, x0, window=0, generator=torch.Generator().manual_seed(2),
                  kl_backward=lambda kl: kl.mean().backward(), return_trajectory=True)
    assert not out.kl.requires_grad
    ours = control.u.grad.clone()
    control.u.grad = None  # reference: Σ_k KL_k at the visited states, states held fixed
    total = 0.0
    for k in range(s.num_steps):
        x, t, std = out.trajectory[k], s.timesteps[k], float(s.std[k])
        if not bool(s.controlled[k]):
            continue
        total = total + step_kl(transition_mean(s, k, x, control(x, t)), transition_mean(s, k, x, toy_denoiser(x, t)), std).mean()
    total.backward()
    torch.testing.assert_close(ours, control.u.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k_window", [0, 3])
def test_local_context_wraps_each_outside_window_backward_when_a_window_follows(k_window):
    """`local` (DDP's no_sync in the trainer) keeps the per-step KL backwards local; the window's backward then
    reduces them. With an empty window nothing would, so it must not be entered."""
    from contextlib import contextmanager

    s = _vp_setup()
    state = {"inside": False, "entered": 0, "calls_inside": [], "forward_inside": []}

    @contextmanager
    def local():
        state["inside"], state["entered"] = True, state["entered"] + 1
        yield
        state["inside"] = False

    control = PerStepControl(s, 2)

    def policy(x, t):
        state["forward_inside"].append(state["inside"])
        return control(x, t)

    rollout(policy, toy_denoiser, s, torch.randn(3, 2), window=k_window,
            kl_backward=lambda kl: state["calls_inside"].append(state["inside"]) or kl.mean().backward(), local=local)
    before = 11 - k_window  # controlled steps before the window, each with a KL backward
    assert len(state["calls_inside"]) == before
    assert state["entered"] == (before if k_window else 0) and all(state["calls_inside"]) == bool(k_window)
    assert state["forward_inside"] == [bool(k_window)] * before + [False] * (len(state["forward_inside"]) - before)


def test_kl_log_steps_scores_a_few_steps_before_the_window_unbiased_and_leaves_the_gradient_alone():
    """kl_sample=m: before the window (KL only logged) the base scores m steps, one per run of steps, reweighted by the
    run's length; the chain's noise, the window's KL and the gradient are the ones of the exact rollout."""
    s = _vp_setup()  # 11 controlled steps and a deterministic last one
    control = PerStepControl(s, 2)  # policy − base = u_k: each step's KL is the same at every state
    calls = []

    def base(x, t):
        calls.append(float(t))
        return toy_denoiser(x, t)

    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    exact = rollout(control, base, s, x0, window=3, generator=torch.Generator().manual_seed(1))
    assert len(calls) == 12 and exact.kl_steps == 11
    soc_loss(exact.x.sum(1), exact.kl, alpha=1.0).loss.backward()
    grad, control.u.grad = control.u.grad.clone(), None
    calls.clear()
    first = rollout(control, base, s, x0, window=3, generator=torch.Generator().manual_seed(1), kl_sample=2)
    assert len(calls) == 3 + 2 + 1 and first.kl_steps == 5  # window, the two sampled, the uncontrolled last step
    torch.testing.assert_close(first.x, exact.x, rtol=0, atol=0)  # same noise, same chain
    torch.testing.assert_close(first.kl[:, 8:], exact.kl[:, 8:], rtol=0, atol=0)
    assert ((first.kl[:, :8] != 0).sum(1) == 2).all()  # one step of 0–3 and one of 4–7, each counted 4 times
    assert ((first.kl[:, :4] != 0).sum(1) == 1).all() and ((first.log_ratio[:, :8] != 0).sum(1) == 2).all()
    soc_loss(first.x.sum(1), first.kl, alpha=1.0).loss.backward()
    torch.testing.assert_close(control.u.grad, grad, rtol=0, atol=0)
    draws = torch.stack([rollout(control, base, s, x0, window=3, generator=torch.Generator().manual_seed(i), kl_sample=2)
                         .kl.sum(1) for i in range(400)])
    torch.testing.assert_close(draws.mean(0).detach(), exact.kl.sum(1).detach(), rtol=0.03, atol=0)
    assert draws.std(0).max() > 0.05 * exact.kl.sum(1).min()  # estimates, not the exact sum every time
    with pytest.raises(ValueError, match="kl_sample=0"):
        rollout(control, base, s, x0, window=3, kl_sample=0)


def test_window_draws_cover_the_range():
    g = torch.Generator().manual_seed(0)
    draws = {draw_window(None, 10, g) for _ in range(400)}
    assert draws == set(range(1, 11))
    assert {draw_window((3, 5), 10, g) for _ in range(100)} == {3, 4, 5}
    assert draw_window(4, 10) == 4
    assert draw_window((5, 1000), 10, g) in range(5, 11)  # K_max past the chain means the full chain
    with pytest.raises(ValueError, match="window"):
        draw_window((6, 5), 10)


def test_window_inclusion_is_the_chance_of_each_step_to_lie_inside_the_window():
    g = torch.Generator().manual_seed(0)
    for spec in (None, (3, 7), 4, (2, 1000)):
        p = window_inclusion(spec, 9)
        draws = [draw_window(spec, 9, g) for _ in range(4000)]
        seen = [sum(k >= m for k in draws) / len(draws) for m in range(1, 10)]  # m-th controlled step from the end
        assert max(abs(a - b) for a, b in zip(p, seen)) < 0.03, (spec, p, seen)
    assert window_inclusion(None, 4) == [1.0, 0.75, 0.5, 0.25]
    assert window_inclusion((2, 3), 4) == [1.0, 1.0, 0.5, 0.0]  # past K_max: never inside, no reweighting reaches it


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("spec", [None, (4, 11)])
def test_unbiased_window_averages_to_the_full_chain_gradient_and_leaves_the_state_gradient_alone(spec, checkpoint):
    """Over the window's draws K, the reweighted gradient (step j scaled by 1/p_j) is exactly the full chain's, where
    the plain window's is Σ_j p_j g_j; each draw scales step j's own gradient by 1/p_j and nothing else."""
    s = _vp_setup()
    n = int(s.controlled.sum())
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))

    def grads(k_window, inclusion):
        control = PerStepControl(s, 2)
        x = x0.clone().requires_grad_(True)
        out = rollout(control, toy_denoiser, s, x, window=k_window, generator=torch.Generator().manual_seed(1),
                      checkpoint=checkpoint, inclusion=inclusion)
        soc_loss(out.x.pow(2).sum(1), out.kl, alpha=0.7).loss.backward()
        return control.u.grad, x.grad

    p = window_inclusion(spec, n)
    lo, hi = (1, n) if spec is None else spec
    full, _ = grads(n, None)
    plain = [grads(k, None) for k in range(lo, hi + 1)]
    weighted = [grads(k, p) for k in range(lo, hi + 1)]
    mean = sum(u for u, _ in weighted) / len(weighted)
    torch.testing.assert_close(mean, full, atol=1e-6, rtol=1e-5)
    plain_mean = sum(u for u, _ in plain) / len(plain)
    assert (plain_mean - full).abs().max() > 0.1 * full.abs().max()  # the plain window is not the full gradient
    by_end = torch.tensor(p[::-1] + [1.0]).unsqueeze(1)  # p of each step in chain order; the last step is uncontrolled
    for (u, xg), (u_w, xg_w) in zip(plain, weighted):
        torch.testing.assert_close(u_w, u / by_end, atol=1e-6, rtol=1e-5)
        assert (xg is None) == (xg_w is None)  # x_0 has a gradient when the window spans the chain (K = n)
        if xg is not None:
            torch.testing.assert_close(xg_w, xg, atol=1e-6, rtol=1e-5)  # what flows back along the states is unchanged
    assert weighted[-1][1] is not None


# ----------------------------------------------------------------------------- 4. the tilted target

A = torch.tensor([0.5, 0.5], dtype=torch.float64)  # strong tilt: weights move by 0.39, KL* = 0.41 nats
A_MILD = torch.tensor([0.2, 0.2], dtype=torch.float64)  # weights move by 0.20, KL* = 0.094 nats
ALPHA = 1.0
FAMILIES = [("vp", None), ("flow", "posterior"), ("flow", "euler_maruyama")]


def _gmm_chain(family, n_steps, a=A, method=None):
    """(base mixture, tilted target, schedule, exact control = the target's own prediction, base prediction)."""
    gmm = three_blobs()
    target = gmm.tilted(a, ALPHA)
    s, denoiser = mixture_chain(family, n_steps, flow_method=method or "posterior")
    return gmm, target, s, denoiser(target), denoiser(gmm)


def _exact_control_run(family, n_steps, n_samples, method=None, a=A):
    """Roll the exact control out; (target, weights, means, objective − (−alpha·log Z), its standard error),
    the objective estimated path by path (`objective_gap`)."""
    gmm, target, s, policy, base = _gmm_chain(family, n_steps, a, method)
    g = torch.Generator().manual_seed(0)
    out = rollout(policy, base, s, torch.randn(n_samples, 2, generator=g), window=0, generator=g)
    weights, means = target.fit_stats(out.x)
    return target, weights, means, *objective_gap(out, gmm, a, ALPHA)


@pytest.mark.parametrize("family, method", FAMILIES)
def test_exact_control_lands_on_the_tilted_target(family, method):
    """50 steps, 8,000 samples: weights within 0.02, means within 0.1, objective within 0.02 of −alpha·log Z.

    The tilt moves the weights by 0.20 and prices at KL* = 0.094 nats, so a KL off by a factor 2 (0.09) or a
    sampler that does not reach the target (weights) would miss. The objective gap is measured at 0.011 (VP), 0.012 (flow posterior), 0.004
    (flow EM); it is the 50-step chain's, O(1/N): about 0.15 KL* on VP (see the next test)."""
    target, weights, means, gap, se = _exact_control_run(family, 50, 8000, method, a=A_MILD)
    assert (weights - target.weights).abs().max() < 0.02
    assert (means - target.means).norm(dim=1).max() < 0.1
    assert se < 0.002 and -3 * se < gap < 0.02  # ≥ −alpha·log Z up to noise (data processing)


@pytest.mark.parametrize("family, method", FAMILIES)
def test_objective_gap_vanishes_with_steps(family, method):
    """Strong tilt (KL* = 0.41): plugging the continuum-optimal control into a 50-step chain overpays an O(1/N)
    KL (measured 0.064 VP, 0.043 flow posterior, 0.018 flow EM); at N = 200 the gap is under 0.02 and at least 3×
    smaller. A KL off by a factor 2 would miss by 0.4."""
    target, _, _, gap50, _ = _exact_control_run(family, 50, 8000, method)
    _, weights, means, gap200, se = _exact_control_run(family, 200, 8000, method)
    assert -3 * se < gap200 < 0.02 and gap200 < gap50 / 3 and gap50 < 0.08
    assert (weights - target.weights).abs().max() < 0.02
    assert (means - target.means).norm(dim=1).max() < 0.05


@pytest.mark.parametrize("family, method", [("vp", None), ("flow", "posterior")])
def test_pathwise_log_ratio_is_the_path_density_ratio(family, method):
    """log_ratio is log dP_θ/dP_base of the sampled transitions: its mean is the KL's, and reweighting the
    controlled paths by exp(R/alpha − Σ log_ratio) gives E_base[exp(R/alpha)] (same estimate from base paths)."""
    gmm, _, s, policy, base = _gmm_chain(family, 50, A, method)
    n = 20000
    g = torch.Generator().manual_seed(0)
    out = rollout(policy, base, s, torch.randn(n, 2, generator=g), window=0, generator=g)
    lr, kl = out.log_ratio.sum(1).double(), out.kl.sum(1).double()
    assert abs(float(lr.mean() - kl.mean())) < 4 * float((lr - kl).std()) / n**0.5
    g = torch.Generator().manual_seed(1)
    x_base = rollout(base, base, s, torch.randn(n, 2, generator=g), window=0, generator=g).x.double()
    log_z_base = float(torch.logsumexp(x_base @ A / ALPHA, 0)) - math.log(n)
    log_z_is = float(torch.logsumexp(out.x.double() @ A / ALPHA - lr, 0)) - math.log(n)
    assert abs(log_z_is - log_z_base) < 0.03
    # near the optimum alpha·Σ log_ratio − R is nearly constant along paths (std 0.2–0.3 here), alpha·Σ KL − R is not (0.9)
    assert float((ALPHA * lr - out.x.double() @ A).std()) < 0.4 * float((ALPHA * kl - out.x.double() @ A).std())


@pytest.mark.parametrize("family, method", [("vp", None), ("flow", "posterior")])
def test_path_log_ratio_scores_paths_of_one_process_against_another(family, method):
    """Base paths scored against the exact control: exp(Σ log dP_θ/dP_base) reweights them into the control's paths
    (mean 1; the control's mean endpoint). The flow chain's steep step is uncontrolled: it must add nothing."""
    from sb_finetune.rollout import path_log_ratio

    _, _, s, policy, base = _gmm_chain(family, 50, A, method)
    g = torch.Generator().manual_seed(0)
    out = rollout(base, base, s, torch.randn(20000, 2, generator=g), window=0, generator=g, return_trajectory=True,
                  return_means=True)
    ratio = path_log_ratio(policy, s, out.trajectory, out.means)
    assert (ratio[:, ~s.controlled] == 0).all()
    w = ratio.sum(1).double().exp()
    assert abs(float(w.mean()) - 1) < 0.03
    controlled = rollout(policy, base, s, torch.randn(20000, 2, generator=g), window=0, generator=g).x.double()
    reweighted = (w[:, None] * out.x.double()).sum(0) / w.sum()
    assert torch.allclose(reweighted, controlled.mean(0), atol=0.04), (reweighted, controlled.mean(0))
    assert (reweighted - out.x.double().mean(0)).norm() > 0.3  # the tilt moves the mean: the check has teeth


def test_non_memoryless_sampler_misses_the_target():
    """Same exact control, low noise (η = 0.2): the optimum is biased and the KL price is far off."""
    gmm = three_blobs()
    s, denoiser = mixture_chain("vp", 50, eta=0.2)
    g = torch.Generator().manual_seed(0)
    out = rollout(denoiser(gmm.tilted(A, ALPHA)), denoiser(gmm), s, torch.randn(5000, 2, generator=g), window=0, generator=g)
    assert objective_gap(out, gmm, A, ALPHA)[0] > 0.5


# ----------------------------------------------------------------------------- 5. training with the engine


@pytest.mark.parametrize("family", ["vp", "flow"])
def test_training_moves_the_weights_half_way_to_the_target(family):
    from sb_finetune.analytic import MLPControl, fit_control

    torch.manual_seed(0)
    gmm = three_blobs()
    target = gmm.tilted(A, ALPHA)
    s, denoiser = mixture_chain(family, 20, flow_method="euler_maruyama")
    base = denoiser(gmm)
    control = MLPControl(base)
    history = fit_control(control, s, lambda x: x @ A.float(), ALPHA, iterations=300, batch=256, lr=1e-2)
    with torch.no_grad():
        out = rollout(control, base, s, torch.randn(4000, 2, generator=torch.Generator().manual_seed(9)), window=0)
    weights, _ = target.fit_stats(out.x)
    tv = lambda w: 0.5 * float((w - target.weights).abs().sum())  # noqa: E731
    assert tv(weights) <= 0.5 * tv(gmm.weights), (weights, target.weights)
    assert sum(history[-20:]) / 20 < sum(history[:20]) / 20 - 0.2  # the objective went down


def test_kl_only_objective_returns_a_perturbed_control_to_the_base():
    from sb_finetune.analytic import MLPControl, fit_control

    torch.manual_seed(0)
    gmm = three_blobs()
    s, denoiser = mixture_chain("flow", 20, flow_method="euler_maruyama")
    base = denoiser(gmm)
    control = MLPControl(base)
    torch.nn.init.normal_(control.net[-1].weight, std=0.5)
    torch.nn.init.normal_(control.net[-1].bias, std=0.5)
    history = fit_control(control, s, lambda x: torch.zeros(x.shape[0]), 1.0, iterations=120, batch=128, lr=1e-2)
    assert history[0] > 0.5
    assert sum(history[-10:]) / 10 < 0.03 * history[0]


def test_tilted_optimum_from_base_samples_matches_the_closed_form():
    """The summary's reference point: from base samples alone, log Z, E_p*[R] and KL(p* || p) of the tilted optimum."""
    from sb_finetune.objective import tilted_optimum

    gmm = three_blobs()
    x = gmm.sample(40000, torch.Generator().manual_seed(3))
    for alpha in (1.0, 0.5):
        best = tilted_optimum(x @ A, alpha)
        target = gmm.tilted(A, alpha)
        reward_star = float(target.weights @ (target.means @ A))  # E_p*[aᵀx]
        log_z = gmm.log_z(A, alpha)
        assert abs(best.log_z - log_z) < 0.02 and abs(best.objective + alpha * log_z) < 0.02
        assert abs(best.reward_mean - reward_star) < 0.04
        assert abs(best.kl - (reward_star / alpha - log_z)) < 0.08
        assert 0.2 * len(x) < best.ess < len(x) and abs(float(best.weights.sum()) - 1) < 1e-5


def test_tilted_optimum_standard_error_matches_the_spread_of_its_estimates():
    """objective_se (alpha · the delta method's se of log Z) is what one draw's estimate is worth: over 400 draws of
    n = 256 rewards R ~ N(0, 1.5²) at alpha 1 (log Z = 1.125 in closed form, ESS ~ 30 of 256: as strong a tilt as
    the digits default's), the estimates spread by the se they report, and sit within a few of them of −alpha·log Z."""
    from sb_finetune.objective import tilted_optimum

    g, s = torch.Generator().manual_seed(11), 1.5
    draws = [tilted_optimum(s * torch.randn(256, generator=g, dtype=torch.float64), 1.0) for _ in range(400)]
    objective = torch.tensor([d.objective for d in draws], dtype=torch.float64)
    se = torch.tensor([d.objective_se for d in draws], dtype=torch.float64)
    assert 15 < float(torch.tensor([d.ess for d in draws]).mean()) < 60
    assert 0.6 < float(objective.std() / se.median()) < 1.4  # calibrated (a se of 0 or of the paths' spread fails)
    bias = float(objective.mean()) + s**2 / 2  # Jensen: −log of a mean reads high, by about se²/2
    assert 0 < bias < 2 * float(se.median()) and float(((objective + s**2 / 2).abs() < 3 * se).double().mean()) > 0.9


def test_tilted_optimum_from_a_proposal_matches_the_closed_form_with_more_effective_samples():
    """summary.json's estimate: half the samples from the base, half from another process (there: the trained
    control), weighted against their even mixture by the known density ratio: log Z, E_p*[R] as the closed form,
    and many more effective samples than as many base samples give where the tilt is strong."""
    from sb_finetune.objective import tilted_optimum

    gmm, alpha, n = three_blobs(), 0.25, 4000
    near = gmm.tilted(A, 0.35)  # a stand-in for a control close to the optimum; dQ/dP = exp(R/0.35 − log Z(0.35))
    x = torch.cat([gmm.sample(n, torch.Generator().manual_seed(4)), near.sample(n, torch.Generator().manual_seed(5))])
    r = x @ A
    log_ratio = r / 0.35 - gmm.log_z(A, 0.35)
    best = tilted_optimum(r, alpha, log_proposal=torch.logaddexp(torch.zeros_like(log_ratio), log_ratio) - math.log(2))
    base_only = tilted_optimum(gmm.sample(2 * n, torch.Generator().manual_seed(6)) @ A, alpha)
    target = gmm.tilted(A, alpha)
    assert abs(best.log_z - gmm.log_z(A, alpha)) < 0.02
    assert abs(best.reward_mean - float(target.weights @ (target.means @ A))) < 0.03
    assert best.ess > 3 * base_only.ess


def test_gap_profile_telescopes_to_the_path_gap_and_rises_where_the_control_loses():
    """`gap_profile` on the mixture's VP chain (20 steps): G_0 ≈ 0 (memoryless start), G_N is the path-by-path gap
    exactly (log h_N = R/alpha), and G_k climbs without falling. The base, which never steers, ends at its gap
    (alpha·log Z − E_base[R], both of the 20-step chain's own samples: its endpoint is not quite the mixture, which
    the mixture's closed-form log Z would put into G_0 as 0.06); the exact control, which steers from the start, near 0."""
    from sb_finetune.objective import gap_profile

    gmm, _, s, policy, base = _gmm_chain("vp", 20, A)

    def reward(x):
        return x.double() @ A

    g = torch.Generator().manual_seed(1)
    r_base = reward(rollout(base, base, s, torch.randn(40000, 2, generator=g), window=0, generator=g).x)
    log_z = float(torch.logsumexp(r_base / ALPHA, 0)) - math.log(len(r_base))

    ends, outs = {}, {}
    for name, control in (("base", base), ("exact", policy)):
        g = torch.Generator().manual_seed(0)
        out = outs[name] = rollout(control, base, s, torch.randn(600, 2, generator=g), window=0, generator=g,
                                   return_trajectory=True)
        profile = gap_profile(base, s, reward, ALPHA, out.trajectory, out.log_ratio, log_z, continuations=64,
                              batch=1 << 16, generator=g).double()
        path_gap = float((ALPHA * out.log_ratio.sum(1).double() - reward(out.x)).mean()) + ALPHA * log_z
        assert profile[-1] == pytest.approx(path_gap, abs=1e-5) and abs(float(profile[0])) < 0.03, (name, profile)
        assert float((profile[1:] - profile[:-1]).min()) > -0.03, (name, profile)  # up to the log h estimates' noise
        ends[name] = profile
    assert ends["base"][-1] == pytest.approx(ALPHA * log_z - float(r_base.mean()), abs=0.1) and ends["base"][-1] > 0.3
    # continuations run by the control itself and reweighted to the base's: the same profile from 8 a state, not 64
    out = outs["exact"]
    by_control = gap_profile(base, s, reward, ALPHA, out.trajectory, out.log_ratio, log_z, continuations=8,
                             batch=1 << 16, generator=torch.Generator().manual_seed(2), proposal=policy).double()
    assert (by_control - ends["exact"]).abs().max() < 0.03, (by_control, ends["exact"])
    # the exact control's 0.10 (measured) is the 20-step chain's own coarseness, paid on its last steps
    assert float(ends["exact"][-1]) < 0.25 * float(ends["base"][-1]) and float(ends["exact"][:10].abs().max()) < 0.03
    assert float(ends["base"][10]) > 0.1  # half way down the chain the base has already lost part of its gap


def test_balanced_grid_puts_the_steps_where_the_kl_is_spent():
    """An even KL rate gives the grid back; a rate peaked at t ≈ 400 narrows the steps there and widens the quiet
    ones, keeps the data end's last timestep, and stays strictly descending; bad input is refused."""
    from sb_finetune.sde import balanced_timesteps

    trailing = list(range(999, 0, -50))
    assert balanced_timesteps([1.0] * 20, trailing) == trailing
    kl = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 0.8, 0.6, 0.4, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0]
    grid = balanced_timesteps(kl, trailing)
    widths = [a - b for a, b in zip(grid, grid[1:])]
    assert len(grid) == 20 and grid[0] <= 999 and grid[-1] == 49 and min(widths) >= 1
    inside = [w for t, w in zip(grid, widths) if 350 < t <= 500]
    assert inside and max(inside) < 30 and max(widths) > 100, grid
    assert len(balanced_timesteps(kl, trailing, 40)) == 40
    with pytest.raises(ValueError, match="one KL per step"):
        balanced_timesteps(kl[:-1], trailing)
    with pytest.raises(ValueError, match="strictly descending timesteps in \\[0, 999\\]"):
        make_schedule(DDPMScheduler(), 3, timesteps=[900, 500, 1000])
    with pytest.raises(ValueError, match="timesteps of one's own .* are for VP"):
        make_schedule(FlowMatchEulerDiscreteScheduler(), 3, timesteps=[900, 500, 100])


def test_a_class_tilt_costs_a_coarse_chain_and_a_balanced_grid_wins_part_of_it_back():
    """The digits reward in small: R = log p(c | x), the mixture's own classifier, tilts the base to component c
    alone (p·exp(R) = w_c N(m_c, S_c), log Z = log w_c). The continuum's optimal control on 20 Gaussian steps
    overpays by 0.44 nats (measured; 0.13 at 50 steps: O(1/N), the steps where the class is decided), and the same
    control on the grid `balanced_timesteps` makes from its own KL profile by 0.33: a grid, not a control, change."""
    from sb_finetune.sde import balanced_timesteps, vp_schedule

    gmm = three_blobs()
    assert float(gmm.log_responsibility(gmm.sample(20000, torch.Generator().manual_seed(0)), 1).exp().mean()) \
        == pytest.approx(0.2, abs=0.01)  # E_base[exp(R)] = w_c: the tilt's normaliser
    sched = DDPMScheduler(clip_sample=False, timestep_spacing="trailing")
    base, exact = gmm.vp_denoiser(sched.alphas_cumprod), gmm.component(1).vp_denoiser(sched.alphas_cumprod)

    def gap(timesteps):
        schedule = vp_schedule(sched, 20, 1.0, timesteps)
        g = torch.Generator().manual_seed(0)
        out = rollout(exact, base, schedule, torch.randn(20000, 2, generator=g), window=0, generator=g)
        per_path = out.log_ratio.sum(1).double() - gmm.log_responsibility(out.x, 1) + math.log(0.2)
        return float(per_path.mean()), float(per_path.std()) / 20000**0.5, out.kl.mean(0).tolist(), schedule.timesteps.tolist()

    trailing, se, kl, grid = gap(None)
    balanced, se_b, _, _ = gap(balanced_timesteps(kl, grid))
    assert trailing > 0.35 and balanced < trailing - 0.07 and max(se, se_b) < 0.015, (trailing, balanced)


def test_nuisance_dimensions_leave_the_decision_and_its_control_to_the_first_two():
    """`with_nuisance`: the mixture in 6 dimensions, the 4 extra ones alike in every component. Whatever they hold, the
    responsibilities are the 2-D mixture's, and the class tilt's exact control (component c's denoiser less the base's)
    is the 2-D one in the first two coordinates and zero in the rest: a control that moves them only pays KL."""
    gmm, wide = three_blobs(), with_nuisance(three_blobs(), 6, var=0.3)
    g = torch.Generator().manual_seed(0)
    x = wide.sample(4000, g)
    assert x[:, 2:].var(0).tolist() == pytest.approx([0.3] * 4, rel=0.1)
    shuffled = torch.cat([x[:, :2], x[torch.randperm(4000, generator=g), 2:]], 1)  # other extra coordinates
    assert torch.allclose(wide.responsibilities(shuffled), gmm.responsibilities(x[:, :2]), atol=1e-6)
    sched = DDPMScheduler(clip_sample=False)
    t = torch.tensor(500)
    xt = torch.randn(256, 6, generator=g)
    control = wide.component(1).vp_denoiser(sched.alphas_cumprod)(xt, t) - wide.vp_denoiser(sched.alphas_cumprod)(xt, t)
    flat = gmm.component(1).vp_denoiser(sched.alphas_cumprod)(xt[:, :2], t) - gmm.vp_denoiser(sched.alphas_cumprod)(xt[:, :2], t)
    assert control[:, 2:].abs().max() < 1e-5 and torch.allclose(control[:, :2], flat, atol=1e-5)
    assert flat.abs().mean() > 0.1  # the decision's own control is not zero
