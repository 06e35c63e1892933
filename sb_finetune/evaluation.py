"""Evaluation during training: image grids of the current control on fixed prompts and seeds, and the before/after
summary (summary.json, sample grids, curves.png)."""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass

import torch

from .config import Config
from .control import base_denoiser
from .objective import tilted_optimum
from .rollout import path_log_ratio, rollout


def _rollout_images(fam, module, schedule, cond, n: int, generator: torch.Generator,
                    resolution: int | None, from_base: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n samples of the current control from fresh noise: (decoded images [n, 3, H, W], per-step KL to the base
    [n, N], per-step log dP_θ/dP_base of the sampled transitions [n, N]). from_base: sampled from the base model
    instead, scored against the control (the same log-ratio, now along base paths)."""
    device = next(module.parameters()).device
    policy = fam.denoiser(module, cond)
    base = base_denoiser(policy, module)
    x = fam.start_noise(fam.latent_shape(n, resolution, resolution), generator, device)
    if not from_base:
        out = rollout(policy, base, schedule, x, window=0, generator=generator)
        return fam.decode(out.x), out.kl, out.log_ratio
    out = rollout(base, base, schedule, x, window=0, generator=generator, return_trajectory=True, return_means=True)
    log_ratio = path_log_ratio(policy, schedule, out.trajectory, out.means)
    return fam.decode(out.x), out.kl, log_ratio


def _size(resolution: int | None) -> tuple[int, int] | None:
    return (resolution, resolution) if resolution else None


@torch.no_grad()
def eval_grid(fam, module, schedule, prompts: list[str], seeds: list[int], guidance_scale: float = 1.0,
              negative_prompt: str | None = None, resolution: int | None = None) -> tuple[torch.Tensor, float]:
    """Images [len(prompts) · len(seeds), 3, H, W] in [0, 1] (row = prompt, column = seed) and their mean path KL."""
    cond = fam.encode(prompts, len(prompts), guidance_scale, negative_prompt or None, _size(resolution))
    device = next(module.parameters()).device
    columns, kls = [], []
    for seed in seeds:
        images, kl, _ = _rollout_images(fam, module, schedule, cond, len(prompts),
                                        torch.Generator(device).manual_seed(int(seed)), resolution)
        columns.append(images)
        kls.append(kl.sum(1))
    images = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: prompt i, seed j
    return images.cpu(), float(torch.cat(kls).mean())


def save_grid(images: torch.Tensor, columns: int, path: str) -> None:
    from torchvision.utils import save_image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image(images, path, nrow=columns, padding=2)


@dataclass
class Paths:
    """n sampled paths: decoded images (CPU), rewards [n], per-step KL [n, N] and log dP_θ/dP_base [n, N]."""

    images: torch.Tensor
    reward: torch.Tensor
    kl: torch.Tensor
    log_ratio: torch.Tensor


@torch.no_grad()
def sample_paths(fam, module, schedule, reward, prompts: list[str], n: int, batch: int, seed: int = 12345,
                 guidance_scale: float = 1.0, negative_prompt: str | None = None, resolution: int | None = None,
                 from_base: bool = False) -> Paths:
    """n paths of the current control (or of the base, scored against the control) from a fixed seed, prompts in
    turn. The same seed gives the same base paths whatever the control (from_base, or before training)."""
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    images, rewards, kls, ratios = [], [], [], []
    for start in range(0, n, batch):
        chunk = [prompts[i % len(prompts)] for i in range(start, min(start + batch, n))]
        cond = fam.encode(chunk, len(chunk), guidance_scale, negative_prompt or None, _size(resolution))
        decoded, kl, log_ratio = _rollout_images(fam, module, schedule, cond, len(chunk), g, resolution, from_base)
        images.append(decoded.cpu())
        rewards.append(reward(decoded, chunk).float().cpu())
        kls.append(kl.cpu())
        ratios.append(log_ratio.cpu())
    return Paths(torch.cat(images), torch.cat(rewards), torch.cat(kls), torch.cat(ratios))


def _weighted_metrics(reward, images: torch.Tensor, weights: torch.Tensor, device) -> dict:
    """The reward's own metrics reweighted to p*, where it takes `weights` (else none)."""
    if "weights" not in inspect.signature(getattr(reward, "metrics", lambda images: None)).parameters:
        return {}
    return reward.metrics(images.to(device), weights=weights.to(device))


@torch.no_grad()
def summarize(fam, module, schedule, reward, prompts: list[str], n: int, batch: int, seed: int = 12345,
              guidance_scale: float = 1.0, negative_prompt: str | None = None, resolution: int | None = None,
              alpha: float = 1.0, optimum: str | None = None) -> tuple[dict, torch.Tensor]:
    """On n fresh samples of the current control (fixed seed): reward mean/std, path KL to the base (nats) and per
    step, the objective alpha·KL − E[R], and the reward's own `metrics(images)` if it has one. Returns (numbers,
    images).

    optimum="base": the control is still the base's; estimate what the optimal control reaches (`tilted_optimum`)
    from these samples under numbers["optimum"] (the reward's metrics reweighted to p* where it takes `weights`).
    optimum="both": also draw n base paths (the same seed: the same paths as "base" gave) scored against the
    control, and estimate the optimum from both sets (far more effective samples once the control is near it);
    numbers["gap"] is then the distance to it: the objective's excess alpha·KL(P_θ ‖ P*) on paths, estimated path
    by path as alpha·Σ log dP_θ/dP_base − R + alpha·log Z* (± its standard error), and the KL's excess."""
    device = next(module.parameters()).device
    args = (fam, module, schedule, reward, prompts, n, batch, seed, guidance_scale, negative_prompt, resolution)
    paths = sample_paths(*args)
    kl = paths.kl.sum(1)
    numbers = {"reward_mean": float(paths.reward.mean()), "reward_std": float(paths.reward.std()), "kl": float(kl.mean()),
               "objective": alpha * float(kl.mean()) - float(paths.reward.mean()),
               "kl_per_step": [round(float(v), 5) for v in paths.kl.mean(0)]}
    if hasattr(reward, "metrics"):
        numbers.update(reward.metrics(paths.images.to(device)))
    if optimum == "base":
        best = tilted_optimum(paths.reward, alpha)
        numbers["optimum"] = {**best.numbers(), "estimated_from": f"{n} base samples",
                              **_weighted_metrics(reward, paths.images, best.weights, device)}
    elif optimum == "both":
        base_paths = sample_paths(*args, from_base=True)
        r = torch.cat([base_paths.reward, paths.reward])
        log_ratio = torch.cat([base_paths.log_ratio, paths.log_ratio]).sum(1)
        # both sets, drawn from the mixture ½ P_base + ½ P_θ: its density to P_base is ½ + ½ exp(log dP_θ/dP_base)
        best = tilted_optimum(r, alpha, log_proposal=torch.logaddexp(torch.zeros_like(log_ratio), log_ratio) - math.log(2))
        images = torch.cat([base_paths.images, paths.images])
        numbers["optimum"] = {**best.numbers(), "estimated_from": f"{n} base and {n} trained samples",
                              **_weighted_metrics(reward, images, best.weights, device)}
        excess = alpha * paths.log_ratio.sum(1).double() - paths.reward.double() + alpha * best.log_z
        numbers["gap"] = {"objective": float(excess.mean()), "objective_se": float(excess.std()) / n**0.5,
                          "kl": float(kl.mean()) - best.kl}
    return numbers, paths.images


def save_curves(history: list[dict], path: str, keys: tuple[str, ...] = ("reward_mean", "kl")) -> None:
    """A PNG with one panel per key over the training steps (PIL only: no plotting dependency)."""
    from PIL import Image, ImageDraw

    w, h, pad = 480, 220, 64
    canvas = Image.new("RGB", (w, h * len(keys)), "white")
    draw = ImageDraw.Draw(canvas)
    for panel, key in enumerate(keys):
        values = [float(row[key]) for row in history if key in row and row[key] == row[key]]
        top = panel * h
        draw.rectangle([pad, top + 10, w - 10, top + h - pad], outline="black")
        draw.text((pad, top), f"{key}  (steps 1-{len(values)})", fill="black")
        if len(values) < 2:
            continue
        lo, hi = min(values), max(values)
        span = hi - lo or 1.0
        draw.text((2, top + 10), f"{hi:.3g}", fill="black")
        draw.text((2, top + h - pad - 10), f"{lo:.3g}", fill="black")
        points = [(pad + (w - 10 - pad) * i / (len(values) - 1), top + h - pad - (h - pad - 10) * (v - lo) / span)
                  for i, v in enumerate(values)]
        draw.line(points, fill="royalblue", width=2)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)


