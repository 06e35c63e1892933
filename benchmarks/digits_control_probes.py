"""Benchmark (issue 13): is the gap the control's form? A control that is not a LoRA of the base, on the digits default's
problem (target 0, alpha 1, 20 DDPM steps), measured as `digits_diagnosis.py` measures its rows (`gap 777`): 512 paths
of seed 777 against an optimum estimated from those and as many base paths (`evaluation.mixture_optimum`).

    python benchmarks/digits_control_probes.py potential --steps 720    # ~18 minutes on 2 CPU cores (360: ~9)
    python benchmarks/digits_control_probes.py potential_masked --steps 360   # the same, only where ε̂ reaches (~9)
    python benchmarks/digits_control_probes.py field --steps 360        # the same network, not a gradient (~6)
    python benchmarks/digits_control_probes.py guided --steps 180       # reward guidance plus a potential (~5)
    python benchmarks/digits_control_probes.py distil --source potential_steps360 --rounds 48 --lr 3e-3   # (~6)
    python benchmarks/digits_control_probes.py kernel --pool 2048 --bandwidth 4 [--decision 5]   # no training (~2)
    python benchmarks/digits_control_probes.py full --steps 180 --lr 3e-4   # every weight of the UNet (~8)
    python benchmarks/digits_control_probes.py lora --steps 180 --lr 3e-3   # the default's LoRA in this loop (~9)

The control is the gradient of a learned potential V(x, j) (a classifier-shaped CNN of 0.4 M parameters, its output
layer zero at the start, so training starts at zero control), applied at the base's mean,

    μ_k = μ_base(x_k) + σ_k² ∇V(μ_base(x_k), k + 1)           (the optimum's own form, σ_k² ∇ log h_{k+1}, to first order)

and trained as the default trains its LoRA: pathwise, the window uniform in [1, 19] controlled steps, the KL before it
logged only, batches of 32, AdamW at lr 1e-3 decayed to 0 (cosine), the gradient's norm clipped at 1. Unlike a LoRA's
correction to ε̂, this shift is added after the scheduler's clamp of x̂0 (clip_sample). It is not a diffusers adapter:
a probe of what the LoRA lacks, not a way to ship a result.

potential_masked: the same shift, zero on the pixels where the base's x̂0_k is clamped (|x̂0| ≥ 1). There the step's
mean does not depend on ε̂, so no correction of ε̂ (no LoRA) can move them: the potential held to what a LoRA reaches.

field: the same network with an image-shaped output layer (zero at the start), μ_k = μ_base + σ_k² F(μ_base, k + 1):
the classifier's shape, after the clamp, without the gradient field.

guidance: σ_k² a_k ∇R(x̂0_k), the reward's gradient at the base's clamped x̂0_k at a learned scale a_k per step (zero
at the start, lr 3e-2); guided: that plus the potential's σ_k² ∇V.

distil: a LoRA of the base (the default's rank 8 on its modules; `--full`: rank 64 on every conv and linear layer)
regressed on a trained probe's control (saved as outputs/digits_control_probes/<probe>_steps<S>.safetensors) along
the probe's own paths: ||μ_θ(x_k) − μ_probe(x_k)||² / (2σ_k²) at states of one random controlled step, summed over
the steps the path KL the LoRA loses to the probe, logged each round. Then the LoRA is measured as the probes are.
`source_kl_where_clamped`: the probe's KL a path on the pixels the clamp holds, which no LoRA can reach.

full: no LoRA: a trainable copy of the whole base UNet (0.7 M weights, every one free) is the policy, the frozen
base beside it, μ_k = μ_policy(x_k) as the trainer's LoRA makes it (through ε̂ and the clamp): the upper bound on what
any adapter of this network reaches at the same training, the issue's "full-parameter control". lora: the default's
rank-8 adapter trained in this same loop (`--lr 3e-3`, the default's rate), the yardstick for `full`.

kernel: no training. The tilt's guidance for the pool's empirical distribution instead of the base's, from `--pool`
base samples x_i and their weights w_i = exp(R(x_i)/alpha): with π_i(y) ∝ N(y; √ᾱ x_i, b(1−ᾱ)) (ᾱ at the step's end,
b = `--bandwidth`) and π^w_i ∝ w_i π_i, the shift at the base's mean is σ_k² √ᾱ (Σ π^w_i x_i − Σ π_i x_i)/(1−ᾱ), which
for b = 1 is σ_k² ∇ log E_pool[w | x_{k+1} = μ_base] (Tweedie); b > 1 smooths the pool's posterior, which in 256
pixels is far sharper than the base's, and steers b times as hard. The last `--hold` controlled steps keep the base.
`--decision c`: the reward c · 1[argmax = 0] instead of the log-probability (both trained on and measured).

Writes outputs/digits_control_probes/<row>.json and prints the row.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sb_finetune.config import load_config  # noqa: E402
from sb_finetune.data import load_pipeline  # noqa: E402
from sb_finetune.evaluation import Paths, distance, mixture_optimum  # noqa: E402
from sb_finetune.estimators.weighted import effective_sample_size  # noqa: E402
from sb_finetune.families import family_of  # noqa: E402
from sb_finetune.rewards import load_reward  # noqa: E402
from sb_finetune.sde import step_kl, transition_mean, vp_split  # noqa: E402

OUT = os.path.join(ROOT, "outputs", "digits_control_probes")
ALPHA, TARGET, BATCH, SAMPLES = 1.0, 0, 32, 512


class Potential(nn.Module):
    """V(x, j): a scalar of the state x_j (j the index on the chain), the shape of a small classifier; with `out` =
    the pixels, the same network read out as an image-shaped field (the `field` probe)."""

    def __init__(self, steps: int, c: int = 64, out: int = 1):
        super().__init__()
        self.e1, self.e2 = nn.Embedding(steps + 1, c), nn.Embedding(steps + 1, 2 * c)
        self.c1, self.c2 = nn.Conv2d(1, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.c3 = nn.Conv2d(c, 2 * c, 3, padding=1, stride=2)
        self.c4, self.c5 = nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.Conv2d(2 * c, 2 * c, 3, padding=1, stride=2)
        self.head = nn.Linear(2 * c * 16, out)

    def forward(self, x: torch.Tensor, j: int | torch.Tensor) -> torch.Tensor:
        idx = j if torch.is_tensor(j) else torch.full((x.shape[0],), j, device=x.device)
        h = F.silu(self.c1(x) + self.e1(idx)[:, :, None, None])
        h = F.silu(self.c3(F.silu(self.c2(h))) + self.e2(idx)[:, :, None, None])
        out = self.head(F.silu(self.c5(F.silu(self.c4(h)))).flatten(1))
        return out.squeeze(1) if out.shape[1] == 1 else out.view(x.shape)


class Problem:
    """The digits default's base chain and reward, and a control given as a mean shift of the base's step."""

    def __init__(self, clamp: bool = True):
        cfg = load_config(os.path.join(ROOT, "configs/digits.yaml"))
        self.fam = family_of(load_pipeline(cfg.model))
        self.fam.module.requires_grad_(False)
        self.schedule = self.fam.sampler_schedule(cfg.sampler)
        if not clamp:  # both processes without the scheduler's clamp of x̂0: another base, with an optimum of its own
            self.schedule = dataclasses.replace(self.schedule, clip_sample=None)
        self.n = self.schedule.num_steps
        self.base = self.fam.denoiser(self.fam.module, self.fam.encode(None, 1))
        self.judge = load_reward("digit", target=TARGET)
        self.shift = None  # (k, μ_base [B, ...], σ_k, live: with graph) → the control's mean shift μ_k − μ_base

    def reward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge(self.fam.decode(x), [""] * x.shape[0]).float()

    def chain(self, x: torch.Tensor, g: torch.Generator, start: int | None = None, from_base: bool = False):
        """x_N, per-step KL [B, N] (with graph from step `start` on) and log dP/dP_base [B, N] of the sampled steps
        (of the base's, scored against the control, when `from_base`)."""
        kls, ratios = [], []
        for k in range(self.n):
            z = torch.randn(x.shape, generator=g)
            std, live = float(self.schedule.std[k]), start is not None and k >= start
            x = x if live else x.detach()
            with torch.set_grad_enabled(live):
                self.xk = x  # the state the step starts from (the distilled LoRA's input)
                pred = self.base(x, self.schedule.timesteps[k])
                mean_base = transition_mean(self.schedule, k, x, pred)
                x0, _ = vp_split(x, pred, float(self.schedule.alpha_bar[k]), self.schedule.prediction_type)
                self.x0 = x0.clamp(-1, 1)  # the base's x̂0_k after the scheduler's clamp (the guidance probes' input)
                self.free = (x0.abs() < 1).float()  # pixels the clamp leaves free: the only ones an ε̂ correction moves
                if not bool(self.schedule.controlled[k]):
                    kls.append(x.new_zeros(x.shape[0]))
                    ratios.append(x.new_zeros(x.shape[0]))
                    x = mean_base + std * z
                    continue
                mean = mean_base + self.shift(k, mean_base, std, live)
                x = (mean_base if from_base else mean) + std * z
                kl = step_kl(mean, mean_base, std)
            kls.append(kl if live else kl.detach())
            ratios.append((((x - mean_base) ** 2 - (x - mean) ** 2).flatten(1).sum(1) / (2 * std**2)).detach())
        return x, torch.stack(kls, 1), torch.stack(ratios, 1)

    @torch.no_grad()
    def paths(self, seed: int, from_base: bool = False) -> Paths:
        g, parts = torch.Generator().manual_seed(seed), []
        for start in range(0, SAMPLES, 128):
            x, kl, ratio = self.chain(torch.randn(min(128, SAMPLES - start), 1, 16, 16, generator=g), g, from_base=from_base)
            images = self.fam.decode(x)
            parts.append((images, self.judge(images, [""] * len(x)).float(), kl, ratio))
        return Paths(*(torch.cat(v) for v in zip(*parts)))

    def measure(self) -> dict:
        """The distance to the optimum as digits_diagnosis measures it (gap_777): seed 777, base paths of the same seed."""
        paths, base = self.paths(777), self.paths(777, from_base=True)
        best = mixture_optimum(base, paths, ALPHA)
        gap = distance(paths, ALPHA, best)
        with torch.no_grad():
            hit = self.judge.logits(paths.images).argmax(1) == TARGET
        return {"gap_777": gap["objective"], "gap_777_se": gap["objective_se"], "kl_excess_777": gap["kl"],
                "kl": float(paths.kl.sum(1).mean()), "target_fraction": float(hit.float().mean()),
                "optimum_777": best.numbers(), "kl_per_step": [round(float(v), 4) for v in paths.kl.mean(0)]}


def input_grad(f, y: torch.Tensor, graph: bool) -> torch.Tensor:
    """∇_y Σ f(y), differentiable in f's weights (and in y) when `graph`."""
    with torch.enable_grad():
        y = y if graph and y.requires_grad else y.detach().requires_grad_(True)
        g, = torch.autograd.grad(f(y).sum(), y, create_graph=graph)
    return g


def grad_of(potential, j: int, y: torch.Tensor, graph: bool) -> torch.Tensor:
    """∇_y V(y, j)."""
    return input_grad(lambda z: potential(z, j), y, graph)


def reward_grad(p: Problem, x0: torch.Tensor, graph: bool) -> torch.Tensor:
    """∇R at the base's x̂0_k (differentiable in the path when `graph`)."""
    return input_grad(p.reward, x0, graph)


POTENTIALS = ("potential", "potential_masked", "field", "guidance", "guided")  # the shifts of `probe_shift`
PROBES = (*POTENTIALS, "full", "lora")  # and the base network's own: all its weights, or the default's LoRA


def policy_shift(p: Problem, policy):
    """A denoiser's step as a mean shift of the base's, at the step's own state (a LoRA's, the full copy's)."""
    def shift(k, mean_base, std, live):
        return transition_mean(p.schedule, k, p.xk, policy(p.xk, p.schedule.timesteps[k])) - mean_base

    return shift


def probe_shift(probe: str, p: Problem, v: nn.Module, a: torch.Tensor):
    """The probe's control as a mean shift (k, μ_base, σ_k, live) → μ_k − μ_base (see the module's docstring)."""
    def shift(k, mean_base, std, live):
        if probe == "field":  # σ² F: the same network read out as a field of the image's shape, not a gradient
            return std**2 * v(mean_base, k + 1)
        out = 0
        if probe in ("guidance", "guided"):  # σ² a_k ∇R(x̂0_k): reward guidance at a learned scale per step
            out = a[k] * reward_grad(p, p.x0, live)
        if probe != "guidance":  # σ² ∇V: a gradient field
            out = out + grad_of(v, k + 1, mean_base, live)
        if probe == "potential_masked":  # zero on the pixels the clamp holds: what an ε̂ correction can reach
            out = out * p.free
        return std**2 * out

    return shift


def train_probe(probe: str, steps: int, lr: float, name: str, clamp: bool = True) -> dict:
    torch.manual_seed(0)
    p = Problem(clamp)
    # built for every probe, also those that replace it below: the lora row's A init draws after it, as measured
    v = Potential(p.n, out=16 * 16 if probe == "field" else 1)
    nn.init.zeros_(v.head.weight)
    nn.init.zeros_(v.head.bias)
    a = nn.Parameter(torch.zeros(p.n))  # the guidance's per-step scale (guidance probes)
    p.shift = probe_shift(probe, p, v, a)
    if probe == "full":  # every weight of a copy of the base UNet, through ε̂ as a LoRA's correction goes
        v = copy.deepcopy(p.fam.module).requires_grad_(True)
        p.shift = policy_shift(p, p.fam.denoiser(v, p.fam.encode(None, 1)))
    elif probe == "lora":  # the default's own adapter, trained in this loop: the yardstick on the same harness
        from sb_finetune.control import add_lora_control, base_denoiser

        cfg = load_config(os.path.join(ROOT, "configs/digits.yaml"))
        v = p.fam.module
        add_lora_control(v, cfg.control.rank, cfg.control.lora_alpha, cfg.control.target_modules, cfg.control.init)
        policy = p.fam.denoiser(v, p.fam.encode(None, 1))
        p.base, p.shift = base_denoiser(policy, v), policy_shift(p, policy)
    groups = [{"params": [w for w in v.parameters() if w.requires_grad], "lr": lr}] if probe != "guidance" else []
    if probe in ("guidance", "guided"):
        groups.append({"params": [a], "lr": 3e-2})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    controlled = [k for k in range(p.n) if bool(p.schedule.controlled[k])]
    g, t0 = torch.Generator().manual_seed(0), time.time()
    for i in range(steps):
        start = controlled[-int(torch.randint(1, len(controlled) + 1, (1,), generator=g))]
        x, kl, _ = p.chain(torch.randn(BATCH, 1, 16, 16, generator=g), g, start=start)
        r = p.reward(x)
        loss = ALPHA * kl[:, start:].sum(1).mean() - r.mean()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_([w for group in groups for w in group["params"]], 1.0)
        opt.step()
        decay.step()
        if i % 20 == 0:
            print(f"step {i}: KL {float(kl.detach().sum(1).mean()):.2f} reward {float(r.detach().mean()):.3f} "
                  f"({time.time() - t0:.0f} s)" + (f" a {[round(float(w), 2) for w in a.detach()]}" if probe in ("guidance", "guided")
                                                 else ""), flush=True)
    from safetensors.torch import save_file

    os.makedirs(OUT, exist_ok=True)  # the trained control, for `distil`
    save_file({**{f"v.{k}": w.detach().contiguous() for k, w in v.state_dict().items()}, "a": a.detach().clone()},
              os.path.join(OUT, f"{name}.safetensors"))
    return {"probe": probe, "steps": steps, "lr": lr, "clamp": clamp, "parameters": sum(w.numel() for g in groups for w in g["params"]),
            "guidance_scale": [round(float(w), 4) for w in a.detach()],
            "train_seconds": time.time() - t0, **p.measure()}


def distil(source: str, rounds: int, updates: int, lr: float, full: bool = False) -> dict:
    """Regress a LoRA of the base (the default's: rank 8 on the default's modules) on a trained probe's control, along
    the probe's own paths: at a controlled step k, ||μ_θ(x_k) − μ_probe(x_k)||² / (2σ_k²) is KL(probe's step ‖ the
    LoRA's), so the loss summed over the steps is the path KL the LoRA loses to the probe. `rounds` batches of 128
    fresh paths, `updates` regression steps of 64 states of one random step on each. `full`: rank 64 on every conv and
    linear layer instead (the capacity's upper bound)."""
    from safetensors.torch import load_file

    from digits_diagnosis import ALL_MODULE_NAMES  # its rank64_all row's modules: full rank for this UNet

    from sb_finetune.control import add_lora_control, base_denoiser

    torch.manual_seed(0)
    p = Problem()
    probe = source.split("_steps")[0]
    if probe not in POTENTIALS or source.endswith("_noclamp"):
        raise ValueError(f"distil: no probe {source!r} to regress on (one trained on the clamped chain: {POTENTIALS})")
    v = Potential(p.n, out=16 * 16 if probe == "field" else 1)
    state = load_file(os.path.join(OUT, f"{source}.safetensors"))
    v.load_state_dict({k[2:]: w for k, w in state.items() if k.startswith("v.")})
    v.requires_grad_(False)
    a = state["a"]
    cfg = load_config(os.path.join(ROOT, "configs/digits.yaml"))
    params = add_lora_control(p.fam.module, 64 if full else cfg.control.rank, cfg.control.lora_alpha,
                              ALL_MODULE_NAMES if full else cfg.control.target_modules, cfg.control.init)
    policy = p.fam.denoiser(p.fam.module, p.fam.encode(None, 1))
    p.base = base_denoiser(policy, p.fam.module)

    source_shift = probe_shift(probe, p, v, a)  # the chain runs it without a graph (live False)

    held = torch.zeros(())  # the probe's KL on pixels the clamp holds (no LoRA can move them), summed over paths

    def record(k, mean_base, std, live):  # the probe's step, its state and target mean kept
        nonlocal held
        shift = source_shift(k, mean_base, std, live)
        held = held + ((shift**2) * (1 - p.free)).sum() / (2 * std**2)
        states[k], targets[k] = p.xk.detach(), (mean_base + shift).detach()
        return shift

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = rounds * updates
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))
    controlled = [k for k in range(p.n) if bool(p.schedule.controlled[k])]
    g, t0, log = torch.Generator().manual_seed(1), time.time(), []
    losses = torch.zeros(p.n)  # each step's regression loss, a running mean over the updates that drew it
    for r in range(rounds):
        states, targets = {}, {}  # step k → this round's 128 states and the probe's means there
        p.shift = record
        with torch.no_grad():
            p.chain(torch.randn(128, 1, 16, 16, generator=g), g)
        for u in range(updates):
            k = controlled[int(torch.randint(len(controlled), (1,), generator=g))]
            rows = torch.randint(128, (64,), generator=g)
            x, target = states[k][rows], targets[k][rows]
            mean = transition_mean(p.schedule, k, x, policy(x, p.schedule.timesteps[k]))
            loss = ((mean - target) ** 2).flatten(1).sum(1).mean() / (2 * float(p.schedule.std[k]) ** 2)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay.step()
            value = float(loss.detach())
            losses[k] = 0.9 * losses[k] + 0.1 * value if losses[k] else value
        log.append(float(losses.sum()))
        print(f"round {r}: distillation KL (steps summed, running) {log[-1]:.3f} ({time.time() - t0:.0f} s)", flush=True)

    p.shift = policy_shift(p, policy)
    return {"probe": f"distil_{source}", "full_rank": full, "rounds": rounds, "updates": updates, "lr": lr,
            "distil_kl": log, "source_kl_where_clamped": float(held) / (128 * rounds), "train_seconds": time.time() - t0, **p.measure()}


