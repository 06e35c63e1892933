"""Benchmark: why the digits default overpays KL — the distance to the tilted optimum, cause by cause.

    python benchmarks/digits_diagnosis.py                      # every row (about 2 hours on 2 CPU cores)
    python benchmarks/digits_diagnosis.py before n10 adjoint   # some rows
    python benchmarks/digits_diagnosis.py --report-only        # the table of rows already run
    python benchmarks/digits_diagnosis.py --optimum-profile    # the optimum's own per-step KL (about 7 minutes)
    python benchmarks/digits_diagnosis.py --optimum-fraction 8192   # the optimum's own target fraction (about 4 minutes)
    python benchmarks/digits_diagnosis.py --gradient-noise cosine steps240 --batches 48   # is the control stationary?
    python benchmarks/digits_diagnosis.py --gradient-noise steps240 --batches 48 --set objective.window_min=20
    python benchmarks/digits_diagnosis.py --gradient-noise stl --batches 12 --set objective.path_gradient=stl
    python benchmarks/digits_diagnosis.py --gap-profile steps600 outputs/digits   # where along the chain the gap is made

Every row trains the digits default (configs/digits.yaml: target 0, alpha 1, 20 DDPM steps) with its changes, each in
a fresh process (its own wall and peak memory), then measures the objective's distance to the optimum
p_base · exp(R/alpha) (`gap` = alpha · KL(P_θ ‖ P*) on paths, estimated path by path with the pathwise log-ratio; the
optimum from the base and the trained samples together): summary.json's (seed 12345), and again on 512 trained and
512 base draws of seed 777 with an optimum of their own (`gap 777`), the KL's excess, the target fraction, and
where the excess sits: the per-step KL in three phases (early t ≥ 599, mid 549–399, late ≤ 349 on the 20-step grid)
and the gap split between the samples that end as the target digit and those that do not.

Rows, by cause (each against `cosine`: the old default, 80 steps at lr 3e-3, with a cosine decay):
    (a) the chain       n10, n50: N = 10 / 50 sampling steps (default: 20)
    (b) the estimator   full_window (K = N always: the unbiased pathwise gradient), adjoint (Adjoint Matching),
                        adjoint_now (the same at the default's rate: does the pathwise rate suit it?),
                        adjoint_reuse4 (each batch's adjoints regressed by 4 updates of 5 steps, 120 batches),
                        no_grad_clip, stl (sticking the landing: the default with objective.path_gradient=stl, whose
                        per-path gradient vanishes at the optimum), stl_lr1e-2 (the same at lr 1e-2, 10 warm-up steps),
                        unbiased_window, unbiased_window_7_alpha0.5 (the window reweighted to the full chain's
                        gradient, at 3e-3), unbiased_window_now (the same at the default's rate)
    (c) capacity        rank64_all: rank 64 on every conv and linear layer (full rank for this UNet: the upper bound);
                        lowres: the default's modules at 8×8 only, no 16×16 convolution adapted (the control's form)
                        weight_decay0.1, weight_decay1: AdamW's decay at the default's rate (does it hold back the
                        chance correlations a control of 256 pixels takes for steering?)
    (d) optimisation    before (the old default: constant learning rate), steps240, batch96, batch16_steps160, lr1e-3,
                        lr1e-2 (10 warm-up steps), batch96_lr1e-2, default_lr1e-2 (the default at lr 1e-2, 10 warm-up)
    together            rank64_all_steps240
    training noise      cosine_seed1, cosine_seed2: the same run from other seeds (how far apart two rows must be)
    default             the default config as it is now (cosine decay, 180 steps, checkpointing: under 2 GB), and
                        default_7_alpha0.5: the same on another digit and alpha, untuned; default_warmup20: the
                        default with the rate ramped up over its first 20 steps (does the early KL overshoot matter?);
                        steps600: the default decayed over 600 steps instead of 180 (about 36 minutes: where it stalls);
                        n10_steps600: the same on a 10-step chain (15 minutes: the chain's share where both stall);
                        lora_plus4: the default with LoRA+ (its B matrices at 4× the A matrices' rate);
                        default_now, default_now_7_alpha0.5, default_now_seed1 (the default since 2026-12-05: lr 1e-2,
                        10 warm-up steps), default_seed1 and lr2e-2 beside them (the rate, on the balanced grid);
                        default_now_steps360 and no_clamp_steps360: twice the steps, with the scheduler's clamp of x̂0
                        and without it in both processes (is the clamp where the LoRA stalls?)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_MODULE_NAMES = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0", "conv",
                    "conv_in", "conv_out", "linear_1", "linear_2"]  # every conv and linear layer of the digits UNet
ALL_MODULES = f"control.target_modules=[{','.join(ALL_MODULE_NAMES)}]"
# the default's modules where the digits UNet works at 8×8 (down_blocks.1, the mid block, up_blocks.0; all its attention)
LOW_RES_NAMES = ["to_q", "to_k", "to_v", "to_out.0", *(f"{block}.resnets.{i}.{conv}" for block, n in
                 (("down_blocks.1", 1), ("mid_block", 2), ("up_blocks.0", 2)) for i in range(n) for conv in ("conv1", "conv2"))]
LOW_RES = f"control.target_modules=[{','.join(LOW_RES_NAMES)}]"
NO_CLAMP = os.path.join(ROOT, "outputs", "digits_diagnosis", "ddpm_no_clamp")  # written by write_no_clamp_model
RATE_3E3 = ["optim.lr=3e-3", "optim.warmup_steps=0"]  # the default's rate until 2026-12-05, which the rows below were measured at
BEFORE = ["optim.steps=80", "optim.lr_schedule=constant", "objective.checkpointing=false", *RATE_3E3]  # the default before the fix
COSINE = [*BEFORE, "optim.lr_schedule=cosine"]
ROWS = {  # every row but `before` and `default` changes one thing against `cosine`
    "before": ("the old default", BEFORE),
    "cosine": ("(d) optimisation", COSINE),
    "cosine_seed1": ("training noise", [*COSINE, "optim.seed=1"]),
    "cosine_seed2": ("training noise", [*COSINE, "optim.seed=2"]),
    "n10": ("(a) chain", [*COSINE, "sampler.steps=10"]),
    "n50": ("(a) chain", [*COSINE, "sampler.steps=50"]),
    "full_window": ("(b) estimator", [*COSINE, "objective.window_min=20"]),
    "adjoint": ("(b) estimator", [*COSINE, "objective.estimator=adjoint"]),
    "no_grad_clip": ("(b) estimator", [*COSINE, "optim.max_grad_norm=0"]),
    "rank64_all": ("(c) capacity", [*COSINE, "control.rank=64", ALL_MODULES]),
    "steps240": ("(d) optimisation", [*COSINE, "optim.steps=240"]),
    "batch96": ("(d) optimisation", [*COSINE, "optim.batch_size=96"]),
    "batch16_steps160": ("(d) optimisation", [*COSINE, "optim.batch_size=16", "optim.steps=160"]),
    "lr1e-3": ("(d) optimisation", [*COSINE, "optim.lr=1e-3"]),
    "lr1e-2": ("(d) optimisation", [*COSINE, "optim.lr=1e-2", "optim.warmup_steps=10"]),
    "batch96_lr1e-2": ("(d) optimisation", [*COSINE, "optim.batch_size=96", "optim.lr=1e-2", "optim.warmup_steps=10"]),
    "rank64_all_steps240": ("together", [*COSINE, "control.rank=64", ALL_MODULES, "optim.steps=240"]),
    "default": ("the default until 2026-12-05", RATE_3E3),
    "default_7_alpha0.5": ("the default until 2026-12-05", [*RATE_3E3, "reward.kwargs.target=7", "objective.alpha=0.5"]),
    "default_warmup20": ("(d) optimisation", ["optim.lr=3e-3", "optim.warmup_steps=20"]),
    "adjoint_reuse4": ("(b) estimator", ["objective.estimator=adjoint", "objective.adjoint_steps=5",
                                         "optim.updates_per_batch=4", "optim.steps=120", "objective.checkpointing=false",
                                         *RATE_3E3]),
    "stl": ("(b) estimator", [*RATE_3E3, "objective.path_gradient=stl"]),
    "default_lr1e-2": ("(d) optimisation", ["optim.lr=1e-2", "optim.warmup_steps=10"]),
    "stl_lr1e-2": ("(b) estimator", ["objective.path_gradient=stl", "optim.lr=1e-2", "optim.warmup_steps=10"]),
    "steps600": ("(d) optimisation", [*RATE_3E3, "optim.steps=600"]),
    "n10_steps600": ("(a) chain", [*RATE_3E3, "sampler.steps=10", "optim.steps=600"]),
    "lora_plus4": ("(d) optimisation", [*RATE_3E3, "optim.lora_plus_ratio=4"]),
    # the rate on the balanced grid (2026-12-05): the default since, and its neighbours ("The rate, on the balanced grid")
    "default_now": ("the default since 2026-12-05: lr 1e-2, 10 warm-up steps", []),
    "default_now_7_alpha0.5": ("the default since 2026-12-05", ["reward.kwargs.target=7", "objective.alpha=0.5"]),
    "default_seed1": ("training noise, at lr 3e-3", [*RATE_3E3, "optim.seed=1"]),
    "default_now_seed1": ("training noise, at the default's rate", ["optim.seed=1"]),
    "lr2e-2": ("(d) optimisation", ["optim.lr=2e-2", "optim.warmup_steps=20"]),
    # the reweighted window ("The random window, reweighted"), at each rate
    "unbiased_window": ("(b) estimator", [*RATE_3E3, "objective.unbiased_window=true"]),
    "unbiased_window_7_alpha0.5": ("(b) estimator", [*RATE_3E3, "objective.unbiased_window=true",
                                                     "reward.kwargs.target=7", "objective.alpha=0.5"]),
    "adjoint_now": ("(b) estimator, at the default's rate", ["objective.estimator=adjoint"]),
    "unbiased_window_now": ("(b) estimator, at the default's rate", ["objective.unbiased_window=true"]),
    "weight_decay0.1": ("(c) the control's chance correlations, decayed", ["optim.weight_decay=0.1"]),
    "weight_decay1": ("(c) the control's chance correlations, decayed", ["optim.weight_decay=1.0"]),
    "lowres": ("(c) the control's form: the 8×8 layers and the attention only", [LOW_RES]),
    # does the LoRA stall where the scheduler's clamp of x̂0 holds pixels it cannot move? twice the steps, with and without
    "default_now_steps360": ("(d) optimisation, at the default's rate", ["optim.steps=360"]),
    "no_clamp_steps360": ("(c) the clamp off in both processes, 360 steps", ["optim.steps=360", f"model.pretrained={NO_CLAMP}"]),
}
SAMPLES = 512


def write_no_clamp_model() -> None:
    """The shipped digits DDPM with its scheduler's clamp of x̂0 off (`clip_sample`), at NO_CLAMP: the same network, so
    a base process (and an optimum) of its own."""
    import shutil

    from sb_finetune.digits import BASE_DIR

    shutil.copytree(BASE_DIR, NO_CLAMP, dirs_exist_ok=True)
    path = os.path.join(NO_CLAMP, "scheduler", "scheduler_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, "clip_sample": False}, f, indent=2)


def run_row(name: str, out: str, extra: list[str]) -> None:
    """Train in a fresh process (the default config + this row's changes), then measure."""
    overrides = [*ROWS[name][1], *extra, f"output.dir={out}", f"logging.summary_samples={SAMPLES}"]
    if f"model.pretrained={NO_CLAMP}" in overrides:
        write_no_clamp_model()
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/digits.yaml"),
                    *overrides], check=True, cwd=ROOT)
    write_measure(out)


