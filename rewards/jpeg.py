"""JPEG compressibility (DDPO's task): −size in kB of the image saved as JPEG. Not differentiable."""

from __future__ import annotations

import io

import torch
from torch import Tensor

from .registry import Reward, register_reward


@register_reward("jpeg_compressibility")
class JpegCompressibility(Reward):
    """−(JPEG size in kB) at `quality`; higher is more compressible. Declared non-differentiable: the gradient
    trainer refuses it (use it for evaluation, or with a score-function method)."""

    differentiable = False

    def __init__(self, quality: int = 95):
        super().__init__()
        self.quality = int(quality)

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        from PIL import Image

        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000.0)
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device)
