"""FLUX.1 [dev] and [schnell]: FluxTransformer2DModel on T5 hidden states and pooled CLIP, flow matching with the
resolution-dependent shift `mu`, the VAE's scale and shift on decode.

The engine's state is the VAE latent [B, C, h, w]; FLUX's 2×2 packing into tokens ([B, h/2 · w/2, 4C]) and its
image ids live inside `call` (packing is a permutation, so the SDE's math is unchanged, and the start noise drawn
in that shape is the stock pipeline's, token for token). [dev] is guidance-distilled: `guidance_scale` is the
guidance embedding, one model call per step (no CFG doubling); [schnell] has none.
"""

from __future__ import annotations

import numpy as np
import torch

from ..sde import flow_schedule
from .base import Conditioning, Family


class TokenFamily(Family):
    """A flow family whose transformer sees the latent as 2×2 tokens (FLUX, Qwen-Image): the image size must fit the
    tokens, the pipeline's default_sample_size sets the native size, and the σ grid is shifted for the token count."""

    def default_size(self) -> tuple[int, int]:
        side = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return side, side

    def latent_shape(self, batch, height=None, width=None):
        h0, w0 = self.default_size()
        height, width = height or h0, width or w0
        p = self.pipe.vae_scale_factor * 2  # VAE downsampling, then 2×2 tokens
        if height % p or width % p:
            raise ValueError(f"height and width must be multiples of {p}, got {height}×{width}")
        return (batch, self.module.config.in_channels // 4, height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor)

    def schedule(self, steps, eta=1.0, flow_method="posterior", size=None, timesteps=None):
        if timesteps is not None:
            return super().schedule(steps, eta, flow_method, size, timesteps)  # refused there: a flow scheduler
        height, width = size or self.default_size()
        tokens = (height // self.pipe.vae_scale_factor // 2) * (width // self.pipe.vae_scale_factor // 2)
        return token_shifted_schedule(self.pipe.scheduler, steps, eta, flow_method, tokens)


class Flux(TokenFamily):
    name = "flux"
    pipeline = "SBFluxPipeline"
    adapter_prefix = "transformer"
    network = "FluxTransformer2DModel"
    vae_shift = True
    max_sequence_length = 512  # T5 tokens, as the stock pipeline

    @torch.no_grad()
    def encode(self, prompts, batch, guidance_scale=1.0, negative_prompt=None, size=None) -> Conditioning:
        if negative_prompt:
            raise ValueError("FLUX here takes no negative prompt: [dev] is guidance-distilled (guidance_scale is its "
                             "guidance embedding), and true CFG is not supported yet")
        prompts = list(prompts)
        pe, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.pipe.device,
                                                num_images_per_prompt=1, max_sequence_length=self.max_sequence_length)
        c = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        if self.module.config.guidance_embeds:  # [dev]: the distilled guidance, per sample
            c["guidance"] = torch.full((len(prompts),), float(guidance_scale), device=pe.device, dtype=torch.float32)
        return Conditioning(c, None, 1.0, len(prompts))

    def call(self, module, x, t, c):
        b, _, h, w = x.shape
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(c["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=x.dtype)
        out = module(hidden_states=pack(x), timestep=t.to(x.dtype) / 1000, guidance=c.get("guidance"),
                     pooled_projections=c["pooled_projections"], encoder_hidden_states=c["encoder_hidden_states"],
                     txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return unpack(out, x.shape)


def pack(x: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] → 2×2 tokens [B, h/2 · w/2, 4C], in the order FLUX and Qwen-Image use."""
    b, ch, h, w = x.shape
    return x.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), ch * 4)


def unpack(tokens: torch.Tensor, shape) -> torch.Tensor:
    """`pack`'s inverse, back to `shape` = (B, C, h, w)."""
    b, ch, h, w = shape
    return tokens.view(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)


def token_shifted_schedule(scheduler, steps: int, eta: float, flow_method: str, tokens: int):
    """The grid FLUX's and Qwen-Image's stock pipelines use: σ from 1 to 1/N, shifted by mu for the image's token
    count where the scheduler shifts dynamically."""
    config = scheduler.config
    kwargs = {"sigmas": np.linspace(1.0, 1 / steps, steps)}
    if config.get("use_dynamic_shifting", False):
        kwargs["mu"] = shift_mu(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    return flow_schedule(scheduler, steps, eta, flow_method, **kwargs)


def shift_mu(tokens: int, base_tokens: int, max_tokens: int, base_shift: float, max_shift: float) -> float:
    """FLUX's resolution-dependent shift: linear in the image's token count from (base_tokens, base_shift) to
    (max_tokens, max_shift)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return tokens * slope + base_shift - slope * base_tokens