def write_measure(out: str) -> None:
    with open(os.path.join(out, "diagnosis.json"), "w") as f:
        json.dump(measure(out), f, indent=1)


def measure(folder: str) -> dict:
    """The summary's numbers, a second measurement of the distance on draws of its own, and where the excess sits: KL
    by phase, the gap split by outcome.

    summary.json measures every run on the same seed (12345), whose draws sit high for the digit reward: its optimum
    reads 0.2–0.3 nats low, and every row shares that error. This draws SAMPLES trained and SAMPLES base paths from
    another seed (777), estimates the optimum from both, and measures the distance (`evaluation.distance`) against it."""
    import torch

    from sb_finetune.config import load_config
    from sb_finetune.data import load_prompts
    from sb_finetune.evaluation import distance, mixture_optimum, sample_paths
    from sb_finetune.pipelines import load_finetuned
    from sb_finetune.rewards import load_reward

    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    cfg = load_config(os.path.join(folder, "config.yaml"))
    pipe = load_finetuned(folder)
    reward = load_reward(cfg.reward.name, **cfg.reward.kwargs)
    fam = pipe.sb_model
    schedule = fam.sampler_schedule(cfg.sampler)
    prompts = load_prompts(cfg.prompts)
    paths = sample_paths(fam, fam.module, schedule, reward, prompts, SAMPLES, 128, seed=777)
    base = sample_paths(fam, fam.module, schedule, reward, prompts, SAMPLES, 128, seed=777, from_base=True)
    alpha = cfg.objective.alpha
    best = mixture_optimum(base, paths, alpha)
    second = distance(paths, alpha, best)
    per_path = alpha * paths.log_ratio.sum(1).double() - paths.reward.double() + alpha * best.log_z  # alpha·log dP_θ/dP*
    with torch.no_grad():
        hit = reward.logits(paths.images).argmax(1) == cfg.reward.kwargs.get("target", 0)
    t = schedule.timesteps
    phases = {"early": t >= 599, "mid": (t < 599) & (t >= 399), "late": t < 399}
    kl = paths.kl.mean(0)
    return {
        "name": os.path.basename(folder), "steps": summary["steps"], "seconds": summary["seconds"],
        "peak_rss_mb": summary.get("peak_rss_mb"), "target_fraction": summary["target_fraction_after"],
        "kl": summary["kl_after"], "objective": summary["objective_after"], "gap": summary["gap_after"]["objective"],
        "gap_se": summary["gap_after"]["objective_se"], "kl_excess": summary["gap_after"]["kl"],
        "optimum": summary["optimum"],
        "gap_777": second["objective"], "gap_777_se": second["objective_se"], "gap_777_by_kl": second["objective_by_kl"],
        "kl_excess_777": second["kl"],
        "optimum_777": {**best.numbers(), **reward.metrics(torch.cat([base.images, paths.images]), weights=best.weights)},
        **{f"kl_{p}": float(kl[m].sum()) for p, m in phases.items()},
        "hit_share": float(hit.float().mean()),
        "gap_from_hits": float((per_path * hit).mean()), "gap_from_misses": float((per_path * ~hit).mean()),
        "excess_per_hit": float(per_path[hit].mean()), "excess_per_miss": float(per_path[~hit].mean()) if (~hit).any() else math.nan,
        "kl_per_step": summary["kl_per_step_after"],
    }


