"""SD3 / SD3.5: SD3Transformer2DModel (MMDiT) on CLIP-L ⊕ CLIP-G (⊕ T5) hidden states and pooled CLIP; flow
matching (FlowMatchEulerDiscreteScheduler with its shift); the VAE's shift factor on decode."""

from __future__ import annotations

import torch

from .base import Conditioning, Family
from .sd import negatives


class StableDiffusion3(Family):
    name = "sd3"
    pipeline = "SBStableDiffusion3Pipeline"
    adapter_prefix = "transformer"
    network = "SD3Transformer2DModel"
    vae_shift = True

    @torch.no_grad()
    def encode(self, prompts, batch, guidance_scale=1.0, negative_prompt=None, size=None) -> Conditioning:
        pipe, prompts, cfg = self.pipe, list(prompts), guidance_scale > 1.0
        pe, ne, pooled, npooled = pipe.encode_prompt(prompts, None, None, device=pipe.device, num_images_per_prompt=1,
                                                     do_classifier_free_guidance=cfg,
                                                     negative_prompt=negatives(prompts, guidance_scale, negative_prompt))
        c = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        u = {"encoder_hidden_states": ne, "pooled_projections": npooled} if cfg else None
        return Conditioning(c, u, guidance_scale, len(prompts))

    def call(self, module, x, t, c):
        return module(hidden_states=x, timestep=t, encoder_hidden_states=c["encoder_hidden_states"],
                      pooled_projections=c["pooled_projections"]).sample
