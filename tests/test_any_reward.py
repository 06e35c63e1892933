"""Estimators for rewards without a gradient (importance-weighted regression, the policy gradient) and reward servers:
the math on chains whose answer is known, then the trainer through a real HTTP server."""

import math
import threading

import pytest
import torch

from sb_finetune.analytic import mixture_chain, three_blobs
from sb_finetune.estimators import Task, make_estimator
from sb_finetune.estimators.base_pool import BasePool
from sb_finetune.estimators.pathwise import Pathwise
from sb_finetune.estimators.policy_gradient import PolicyGradient, cost_to_go, leave_one_out_baseline
from sb_finetune.estimators.weighted import WeightedRegression, effective_sample_size, importance_weights, temper
from sb_finetune.rollout import rollout

from test_estimators import A, PerStepShift, _shift_control, gaussian, train_on_mixture


def test_importance_weights_are_normalised_per_group_and_tempered_to_the_sample_size_asked():
    g = torch.Generator().manual_seed(0)
    log_w = torch.randn(12, generator=g) * 4  # a spread that collapses a group of 4 onto one sample
    groups = torch.tensor([2, 0, 1] * 4)  # interleaved ids: the grouping follows the ids, not the order
    w, ones, numbers = importance_weights(log_w, groups, min_ess=0.5)
    assert bool((ones == 1).all())
    for gid in range(3):
        part = w[groups == gid]
        assert abs(float(part.mean()) - 1) < 1e-5  # mean 1 within each prompt's group
        assert float(effective_sample_size(part.log()[None])) >= 0.5 * 4 - 1e-3
    assert numbers["ess"] < numbers["ess_tempered"] and 0 < numbers["temper"] < 1
    # λ is the largest (on a grid of 0.005) with ESS ≥ min_ess · G: one step more and the sample size falls below it
    rows = log_w.view(4, 3).T.double()
    lam = temper(rows, 0.5)
    tight = (lam < 1)
    assert tight.any()
    assert bool((effective_sample_size(lam[:, None] * rows) >= 2 - 1e-9).all())
    assert bool((effective_sample_size((lam[:, None] + 0.005) * rows)[tight] < 2).all())
    # tempered towards another start measure (forward regression: the base); where no λ reaches the sample size
    # asked, the λ of the largest one
    start = torch.randn(12, generator=g)
    w, w_start, numbers = importance_weights(log_w, None, 0.999, start)
    torch.testing.assert_close(w_start, torch.softmax(start, 0) * 12)
    ends = [float(effective_sample_size(v.double()[None])) / 12 for v in (start, log_w)]
    assert numbers["ess_tempered"] >= max(ends) - 1e-9 and numbers["ess_tempered"] < 0.999
    w_stay, _, stay = importance_weights(log_w, None, 0.999)  # towards the behaviour: λ = 0 always reaches it
    assert stay["temper"] <= 0.01 and torch.allclose(w_stay, torch.ones(12), atol=0.05)
    # weights already spread evenly enough are left as they are; min_ess = 0 turns tempering off
    flat = torch.tensor([0.0, 0.1, -0.1, 0.05])
    torch.testing.assert_close(importance_weights(flat, None, 0.5)[0], torch.softmax(flat, 0) * 4)
    torch.testing.assert_close(importance_weights(log_w, None, 0.0)[0], torch.softmax(log_w, 0) * 12)
    with pytest.raises(ValueError, match="unequal size"):
        importance_weights(log_w, torch.tensor([0] * 5 + [1] * 7), 0.5)


def test_cost_to_go_and_the_leave_one_out_baseline():
    kl = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    r = torch.tensor([5.0, -1.0])
    # C_k = alpha · Σ_{j>k} KL_j − R: step k's own KL is not in it (it gets its own, direct gradient)
    torch.testing.assert_close(cost_to_go(kl, r, 2.0), torch.tensor([[5.0, 1.0, -5.0], [3.0, 1.0, 1.0]]))
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    torch.testing.assert_close(leave_one_out_baseline(values, torch.tensor([0, 0, 0, 1, 1, 1])),
                               torch.tensor([2.5, 2.0, 1.5, 25.0, 20.0, 15.0]))
    torch.testing.assert_close(leave_one_out_baseline(values, None), (values.sum() - values) / 5)