def report(rows: list[dict]) -> None:
    print("gap = alpha·KL(P_θ ‖ P*) on paths (nats, ± standard error; summary.json's, seed 12345); KL excess = KL − KL*;"
          " frac = target fraction; * = the row's own optimum (base and trained samples together); gap 777 = the same"
          " measured again on 512 + 512 draws of seed 777 (KL excess 777 likewise); KL by phase; the gap split by outcome")
    print(f"{'row':20s} {'cause':17s} {'gap':>11s} {'KL excess':>9s} {'gap 777':>11s} {'KL exc 777':>10s} {'frac (*)':>13s} "
          f"{'objective (*)':>13s} {'KL early/mid/late':>17s} {'gap: hits + misses':>18s} {'per miss':>8s} {'sec':>5s} {'RSS MB':>7s}")
    for r in rows:
        cause, opt = ROWS.get(r["name"], ("",))[0], r["optimum"]
        print(f"{r['name']:20s} {cause:17s} {r['gap']:5.2f} ± {r['gap_se']:.2f} {r['kl_excess']:9.2f} "
              f"{r.get('gap_777', math.nan):5.2f} ± {r.get('gap_777_se', math.nan):.2f} {r.get('kl_excess_777', math.nan):10.2f} "
              f"{r['target_fraction']:6.3f} ({opt.get('target_fraction', math.nan):.3f}) {r['objective']:5.2f} ({opt['objective']:5.2f}) "
              f"{r['kl_early']:5.2f}/{r['kl_mid']:4.2f}/{r['kl_late']:4.2f}   {r['gap_from_hits']:5.2f} + {r['gap_from_misses']:4.2f}    "
              f"{r['excess_per_miss']:8.2f} {r['seconds']:5.0f} {r['peak_rss_mb'] or math.nan:7.0f}")


