"""Evaluation during training: the current control on fixed prompts and seeds, as an image grid."""

from __future__ import annotations

import inspect
import os

import torch

from . import models
from .control import base_denoiser
from .objective import tilted_optimum
from .rollout import rollout


@torch.no_grad()
def eval_grid(pipe, module, family: str, schedule, prompts: list[str], seeds: list[int], guidance_scale: float = 1.0,
              negative_prompt: str | None = None, resolution: int | None = None) -> tuple[torch.Tensor, float]:
    """Images [len(prompts) · len(seeds), 3, H, W] in [0, 1] (row = prompt, column = seed) and their mean path KL."""
    cond = models.encode(pipe, family, prompts, len(prompts), guidance_scale, negative_prompt or None)
    policy = models.make_denoiser(module, family, cond)
    base = base_denoiser(policy, module)
    columns, kls = [], []
    device = next(module.parameters()).device
    for seed in seeds:
        g = torch.Generator(device).manual_seed(int(seed))
        x = models.start_noise(pipe, models.latent_shape(pipe, family, len(prompts), resolution), g, device)
        out = rollout(policy, base, schedule, x, window=0, generator=g)
        columns.append(models.decode(pipe, family, out.x))
        kls.append(out.kl.sum(1))
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
        policy = models.make_denoiser(module, family, cond)
        x = models.start_noise(pipe, models.latent_shape(pipe, family, len(chunk), resolution), g, device)
        out = rollout(policy, base_denoiser(policy, module), schedule, x, window=0, generator=g)
        decoded = models.decode(pipe, family, out.x)
        images.append(decoded.cpu())
        rewards.append(reward(decoded, chunk).float().cpu())
        kls.append(out.kl.sum(1).cpu())
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