def kernel(pool: int, hold: int, bandwidth: float, decision: float) -> dict:
    """The `kernel` probe (module docstring): a control from a pool of base samples, with no training."""
    torch.manual_seed(0)
    p = Problem()
    if decision:
        p.judge = load_reward("digit", target=TARGET, decision=decision)
    p.shift = lambda k, mean_base, std, live: torch.zeros_like(mean_base)
    g, t0, ends = torch.Generator().manual_seed(1), time.time(), []  # seed 1: not the measure's 777
    with torch.no_grad():
        while sum(len(x) for x in ends) < pool:
            ends.append(p.chain(torch.randn(256, 1, 16, 16, generator=g), g)[0])
        x_pool = torch.cat(ends)[:pool].flatten(1)
        log_w = torch.cat([p.reward(x.view(-1, 1, 16, 16)) for x in x_pool.split(512)]) / ALPHA
    sq = (x_pool**2).sum(1)
    controlled = [k for k in range(p.n) if bool(p.schedule.controlled[k])]
    held = set(controlled[len(controlled) - hold:]) if hold else set()

    def shift(k, mean_base, std, live):
        a = float(p.schedule.alpha_bar[k + 1])
        if k in held or a >= 1 - 1e-8:
            return torch.zeros_like(mean_base)
        y = mean_base.flatten(1)
        logits = (math.sqrt(a) * y @ x_pool.T - 0.5 * a * sq) / (bandwidth * (1 - a))  # log N(y; √ᾱ x_i, b(1−ᾱ)) + c(y)
        pulled = (torch.softmax(logits + log_w, 1) - torch.softmax(logits, 1)) @ x_pool
        return (std**2 * math.sqrt(a) * pulled / (1 - a)).view_as(mean_base)

    p.shift = shift
    ess = float(effective_sample_size(log_w))
    return {"probe": "kernel", "pool": pool, "hold": hold, "bandwidth": bandwidth, "decision": decision,
            "pool_ess": ess, "train_seconds": time.time() - t0, **p.measure()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=[*PROBES, "distil", "kernel"])
    parser.add_argument("--source", default="potential_steps360", help="distil: the trained probe to regress on")
    parser.add_argument("--rounds", type=int, default=16, help="distil: batches of 128 paths of the probe")
    parser.add_argument("--updates", type=int, default=25, help="distil: regression steps on each batch")
    parser.add_argument("--no-clamp", action="store_true", help="both processes without the scheduler's clamp of x̂0")
    parser.add_argument("--full", action="store_true", help="distil: rank 64 on every conv and linear layer")
    parser.add_argument("--steps", type=int, default=720, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW's rate, decayed to 0")
    parser.add_argument("--pool", type=int, default=2048, help="kernel: base samples in the pool")
    parser.add_argument("--hold", type=int, default=2, help="kernel: last controlled steps left to the base")
    parser.add_argument("--bandwidth", type=float, default=4.0, help="kernel: b, the pool posterior's widening")
    parser.add_argument("--decision", type=float, default=0.0, help="kernel: c of the decision reward (0: log-prob)")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.probe == "distil":
        row = distil(args.source, args.rounds, args.updates, args.lr, args.full)
        name = f"distil_{args.source}_r{args.rounds}x{args.updates}" + ("_full" if args.full else "")
    elif args.probe == "kernel":
        row = kernel(args.pool, args.hold, args.bandwidth, args.decision)
        name = f"kernel_pool{args.pool}_b{args.bandwidth:g}_hold{args.hold}" + (f"_decision{args.decision:g}" if args.decision else "")
    else:
        name = f"{args.probe}_steps{args.steps}" + ("_noclamp" if args.no_clamp else "") + (f"_lr{args.lr:g}" if args.lr != 1e-3 else "")
        row = train_probe(args.probe, args.steps, args.lr, name, not args.no_clamp)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(row, f, indent=1)
    print(f"{name}: gap (seed 777) {row['gap_777']:.2f} ± {row['gap_777_se']:.2f}, KL excess {row['kl_excess_777']:.2f}, "
          f"target fraction {row['target_fraction']:.3f}, KL {row['kl']:.2f}; per-step KL "
          + " ".join(f"{v:.2f}" for v in row["kl_per_step"]))


if __name__ == "__main__":
    main()