def default_problem():
    """The digits default's config, family, schedule, base denoiser, reward model and R(x_N) (the chain's last state)."""
    import torch

    from sb_finetune.config import load_config
    from sb_finetune.data import load_pipeline
    from sb_finetune.families import family_of
    from sb_finetune.rewards import load_reward

    torch.set_flush_denormal(True)
    cfg = load_config(os.path.join(ROOT, "configs/digits.yaml"))
    fam = family_of(load_pipeline(cfg.model))
    schedule = fam.sampler_schedule(cfg.sampler)
    base = fam.denoiser(fam.module, fam.encode(None, 1))
    judge = load_reward(cfg.reward.name, **cfg.reward.kwargs)

    def reward(x):
        return judge(fam.decode(x), [""] * x.shape[0])

    return cfg, fam, schedule, base, judge, reward


def optimum_fraction(paths: int = 8192, seed: int = 4242, chunk: int = 256) -> None:
    """The optimum's own target fraction, from base paths alone: E_base[w · 1[argmax = target]] / E_base[w] with
    w = exp(R/alpha), its bootstrap spread, and −alpha·log Z: where issue 13's target fraction (≥ 0.95) sits."""
    import torch

    from sb_finetune.objective import tilted_optimum
    from sb_finetune.rollout import rollout

    cfg, fam, schedule, base, judge, _ = default_problem()
    g, rewards, hits = torch.Generator().manual_seed(seed), [], []
    with torch.no_grad():
        for start in range(0, paths, chunk):
            x = torch.randn(min(chunk, paths - start), 1, 16, 16, generator=g)
            images = fam.decode(rollout(base, base, schedule, x, window=0, generator=g).x)
            rewards.append(judge(images, [""] * len(images)).float())
            hits.append((judge.logits(images).argmax(1) == cfg.reward.kwargs["target"]).double())
    best, hit = tilted_optimum(torch.cat(rewards), cfg.objective.alpha), torch.cat(hits)
    w = best.weights.double()
    pick = torch.randint(len(w), (500, len(w)), generator=torch.Generator().manual_seed(0))
    boot = (w[pick] * hit[pick]).sum(1) / w[pick].sum(1)
    print(f"{paths} base paths: the optimum's target fraction {float((w * hit).sum()):.4f} (bootstrap sd "
          f"{float(boot.std()):.4f}), the base's {float(hit.mean()):.3f}; optimum objective {best.objective:.3f} ± "
          f"{best.objective_se:.3f}, KL {best.kl:.3f}, ESS {best.ess:.0f}")


