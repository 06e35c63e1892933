"""Evaluation during training: image grids of the current control on fixed prompts and seeds, and the before/after
summary (summary.json, sample grids, curves.png)."""

from __future__ import annotations

import inspect
import json
import os

import torch

from . import models
from .config import Config
from .control import base_denoiser
from .objective import tilted_optimum
from .rollout import rollout


def _rollout_images(pipe, module, family: str, schedule, cond, n: int, generator: torch.Generator,
                    resolution: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of the current control from fresh noise: (decoded images [n, 3, H, W], path KL to the base [n])."""
    device = next(module.parameters()).device
    policy = models.make_denoiser(module, family, cond)
    x = models.start_noise(pipe, models.latent_shape(pipe, family, n, resolution), generator, device)
    out = rollout(policy, base_denoiser(policy, module), schedule, x, window=0, generator=generator)
    return models.decode(pipe, family, out.x), out.kl.sum(1)


@torch.no_grad()
def eval_grid(pipe, module, family: str, schedule, prompts: list[str], seeds: list[int], guidance_scale: float = 1.0,
              negative_prompt: str | None = None, resolution: int | None = None) -> tuple[torch.Tensor, float]:
    """Images [len(prompts) · len(seeds), 3, H, W] in [0, 1] (row = prompt, column = seed) and their mean path KL."""
    cond = models.encode(pipe, family, prompts, len(prompts), guidance_scale, negative_prompt or None)
    device = next(module.parameters()).device
    columns, kls = [], []
    for seed in seeds:
        images, kl = _rollout_images(pipe, module, family, schedule, cond, len(prompts),
                                     torch.Generator(device).manual_seed(int(seed)), resolution)
        columns.append(images)
        kls.append(kl)
    images = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: prompt i, seed j
    return images.cpu(), float(torch.cat(kls).mean())


def save_grid(images: torch.Tensor, columns: int, path: str) -> None:
    from torchvision.utils import save_image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image(images, path, nrow=columns, padding=2)


@torch.no_grad()
def summarize(pipe, module, family: str, schedule, reward, prompts: list[str], n: int, batch: int, seed: int = 12345,
              guidance_scale: float = 1.0, negative_prompt: str | None = None, resolution: int | None = None,
              alpha: float = 1.0, optimum: bool = False) -> tuple[dict, torch.Tensor]:
    """On n fresh samples of the current control (fixed seed): reward mean/std, path KL to the base (nats), the
    objective alpha·KL − E[R], and the reward's own `metrics(images)` if it has one. Returns (numbers, images).

    optimum: the samples are the base model's; also estimate what the optimal control reaches (`tilted_optimum`)
    under numbers["optimum"], with the reward's metrics reweighted to p* if it takes `weights`."""
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    images, rewards, kls = [], [], []
    for start in range(0, n, batch):
        chunk = [prompts[i % len(prompts)] for i in range(start, min(start + batch, n))]
        cond = models.encode(pipe, family, chunk, len(chunk), guidance_scale, negative_prompt or None)
        decoded, kl = _rollout_images(pipe, module, family, schedule, cond, len(chunk), g, resolution)
        images.append(decoded.cpu())
        rewards.append(reward(decoded, chunk).float().cpu())
        kls.append(kl.cpu())
    images, r, kl = torch.cat(images), torch.cat(rewards), torch.cat(kls)
    numbers = {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "kl": float(kl.mean()),
               "objective": alpha * float(kl.mean()) - float(r.mean())}
    if hasattr(reward, "metrics"):
        numbers.update(reward.metrics(images.to(device)))
    if optimum:
        best = tilted_optimum(r, alpha)
        numbers["optimum"] = {"objective": best.objective, "kl": best.kl, "reward_mean": best.reward_mean,
                              "effective_samples": best.ess}
        if "weights" in inspect.signature(getattr(reward, "metrics", lambda images: None)).parameters:
            numbers["optimum"].update(reward.metrics(images.to(device), weights=best.weights.to(device)))
    return numbers, images


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


def make_evaluator(accelerator, cfg: Config, pipe, module, family: str, schedule, prompts: list[str]):
    """evaluate(step): on the main process, an image grid of eval prompts × seeds → samples/step_XXXXXX.png + trackers."""
    eval_prompts = list(cfg.logging.eval_prompts) or prompts[:4]
    if family == "unet2d":
        eval_prompts = [""] * max(len(cfg.logging.eval_prompts), 4)
    done = set()

    def evaluate(step: int) -> None:
        if not cfg.logging.eval_every or step in done or not accelerator.is_main_process:
            return
        done.add(step)
        images, kl = eval_grid(pipe, getattr(module, "module", module), family, schedule, eval_prompts, cfg.logging.eval_seeds,
                               cfg.sampler.guidance_scale, cfg.sampler.negative_prompt, cfg.model.resolution)
        save_grid(images, len(cfg.logging.eval_seeds), os.path.join(cfg.output.dir, "samples", f"step_{step:06d}.png"))
        for tracker in accelerator.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({"eval": images.permute(0, 2, 3, 1).numpy()}, step=step)
        if cfg.logging.tracker != "none":
            accelerator.log({"eval/kl": kl}, step=step)

    return evaluate


def write_summary(accelerator, cfg: Config, pipe, module, family: str, schedule, reward, prompts: list[str], when: str,
                  extra: dict | None = None, history: list[dict] | None = None) -> None:
    """With logging.summary_samples: numbers on fresh samples "before"/"after" training → summary.json,
    samples_<when>.png (the first 64) and, after, curves.png of reward and KL over the steps."""
    if not cfg.logging.summary_samples or not accelerator.is_main_process:
        return
    numbers, images = summarize(pipe, getattr(module, "module", module), family, schedule, reward, prompts,
                                cfg.logging.summary_samples, 4 * cfg.optim.batch_size, guidance_scale=cfg.sampler.guidance_scale,
                                negative_prompt=cfg.sampler.negative_prompt, resolution=cfg.model.resolution,
                                alpha=cfg.objective.alpha, optimum=when == "before")
    optimum = numbers.pop("optimum", None)
    save_grid(images[:64], 8, os.path.join(cfg.output.dir, f"samples_{when}.png"))
    path = os.path.join(cfg.output.dir, "summary.json")
    summary = {}
    if when == "after" and os.path.isfile(path):
        with open(path) as f:
            summary = json.load(f)
    summary.update(extra or {})
    summary.update({f"{k}_{when}": v for k, v in numbers.items()})
    if optimum:  # what the best control would reach, estimated from the base samples
        summary["optimum"] = optimum
    summary["samples"] = cfg.logging.summary_samples
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    if history:
        save_curves(history, os.path.join(cfg.output.dir, "curves.png"))
    accelerator.print(f"summary ({when}): " + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items()))
    if optimum:
        accelerator.print("optimum (estimated from these base samples): " + ", ".join(f"{k} {v:.4g}" for k, v in optimum.items()))
