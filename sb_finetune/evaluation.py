"""Evaluation during training: the current control on fixed prompts and seeds, as an image grid."""

from __future__ import annotations

import os

import torch

from . import models
from .control import base_denoiser
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