def optimum_profile(continuations: int = 32, paths: int = 48, n_base: int = 2048) -> None:
    """The optimum's per-step KL on the 20-step chain, from base paths resampled by exp(R/alpha) and base continuations
    from each of their states (`sb_finetune.objective.optimum_kl_profile`), beside its total KL(p* ‖ p_base)."""
    import torch

    from sb_finetune.objective import optimum_kl_profile, tilted_optimum
    from sb_finetune.rollout import rollout

    cfg, fam, schedule, base, judge, reward = default_problem()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        states, rewards = [], []
        for _ in range(n_base // 512):
            out = rollout(base, base, schedule, torch.randn(512, 1, 16, 16, generator=g), window=0, generator=g, return_trajectory=True)
            states.append(torch.stack(out.trajectory))
            rewards.append(reward(out.x))
        states, r = torch.cat(states, 1), torch.cat(rewards)
        best = tilted_optimum(r, cfg.objective.alpha)
        pick = torch.multinomial(best.weights.double(), paths, replacement=True, generator=g)
        profile, gaussian = optimum_kl_profile(base, schedule, reward, cfg.objective.alpha, list(states[:, pick]), continuations,
                                               generator=g)
    print(f"optimum from {n_base} base samples: objective {best.objective:.3f}, KL {best.kl:.3f} (ESS {best.ess:.0f})")
    print("timestep   " + " ".join(f"{int(t):5d}" for t in schedule.timesteps))
    print("KL*_k      " + " ".join(f"{float(v):5.2f}" for v in profile) + f"   sum {float(profile.sum()):.2f}")
    print("cumulative " + " ".join(f"{float(v):5.2f}" for v in profile.cumsum(0)))
    print("mean-shift " + " ".join(f"{float(v):5.2f}" for v in gaussian) + f"   sum {float(gaussian.sum()):.2f}")


def gap_profile_of(folder: str, paths: int = 96, continuations: int = 8) -> None:
    """Where along the chain a trained control loses to the optimum (`sb_finetune.objective.gap_profile`): G_k on
    `paths` of its own paths, log h from `continuations` chains of the control itself at each of their states,
    reweighted to the base's (~10 minutes at the defaults); log Z from the row's second measurement (diagnosis.json's
    optimum_777) or its summary. → gap_profile.json"""
    import torch

    from sb_finetune.config import load_config
    from sb_finetune.control import base_denoiser
    from sb_finetune.objective import gap_profile
    from sb_finetune.pipelines import load_finetuned
    from sb_finetune.rewards import load_reward
    from sb_finetune.rollout import rollout

    torch.set_flush_denormal(True)
    cfg = load_config(os.path.join(folder, "config.yaml"))
    fam = load_finetuned(folder).sb_model
    schedule = fam.sampler_schedule(cfg.sampler)
    judge = load_reward(cfg.reward.name, **cfg.reward.kwargs)
    policy = fam.denoiser(fam.module, fam.encode(None, 1))
    base = base_denoiser(policy, fam.module)
    measured = os.path.join(folder, "diagnosis.json")
    with open(measured if os.path.isfile(measured) else os.path.join(folder, "summary.json")) as f:
        numbers = json.load(f)
    optimum = numbers.get("optimum_777") or numbers["optimum"]
    alpha = cfg.objective.alpha

    def reward(x):
        return judge(fam.decode(x), [""] * x.shape[0])

    g = torch.Generator().manual_seed(2024)
    with torch.no_grad():
        x = fam.start_noise(fam.latent_shape(paths, cfg.model.resolution, cfg.model.resolution), g, torch.device("cpu"))
        out = rollout(policy, base, schedule, x, window=0, generator=g, return_trajectory=True)
        profile = gap_profile(base, schedule, reward, alpha, out.trajectory, out.log_ratio, -optimum["objective"] / alpha,
                              continuations, generator=g, proposal=policy)
    steps = profile[1:] - profile[:-1]
    t = schedule.timesteps
    phases = {"early": t >= 599, "mid": (t < 599) & (t >= 399), "late": t < 399}
    print(f"{os.path.basename(folder)}: gap made along the chain (G_k: alpha·KL of the first k steps to P*'s; {paths} paths, "
          f"{continuations} continuations a state; optimum objective {optimum['objective']:.3f})")
    print("timestep   " + " ".join(f"{int(v):5d}" for v in t))
    print("G_k+1      " + " ".join(f"{float(v):5.2f}" for v in profile[1:]) + f"   (G_0 {float(profile[0]):.2f})")
    print("step's gap " + " ".join(f"{float(v):5.2f}" for v in steps))
    print("KL_k       " + " ".join(f"{float(v):5.2f}" for v in out.kl.mean(0)))
    print("by phase: " + ", ".join(f"{p} {float(steps[m].sum()):.2f}" for p, m in phases.items()))
    with open(os.path.join(folder, "gap_profile.json"), "w") as f:
        json.dump({"paths": paths, "continuations": continuations, "timesteps": [int(v) for v in t],
                   "G": [round(float(v), 4) for v in profile], "kl_per_step": [round(float(v), 4) for v in out.kl.mean(0)],
                   **{f"gap_{p}": float(steps[m].sum()) for p, m in phases.items()}}, f, indent=1)


def gradient_noise(folder: str, batches: int = 16, overrides: list[str] | None = None) -> None:
    """At a trained adapter: the mean of `batches` independent gradients against their spread. A stationary control
    has a mean no larger than the mean's own noise. `overrides` change the estimator the gradient is taken with (e.g.
    objective.window_min=20: the full window's, the unbiased gradient of the objective itself)."""
    import torch

    from sb_finetune.config import load_config
    from sb_finetune.control import add_lora_control, base_denoiser, frozen_denoiser, load_lora_control
    from sb_finetune.data import load_pipeline
    from sb_finetune.estimators import Task, make_estimator
    from sb_finetune.families import family_of
    from sb_finetune.rewards import load_reward

    torch.set_flush_denormal(True)
    cfg = load_config(os.path.join(folder, "config.yaml"), list(overrides or []))
    fam = family_of(load_pipeline(cfg.model))
    params = add_lora_control(fam.module, cfg.control.rank, cfg.control.lora_alpha, cfg.control.target_modules, cfg.control.init)
    load_lora_control(fam.module, folder)
    schedule = fam.sampler_schedule(cfg.sampler)
    judge = load_reward(cfg.reward.name, **cfg.reward.kwargs)
    b = cfg.optim.batch_size
    policy = fam.denoiser(fam.module, fam.encode(None, b))
    base, frozen = base_denoiser(policy, fam.module), frozen_denoiser(policy, fam.module)
    estimator = make_estimator(cfg.objective)
    grads = []
    for i in range(batches):
        g = torch.Generator().manual_seed(10_000 + i)
        for p in params:
            p.grad = None
        est = estimator(Task(policy, base, schedule, torch.randn(b, 1, 16, 16, generator=g),
                             lambda x: judge(fam.decode(x), [""] * b), cfg.objective.alpha, generator=g,
                             shared=torch.Generator().manual_seed(i), frozen=frozen))
        est.backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    grads = torch.stack(grads)
    mean, spread = grads.mean(0), (grads - grads.mean(0)).pow(2).sum(1).mean().sqrt()
    signal = math.sqrt(max(float(mean.norm()) ** 2 - float(spread) ** 2 / batches, 0.0))
    print(f"{os.path.basename(folder):20s} {' '.join(overrides or [])} batch {b}, {batches} batches: |mean gradient| {float(mean.norm()):.2f} (its noise {float(spread) / math.sqrt(batches):.2f}, "
          f"signal ≈ {signal:.2f}); one batch's |gradient| {float(grads.norm(dim=1).mean()):.2f}: signal/noise per batch {signal / float(spread):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="*", default=list(ROWS), help=f"rows to run, of {list(ROWS)}")
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs/digits_diagnosis"))
    parser.add_argument("--report-only", action="store_true", help="no training: the table of the rows already run")
    parser.add_argument("--measure-only", action="store_true", help="no training: measure the rows' trained folders again")
    parser.add_argument("--optimum-profile", action="store_true", help="the optimum's per-step KL (branching estimate)")
    parser.add_argument("--optimum-fraction", type=int, metavar="PATHS", help="the optimum's own target fraction from "
                        "that many base paths (8192: about 4 minutes)")
    parser.add_argument("--gradient-noise", action="store_true", help="mean gradient vs its noise at the rows' adapters")
    parser.add_argument("--gap-profile", action="store_true", help="where along the chain the rows' controls lose to the optimum")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every row (with --gradient-noise: for the gradient's estimator)")
    parser.add_argument("--batches", type=int, default=16, help="--gradient-noise: independent batch gradients")
    args = parser.parse_args()
    if args.optimum_fraction:
        optimum_fraction(args.optimum_fraction)
        return
    if args.optimum_profile:
        optimum_profile()
        return
    if args.gap_profile:
        for name in args.rows:
            gap_profile_of(name if os.path.isdir(name) else os.path.join(args.out, name))
        return
    if args.gradient_noise:
        for name in args.rows:
            gradient_noise(os.path.join(args.out, name), args.batches, args.set)
        return
    rows = []
    for name in args.rows:
        out = os.path.join(args.out, name)
        if args.measure_only:
            write_measure(out)
        elif not args.report_only:
            run_row(name, out, args.set)
        if os.path.isfile(os.path.join(out, "diagnosis.json")):
            with open(os.path.join(out, "diagnosis.json")) as f:
                rows.append(json.load(f))
    if rows:
        report(rows)


if __name__ == "__main__":
    main()