@pytest.mark.parametrize("family, method", [("vp", "posterior"), ("flow", "euler_maruyama")])
def test_policy_gradient_and_pathwise_estimate_the_same_gradient(family, method):
    """Both are unbiased estimates of ∇_θ E[alpha · Σ KL − R] (score function with the KL-to-go and the KL's own
    gradient; reparameterisation through the whole chain): on 40,000 paths of a per-step-shift control they agree
    within a few standard errors. Dropping the KL-to-go, the direct KL gradient or the
    baseline's leave-one-out would not."""
    s, denoiser = mixture_chain(family, 8, flow_method=method)
    control = PerStepShift(denoiser(three_blobs()), s)
    reward = lambda x: torch.sin(x[:, 0]) + 0.3 * x[:, 1]  # noqa: E731
    grads = {}
    for name, estimator, n, chunks in (("pathwise", Pathwise(window=10**9), 4000, 4), ("pg", PolicyGradient(None), 4000, 10)):
        control.c.grad = None
        parts = []
        for chunk in range(chunks):
            g = torch.Generator().manual_seed(100 + chunk)
            groups = torch.arange(n // 8).repeat_interleave(8)
            est = estimator(Task(control, control.base, s, torch.randn(n, 2, generator=g), reward, 0.5, generator=g,
                                 groups=groups))
            est.backward()
            parts.append(control.c.grad.clone())
            control.c.grad = None
        grads[name] = torch.stack(parts)
    pg, pw = grads["pg"].mean(0), grads["pathwise"].mean(0)
    se = sum(v.std(0) ** 2 / len(v) for v in grads.values()).sqrt()  # both are Monte Carlo estimates
    controlled = s.controlled.bool()
    assert float(pw[controlled].norm()) > 0.05
    z = ((pg - pw) / (se + 1e-3))[controlled]
    assert float(z.abs().max()) < 5, (pg, pw, se)
    assert float((pg - pw)[controlled].norm()) < 0.15 * float(pw[controlled].norm())


@pytest.mark.parametrize("family, method", [("vp", "posterior"), ("flow", "euler_maruyama")])
def test_the_optimum_of_a_linear_gaussian_chain_is_a_stationary_point_of_both_reward_only_estimators(family, method):
    """Gaussian base, linear reward: the exact optimal control moves step k's mean by u*_k = −σ_k² ã_{k+1} (the
    adjoint tests prove it). There the expected gradient of the weighted regression (path target) and of the policy
    gradient, in a per-step shift, vanishes within 5 standard errors; at the zero control both stand out of their
    noise and point the way the true (pathwise) gradient does. (Weights at the optimum are exactly constant on these chains: ESS = G.)"""
    from sb_finetune.estimators.adjoint import lean_adjoint

    s, denoiser = mixture_chain(family, 12, flow_method=method)
    base = denoiser(gaussian())
    alpha = 0.7
    out = rollout(base, base, s, torch.randn(2, 2), window=0, return_trajectory=True)
    adjoints, _ = lean_adjoint(base, s, out.trajectory, (-A / alpha).float().expand(2, 2))
    optimum = [-float(s.std[k]) ** 2 * adjoints[k + 1][0] if bool(s.controlled[k]) else torch.zeros(2) for k in range(s.num_steps)]
    reward = lambda x: x @ A.float()  # noqa: E731

    def gradient(estimator, shifts, chunks=6):
        """(mean over chunks of 3,000 paths, its standard error) of the gradient in the controlled steps' shifts."""
        shift = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in shifts]).requires_grad_(True)
        policy = _shift_control(base, s, shift)
        parts = []
        for chunk in range(chunks):
            g = torch.Generator().manual_seed(chunk)
            est = estimator(Task(policy, base, s, torch.randn(3000, 2, generator=g), reward, alpha, generator=g))
            est.backward()
            parts.append(shift.grad[s.controlled.bool()].clone())
            shift.grad = None
        parts = torch.stack(parts)
        return parts.mean(0), parts.std(0) / math.sqrt(chunks), est

    zero = [torch.zeros(2)] * s.num_steps
    true_at_zero = gradient(Pathwise(window=10**9), zero, 2)[0]
    for estimator in (WeightedRegression(None, 0.0, "path"), PolicyGradient(None)):
        at_optimum, se, est = gradient(estimator, optimum)
        assert float((at_optimum.abs() / (se + 1e-4)).max()) < 5, (estimator.name, at_optimum, se)
        if estimator.name == "weighted":
            assert est.extra["ess"] > 0.999
        at_zero, se_zero, _ = gradient(estimator, zero)
        clear = (at_zero.abs() > 5 * se_zero).all(1)  # steps whose estimate stands out of its noise (the late ones)
        assert int(clear.sum()) >= 3, (estimator.name, at_zero, se_zero)
        a, b = at_zero[clear], true_at_zero[clear]
        cos = float((a * b).sum() / (a.norm() * b.norm()))
        assert cos > 0.9, (estimator.name, cos)


