"""CLIP image preprocessing in torch, inside the autograd graph.

The same steps as open_clip's and transformers' CLIP transforms on a PIL image (resize the shortest side
with bicubic antialiasing, center crop, normalise), on a float tensor [B, 3, H, W] in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shortest(images: Tensor, size: int) -> Tensor:
    """Shortest side to `size` (long side rounded down, as torchvision's Resize(int)), bicubic + antialias."""
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    out = (size, new_long) if h <= w else (new_long, size)
    if (h, w) == out:
        return images
    return F.interpolate(images, size=out, mode="bicubic", antialias=True, align_corners=False)


def center_crop(images: Tensor, size: int) -> Tensor:
    h, w = images.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def clip_preprocess(images: Tensor, size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD) -> Tensor:
    """[B, 3, H, W] in [0, 1] → the normalised [B, 3, size, size] a CLIP image tower expects (differentiable)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    x = center_crop(resize_shortest(images.float(), size), size).clamp(0, 1)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
