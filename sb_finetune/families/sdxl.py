"""SDXL: UNet2DConditionModel on two CLIP encoders' hidden states, with pooled text and size ("time ids")
conditioning; VP scheduler."""

from __future__ import annotations

import torch

from .base import Conditioning, Family
from .sd import negatives


class StableDiffusionXL(Family):
    name = "sdxl"
    pipeline = "SBStableDiffusionXLPipeline"

    @classmethod
    def matches(cls, pipe) -> bool:
        return getattr(pipe, "unet", None) is not None and hasattr(pipe, "text_encoder_2") and hasattr(pipe, "_get_add_time_ids")

    @torch.no_grad()
    def encode(self, prompts, batch, guidance_scale=1.0, negative_prompt=None, size=None) -> Conditioning:
        pipe, prompts, cfg = self.pipe, list(prompts), guidance_scale > 1.0
        pe, ne, pooled, npooled = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1,
                                                     do_classifier_free_guidance=cfg,
                                                     negative_prompt=negatives(prompts, guidance_scale, negative_prompt))
        size = tuple(size or self.default_size())
        dim = pipe.text_encoder_2.config.projection_dim
        ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype, text_encoder_projection_dim=dim)
        ids = ids.to(pipe.device).repeat(len(prompts), 1)
        c = {"encoder_hidden_states": pe, "text_embeds": pooled, "time_ids": ids}
        u = {"encoder_hidden_states": ne, "text_embeds": npooled, "time_ids": ids} if cfg else None
        return Conditioning(c, u, guidance_scale, len(prompts))

    def call(self, module, x, t, c):
        added = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}
        return module(x, t, encoder_hidden_states=c["encoder_hidden_states"], added_cond_kwargs=added).sample