@pytest.mark.parametrize("name", ["weighted", "policy_gradient"])
def test_reward_only_estimators_train_the_mixture_half_way_to_the_tilt(name):
    from sb_finetune.config import load_config

    estimator = make_estimator(load_config(None, [f"objective.estimator={name}", "objective.grad_steps=5"]).objective)
    calls = {"grad": 0}

    def reward(x):  # a reward whose gradient must never be asked for
        calls["grad"] += int(torch.is_grad_enabled() and x.requires_grad)
        return x.detach() @ torch.tensor([0.5, 0.5])

    tv_trained, tv_base, history = train_on_mixture("vp", estimator, 200, reward)
    assert calls["grad"] == 0
    assert tv_trained <= 0.5 * tv_base, (tv_trained, tv_base)
    assert sum(history[-20:]) / 20 < sum(history[:20]) / 20 - 0.08  # (optimum −alpha·log Z ≈ −0.6; start ≈ −0.1)


def test_base_pool_trains_the_mixture_to_the_tilt_from_one_pool_of_base_paths():
    """Base paths, drawn once and resampled by exp(R/alpha), regressed as the model's own denoising target: the
    trained control's endpoint weights move three quarters of the way to the tilt's (0.09 in total variation with the
    last 2 steps held to the base, the default, 0.11 without, against the base's 0.39: the pool's denoiser, not the
    chain's optimum, which pathwise reaches within 0.03), while the same pool unweighted barely moves them; the base
    samples the pool only on the first call, and the reward's gradient is never asked for."""
    calls = {"grad": 0, "reward": 0}

    def reward(x):
        calls["grad"] += int(torch.is_grad_enabled() and x.requires_grad)
        calls["reward"] += 1
        return x.detach() @ torch.tensor([0.5, 0.5])

    estimator = BasePool(None, pool_size=1024)
    tv_trained, tv_base, _ = train_on_mixture("vp", estimator, 150, reward)
    assert calls == {"grad": 0, "reward": 4}  # 1,024 paths in batches of 256, scored once
    assert estimator.base_calls == 4 * 20 and estimator.pool[0].shape == (1024, 2)
    assert tv_trained <= 0.4 * tv_base, (tv_trained, tv_base)
    untilted = BasePool(None, pool_size=1024)
    tv_untilted = train_on_mixture("vp", untilted, 150, lambda x: 0 * x.detach().sum(1))[0]
    assert tv_untilted > 0.8 * tv_base, (tv_untilted, tv_base)  # the weights, not the regression, move the mass


