"""Weight-free differentiable rewards, for tests, smoke runs and examples."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Reward, register_reward


@register_reward("brightness")
class Brightness(Reward):
    """Mean pixel intensity in [0, 1]."""

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images.float().mean(dim=(1, 2, 3))


@register_reward("color")
class TargetColor(Reward):
    """−mean squared distance of every pixel to an RGB colour (default red)."""

    def __init__(self, rgb: tuple[float, float, float] | list[float] = (1.0, 0.0, 0.0)):
        super().__init__()
        self.register_buffer("rgb", torch.tensor(list(rgb), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return -(images.float() - self.rgb).pow(2).mean(dim=(1, 2, 3))


@register_reward("contrast")
class Contrast(Reward):
    """Per-image standard deviation of the pixels."""

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images.float().flatten(1).std(dim=1)