def make_evaluator(accelerator, cfg: Config, fam, module, schedule, prompts: list[str]):
    """evaluate(step): on the main process, an image grid of eval prompts × seeds → samples/step_XXXXXX.png + trackers."""
    eval_prompts = list(cfg.logging.eval_prompts) or prompts[:4]
    if not fam.conditional:  # one row per "prompt": as many rows as asked, or 4
        eval_prompts = [""] * max(len(cfg.logging.eval_prompts), 4)
    done = set()

    def evaluate(step: int) -> None:
        if not cfg.logging.eval_every or step in done or not accelerator.is_main_process:
            return
        done.add(step)
        images, kl = eval_grid(fam, getattr(module, "module", module), schedule, eval_prompts, cfg.logging.eval_seeds,
                               cfg.sampler.guidance_scale, cfg.sampler.negative_prompt, cfg.model.resolution)
        save_grid(images, len(cfg.logging.eval_seeds), os.path.join(cfg.output.dir, "samples", f"step_{step:06d}.png"))
        for tracker in accelerator.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({"eval": images.permute(0, 2, 3, 1).numpy()}, step=step)
        if cfg.logging.tracker != "none":
            accelerator.log({"eval/kl": kl}, step=step)

    return evaluate


def write_summary(accelerator, cfg: Config, fam, module, schedule, reward, prompts: list[str], when: str,
                  extra: dict | None = None, history: list[dict] | None = None) -> None:
    """With logging.summary_samples: numbers on fresh samples "before"/"after" training → summary.json,
    samples_<when>.png (the first 64) and, after, curves.png of reward and KL over the steps.

    summary.json's "optimum" is what the best control reaches, p_base tilted by exp(R/alpha): from the base samples
    before training, then from the base and the trained samples together ("optimum_base_only" keeps the first);
    "gap_after" is the trained control's distance to it, in nats."""
    if not cfg.logging.summary_samples or not accelerator.is_main_process:
        return
    numbers, images = summarize(fam, getattr(module, "module", module), schedule, reward, prompts,
                                cfg.logging.summary_samples, 4 * cfg.optim.batch_size, guidance_scale=cfg.sampler.guidance_scale,
                                negative_prompt=cfg.sampler.negative_prompt, resolution=cfg.model.resolution,
                                alpha=cfg.objective.alpha, optimum="base" if when == "before" else "both")
    optimum = numbers.pop("optimum", None)
    save_grid(images[:64], 8, os.path.join(cfg.output.dir, f"samples_{when}.png"))
    path = os.path.join(cfg.output.dir, "summary.json")
    summary = {}
    if when == "after" and os.path.isfile(path):
        with open(path) as f:
            summary = json.load(f)
    summary.update(extra or {})
    summary.update({f"{k}_{when}": v for k, v in numbers.items()})
    if optimum:
        if "optimum" in summary:
            summary["optimum_base_only"] = summary["optimum"]
        summary["optimum"] = optimum
    summary["samples"] = cfg.logging.summary_samples
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    if history:
        save_curves(history, os.path.join(cfg.output.dir, "curves.png"))
    accelerator.print(f"summary ({when}): " + _fmt(numbers))
    if optimum:
        accelerator.print(f"optimum (from {optimum['estimated_from']}): " + _fmt(optimum))


def _fmt(numbers: dict) -> str:
    def one(v):
        return f"{v:.4g}" if isinstance(v, float) else "{" + _fmt(v) + "}" if isinstance(v, dict) else None

    return ", ".join(f"{k} {one(v)}" for k, v in numbers.items() if one(v) is not None)