def test_base_pool_holds_its_last_steps_to_the_base():
    """objective.pool_hold=3: the last 3 controlled steps regress on the base's own prediction, so their gradient is the
    control's own KL there, deterministic and along the control (whatever the pool and the noise drawn); the other
    steps keep the tilted pool's noisy denoising target. Holding every step is refused."""
    gmm = three_blobs()
    s, denoiser = mixture_chain("vp", 12)
    control = PerStepShift(denoiser(gmm), s)
    controlled = [k for k in range(s.num_steps) if bool(s.controlled[k])]
    held, free = controlled[-3:], controlled[:-3]
    reward = lambda x: x.detach() @ torch.tensor([0.5, 0.5])  # noqa: E731
    grads = []
    for seed in (0, 1):
        control.c.grad = None
        g = torch.Generator().manual_seed(seed)
        est = BasePool(None, pool_size=64, hold=3)(Task(control, control.base, s, torch.randn(32, 2, generator=g), reward,
                                                        1.0, generator=g, shared=torch.Generator().manual_seed(seed)))
        est.backward()
        grads.append(control.c.grad.clone())
    for k in held:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6)  # no noise in the target
        cos = torch.nn.functional.cosine_similarity(grads[0][k], control.c.detach()[k], dim=0)
        assert cos > 0.999, (k, cos)  # the gradient of its own KL: shrink the control there
    assert all(not torch.allclose(grads[0][k], grads[1][k], atol=1e-3) for k in free)
    with pytest.raises(ValueError, match="holds every one of the chain's"):
        BasePool(None, pool_size=8, hold=len(controlled))(Task(control, control.base, s, torch.randn(4, 2), reward, 1.0))


