"""Stable Diffusion 1.x / 2.x: UNet2DConditionModel on CLIP text hidden states; VP scheduler."""

from __future__ import annotations

import torch

from .base import Conditioning, Family


def negatives(prompts: list[str], guidance_scale: float, negative_prompt) -> list[str] | None:
    """The negative prompts for CFG, one per prompt; None (no CFG, or none given) lets the stock pipeline's own
    convention apply ("" for SD/SD3, zeros for SDXL's force_zeros_for_empty_prompt), as its `__call__` does."""
    if guidance_scale <= 1.0 or negative_prompt is None:
        return None
    return list(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else [negative_prompt] * len(prompts)


class StableDiffusion(Family):
    name = "sd"
    pipeline = "SBStableDiffusionPipeline"

    @classmethod
    def matches(cls, pipe) -> bool:
        return getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder", None) is not None

    @torch.no_grad()
    def encode(self, prompts, batch, guidance_scale=1.0, negative_prompt=None, size=None) -> Conditioning:
        prompts, cfg = list(prompts), guidance_scale > 1.0
        pe, ne = self.pipe.encode_prompt(prompts, self.pipe.device, 1, cfg,
                                         negative_prompt=negatives(prompts, guidance_scale, negative_prompt))
        return Conditioning({"encoder_hidden_states": pe}, {"encoder_hidden_states": ne} if cfg else None,
                            guidance_scale, len(prompts))

    def call(self, module, x, t, c):
        return module(x, t, encoder_hidden_states=c["encoder_hidden_states"]).sample