def _pool_on_mixture(target: str, reward, scale: float, iterations: int) -> tuple[float, float, float]:
    """base_pool (1,024 paths, 2 held) trained on the 20-step VP mixture whose base predicts `scale` × the exact ε̂:
    (the trained control's path KL to that base, the total variation of its endpoint weights to the exact tilt's, the
    base's)."""
    from sb_finetune.analytic import MLPControl, fit_control

    torch.manual_seed(0)
    gmm = three_blobs()
    s, denoiser = mixture_chain("vp", 20)
    exact = denoiser(gmm)
    base = (lambda x, t: scale * exact(x, t)) if scale != 1 else exact  # noqa: E731
    control = MLPControl(base)
    fit_control(control, s, reward, 1.0, iterations=iterations, batch=256, lr=1e-2,
                estimator=BasePool(None, pool_size=1024, target=target))
    start = torch.randn(4000, 2, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out, before = rollout(control, base, s, start, window=0), rollout(base, base, s, start, window=0)
    tilted = gmm.tilted(torch.tensor([0.5, 0.5], dtype=torch.float64), 1.0)
    tv = lambda x: 0.5 * float((tilted.fit_stats(x)[0] - tilted.weights).abs().sum())  # noqa: E731
    return float(out.kl.sum(1).mean()), tv(out.x), tv(before.x)


def test_base_pool_contrast_learns_the_tilt_and_not_the_base_models_own_error():
    """A base that is not the denoiser of its own samples (the mixture's exact ε̂ × 0.8, as a trained network is
    not exactly): on its own pool with the tilt off (R ≡ 0) the forward target still trains a control that pays KL,
    pulling the base toward its samples' denoiser; the contrast (`objective.pool_target=contrast`: less a second
    control fitted to the untilted pool) stays at the base. Tilted, on the exact base, it moves the endpoint weights to
    the tilt as far as the forward target does (0.10 against its 0.09 of the base's 0.41), at no more KL."""
    flat = lambda x: 0 * x.detach().sum(1)  # noqa: E731
    kl_forward = _pool_on_mixture("forward", flat, 0.8, 40)[0]  # 0.46
    kl_contrast = _pool_on_mixture("contrast", flat, 0.8, 40)[0]  # 0.015
    assert kl_forward > 0.2 and kl_contrast < 0.1 * kl_forward, (kl_forward, kl_contrast)
    tilt = lambda x: x.detach() @ torch.tensor([0.5, 0.5])  # noqa: E731
    kl_c, tv_c, tv_base = _pool_on_mixture("contrast", tilt, 1.0, 150)
    # the forward target on this chain (the test above): total variation 0.09 of the base's 0.41, KL 0.38
    assert tv_c <= 0.3 * tv_base and kl_c <= 0.45, (tv_c, tv_base, kl_c)
    s, denoiser = mixture_chain("vp", 4)
    with pytest.raises(ValueError, match="must carry the policy's module"):
        BasePool(None, pool_size=8, hold=0, target="contrast")(Task(denoiser(three_blobs()), denoiser(three_blobs()), s,
                                                                    torch.randn(4, 2), flat, 1.0))


def test_base_pool_config_and_its_one_prompt():
    from sb_finetune.config import ConfigError, load_config
    from sb_finetune.trainer import train

    est = make_estimator(load_config(None, ["objective.estimator=base_pool", "objective.pool_size=64",
                                            "objective.grad_steps=2", "objective.pool_hold=3",
                                            "objective.pool_target=contrast"]).objective)
    assert isinstance(est, BasePool) and (est.pool_size, est.steps, est.hold, est.target) == (64, 2, 3, "contrast")
    for overrides, match in ((["objective.pool_size=64"], "'objective.pool_size': only for objective.estimator=base_pool"),
                             (["objective.estimator=base_pool", "objective.pool_size=0"], "at least 1 path"),
                             (["objective.pool_hold=3"], "'objective.pool_hold': only for objective.estimator=base_pool"),
                             (["objective.estimator=base_pool", "objective.pool_hold=20"], "0 to sampler.steps - 1 = 19"),
                             (["objective.pool_target=contrast"], "'objective.pool_target': only for objective.estimator=base_pool"),
                             (["objective.estimator=base_pool", "objective.pool_target=tilt"], "objective.pool_target"),
                             (["objective.estimator=base_pool", "objective.window_min=3"], "only for the pathwise")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides)
    with pytest.raises(ValueError, match="one pool of base paths for one prompt; got 3 prompts"):
        train(load_config("configs/smoke.yaml", ["objective.estimator=base_pool"]))


@pytest.mark.parametrize("target", ["forward", "contrast"])
def test_trainer_runs_base_pool_on_a_reward_without_gradient_and_resumes_on_the_same_pool(tmp_path, capsys, target):
    """A reward without a gradient (jpeg), 4 steps: the log's reward is the pool's, drawn once. Checkpoints keep each
    process's pool (and the contrast's second control with its optimizer), so a run stopped at step 2 and resumed
    neither scores new base paths nor ends anywhere but where the uninterrupted run ends, bit for bit. A checkpoint of
    the forward target, which holds no second control, is refused by the contrast."""
    from sb_finetune import checkpoint
    from sb_finetune.config import load_config
    from sb_finetune.trainer import train

    overrides = ["optim.steps=4", "objective.estimator=base_pool", "objective.pool_size=6", "objective.grad_steps=2",
                 "reward.name=jpeg_compressibility", "prompts.list=[a cat]", "logging.summary_samples=2",
                 "logging.eval_every=0", "output.checkpoint_every=2", "optim.lr=1e-2", f"objective.pool_target={target}"]
    out = train(load_config("configs/smoke.yaml", [*overrides, f"output.dir={tmp_path / 'straight'}"]))
    history = out["history"]
    assert len(history) == 4 and out["skipped"] == 0
    assert all(math.isfinite(h["loss"]) and 0 < h["pool_ess"] <= 1 for h in history)
    assert history[0]["reward_mean"] == history[3]["reward_mean"]  # the pool's, drawn once
    assert any(float(v.abs().max()) > 0 for k, v in out["lora"].items() if "lora.up" in k)
    if target == "contrast":  # the second control learnt too (its last update's loss is logged)
        assert all(math.isfinite(h["pool_mean_loss"]) for h in history[1:])

    stopped = tmp_path / "stopped"
    train(load_config("configs/smoke.yaml", [*overrides, "optim.steps=2", f"output.dir={stopped}"]))
    saved = stopped / "checkpoints" / "checkpoint_2"
    pool = BasePool(target=target)
    assert checkpoint.load_estimator(str(saved), 0, pool) and pool.pool[0].shape[0] == 6
    assert checkpoint.problem(str(saved), 0) is None and not checkpoint.load_estimator(str(saved), 1, BasePool())
    if target == "forward":
        with pytest.raises(ValueError, match="holds the pool but not the contrast's second control"):
            checkpoint.load_estimator(str(saved), 0, BasePool(target="contrast"))
    else:
        assert len(pool.saved_mean) > 0  # m_φ's tensors (and Adam's moments), put in when m_φ is made
    capsys.readouterr()
    resumed = train(load_config("configs/smoke.yaml", [*overrides, f"output.dir={stopped}"]), resume="latest")
    assert f"base_pool's state read from {saved}" in capsys.readouterr().out
    assert resumed["history"][2]["reward_mean"] == history[2]["reward_mean"]  # the same pool
    for k, v in out["lora"].items():
        assert torch.equal(v, resumed["lora"][k]), k


def test_base_pool_leaves_out_paths_whose_reward_is_not_finite():
    from sb_finetune.estimators.base_pool import finite_paths

    ends, rewards = torch.arange(8.0).view(4, 2), torch.tensor([1.0, float("nan"), -float("inf"), 2.0])
    with pytest.warns(UserWarning, match="2 of the pool's 4 base paths have a non-finite reward and are left out"):
        kept_ends, kept = finite_paths(ends, rewards)
    assert kept.tolist() == [1.0, 2.0] and kept_ends.tolist() == [[0.0, 1.0], [6.0, 7.0]]
    with pytest.raises(ValueError, match="not finite on any of the 2 base paths"):
        finite_paths(ends[:2], torch.full((2,), float("nan")))
    pool = BasePool()
    assert pool.state_dict() == {}
    pool.load_state_dict({"pool_ends": kept_ends, "pool_rewards": kept})
    assert torch.equal(pool.state_dict()["pool_rewards"], kept)
    with pytest.raises(ValueError, match="a saved pool of 2 paths with rewards of shape"):
        pool.load_state_dict({"pool_ends": kept_ends, "pool_rewards": kept[:1]})


# --------------------------------------------------------------------------- reward servers


@pytest.fixture
def server():
    """A real reward server on 127.0.0.1 (a free port) in a thread, serving `brightness`."""
    from sb_finetune.rewards import load_reward
    from sb_finetune.rewards.server import make_server

    srv = make_server(load_reward("brightness"), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_a_served_reward_scores_as_the_reward_itself(server):
    from sb_finetune.rewards import load_reward

    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    remote = load_reward(f"{server}/score")
    assert not remote.differentiable and remote.name == f"{server}/score"
    torch.testing.assert_close(remote(images, ["a", "b", "c"]), load_reward("brightness")(images, ["a", "b", "c"]))
    assert remote.last_error is None


def test_reward_server_failures_give_nan_and_one_line(server):
    import urllib.request

    from sb_finetune.rewards import load_reward
    from sb_finetune.rewards.registry import non_finite_message

    images = torch.rand(2, 3, 8, 8)
    # refused: nothing listens there (a port just freed); retried with backoff, then NaN and the line
    from conftest import free_port

    dead = load_reward(f"http://127.0.0.1:{free_port()}/score", retries=2, backoff=0.01)
    r = dead(images, ["a", "b"])
    assert torch.isnan(r).all() and "connection refused (3 tries)" in dead.last_error
    assert non_finite_message(r, dead.name, dead.last_error) == dead.last_error
    with pytest.raises(ValueError, match="does not answer at .*/health .*python -m sb_finetune.rewards.server"):
        dead.check()  # what the trainer asks before the model loads
    load_reward(f"{server}/score").check()
    # a wrong path is a 4xx: not retried, the server's own words come back
    wrong = load_reward(f"{server}/nope", retries=5, backoff=10.0)
    assert torch.isnan(wrong(images, ["a", "b"])).all() and "status 404" in wrong.last_error
    # a malformed body: 400 with what is wrong
    req = urllib.request.Request(f"{server}/score", data=b"not safetensors", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400 and b"not a safetensors file" in err.value.read()
    # images of the wrong shape: refused by the server (400), not retried
    bad_shape = load_reward(f"{server}/score", retries=1, backoff=0.01)
    assert torch.isnan(bad_shape(torch.rand(2, 1, 8, 8), ["a", "b"])).all() and "status 400" in bad_shape.last_error
    with urllib.request.urlopen(f"{server}/health", timeout=10) as resp:
        assert b'"brightness"' in resp.read()


def test_wrong_count_and_non_numbers_from_a_server_are_named():
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from sb_finetune.rewards import load_reward

    answers = iter([b'{"scores": [1.0]}', b'{"scores": ["x", "y"]}', b'{"oops": 1}', b"<html>busy</html>"])

    class Liar(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            body = next(answers)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Liar)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        remote = load_reward(f"http://127.0.0.1:{srv.server_address[1]}/score")
        for expected in ("returned 1 scores for 2 images", "not numbers", "no 'scores' list", "not JSON"):
            assert torch.isnan(remote(torch.rand(2, 3, 4, 4), ["a", "b"])).all()
            assert expected in remote.last_error
    finally:
        srv.shutdown()
        srv.server_close()


def test_trainer_takes_a_non_differentiable_reward_through_a_server(server, tmp_path):
    """jpeg-like rewards without a gradient train with the reward-only estimators, through a real server; the
    gradient estimators still refuse them, with the reason and the way out."""
    from sb_finetune.config import load_config
    from sb_finetune.trainer import build_reward, train

    overrides = ["optim.steps=2", "optim.batch_size=4", "optim.group_size=2", "objective.estimator=weighted",
                 "objective.grad_steps=2", f"reward.name={server}/score", f"output.dir={tmp_path}", "logging.summary_samples=4"]
    out = train(load_config("configs/smoke.yaml", overrides))
    history = out["history"]
    assert len(history) == 2 and all(math.isfinite(h["reward_mean"]) for h in history)
    assert {"ess", "ess_tempered", "temper"} <= set(history[0]) and out["skipped"] == 0
    assert history[0]["kl"] == 0 < history[1]["kl"]  # the first step moved the control off the base
    with pytest.raises(ValueError, match="not differentiable: objective.estimator=pathwise backpropagates"):
        build_reward(load_config("configs/smoke.yaml", [f"reward.name={server}/score"]))
    with pytest.raises(ValueError, match="set optim.group_size"):
        train(load_config("configs/smoke.yaml", ["objective.estimator=policy_gradient", f"output.dir={tmp_path}/b"]))


def test_reward_only_config_checks():
    from sb_finetune.config import ConfigError, load_config

    est = make_estimator(load_config(None, ["objective.estimator=weighted", "objective.grad_steps=3", "objective.min_ess=0.3"]).objective)
    assert isinstance(est, WeightedRegression) and (est.steps, est.min_ess) == (3, 0.3)
    assert isinstance(make_estimator(load_config(None, ["objective.estimator=policy_gradient"]).objective), PolicyGradient)
    for overrides, match in ((["objective.grad_steps=3"], "only for objective.estimator=weighted, policy_gradient or base_pool"),
                             (["objective.estimator=policy_gradient", "objective.min_ess=0.2"], "'objective.min_ess': only for"),
                             (["objective.estimator=weighted", "objective.min_ess=1.5"], "in \\[0, 1\\)"),
                             (["objective.estimator=weighted", "objective.window_min=3"], "only for the pathwise estimator"),
                             (["optim.batch_size=6", "optim.group_size=4"], "divide optim.batch_size")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides)


def test_the_digit_reward_as_a_decision_is_a_step_function_without_gradient():
    from sb_finetune.rewards import load_reward

    soft, hard = load_reward("digit", target=3), load_reward("digit", target=3, decision=5.0)
    assert soft.differentiable and not hard.differentiable
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    hits = (soft.logits(images).argmax(1) == 3).float()
    torch.testing.assert_close(hard(images, [""] * 16), 5.0 * hits)


def test_ppo_clipping_leaves_the_first_update_alone_and_bounds_the_reused_ones():
    """On the batch's own policy every ratio is 1: the clipped surrogate's gradient is the plain one. Moved off it,
    the surrogate is PPO's pessimistic bound (never below the ratio-weighted one) and its gradient changes."""
    s, denoiser = mixture_chain("vp", 6)
    control = PerStepShift(denoiser(three_blobs()), s)
    reward = lambda x: x @ torch.tensor([0.5, 0.5])  # noqa: E731

    def grads(estimator, shift=None):
        g = torch.Generator().manual_seed(0)
        est = estimator(Task(control, control.base, s, torch.randn(256, 2, generator=g), reward, 1.0, generator=g,
                             shared=torch.Generator().manual_seed(1)))
        if shift is not None:
            with torch.no_grad():
                control.c += shift
        control.c.grad = None
        est.backward()
        if shift is not None:
            with torch.no_grad():
                control.c -= shift
        return control.c.grad.clone()

    torch.testing.assert_close(grads(PolicyGradient(None, clip=0.2)), grads(PolicyGradient(None)))
    far = torch.full_like(control.c, 0.3)
    clipped, wide = grads(PolicyGradient(None, clip=0.05), far), grads(PolicyGradient(None, clip=0.99), far)
    assert torch.isfinite(clipped).all() and not torch.allclose(clipped, wide, rtol=0.05)


def test_a_batch_reused_for_several_updates_steps_the_schedule_per_update(tmp_path):
    from sb_finetune.config import ConfigError, load_config
    from sb_finetune.trainer import train

    out = train(load_config("configs/smoke.yaml", [
        "optim.steps=2", "optim.batch_size=4", "optim.group_size=2", "objective.estimator=policy_gradient",
        "objective.clip_ratio=0.2", "optim.updates_per_batch=3", "optim.lr_schedule=linear", "objective.grad_steps=2",
        "reward.name=jpeg_compressibility", f"output.dir={tmp_path}"]))
    # a linear decay over 2 steps × 3 updates: the second step starts at 1 − 3/6 of the rate
    assert [h["lr"] for h in out["history"]] == pytest.approx([1e-3, 0.5e-3])
    assert out["skipped"] == 0
    for overrides, match in ((["optim.updates_per_batch=2"], "only for objective.estimator=adjoint, weighted or policy_gradient"),
                             (["objective.estimator=weighted", "optim.updates_per_batch=2", "optim.grad_accum=2"], "not both"),
                             (["objective.clip_ratio=0.2"], "only for objective.estimator=policy_gradient")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides)


@pytest.mark.parametrize("estimator", ["weighted", "policy_gradient"])
def test_two_processes_train_on_a_served_jpeg_reward_to_identical_weights(two_ranks, estimator):
    """The issue's setting: jpeg compressibility through a reward server, two real processes (gloo), each batch
    reused for two updates (policy gradient: clipped at 0.2): every backward of every update reaches both ranks'
    all-reduce, or the weights differ."""
    from safetensors.torch import load_file

    out = two_ranks(f"jpeg_{estimator}")
    r0, r1 = (load_file(out / f"rank{i}_of_2.safetensors") for i in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    lora_b = [v for k, v in r0.items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
