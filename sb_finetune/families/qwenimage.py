"""Qwen-Image: QwenImageTransformer2DModel (MMDiT) on Qwen2.5-VL's last hidden states (with their mask), flow
matching with the resolution shift `mu`, a video VAE decoded one frame at a time with per-channel mean and std.

As for FLUX, the engine's state is the latent [B, C, h, w]; the 2×2 token packing and `img_shapes` live inside
`call`. CFG is the stock pipeline's "true CFG": the negative prompt ("" unless given) in its own call, the combined
prediction rescaled per token to the conditional one's norm. `guidance_scale` is that CFG scale (the stock
`true_cfg_scale`); 1 turns it off.
"""

from __future__ import annotations

import torch

from .base import Conditioning
from .flux import TokenFamily, pack, unpack


class QwenImage(TokenFamily):
    name = "qwenimage"
    pipeline = "SBQwenImagePipeline"
    adapter_prefix = "transformer"
    network = "QwenImageTransformer2DModel"

    @torch.no_grad()
    def encode(self, prompts, batch, guidance_scale=1.0, negative_prompt=None, size=None) -> Conditioning:
        prompts = list(prompts)
        c = self._text(prompts)
        if guidance_scale <= 1.0:
            return Conditioning(c, None, 1.0, len(prompts))
        neg = negative_prompt if negative_prompt is not None else ""
        neg = list(neg) if isinstance(neg, (list, tuple)) else [neg] * len(prompts)
        return Conditioning(c, self._text(neg), guidance_scale, len(prompts))

    def _text(self, prompts: list[str]) -> dict:
        embeds, mask = self.pipe.encode_prompt(prompts, device=self.pipe.device, num_images_per_prompt=1)
        if mask is None:  # the stock pipeline drops an all-ones mask; kept here, per sample, and dropped in `call`
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def call(self, module, x, t, c):
        b, _, h, w = x.shape
        mask = c["encoder_hidden_states_mask"]
        out = module(hidden_states=pack(x), timestep=t.to(x.dtype) / 1000, encoder_hidden_states=c["encoder_hidden_states"],
                     encoder_hidden_states_mask=None if bool(mask.all()) else mask, img_shapes=[[(1, h // 2, w // 2)]] * b,
                     return_dict=False)[0]
        return unpack(out, x.shape)

    def denoiser(self, module, cond, dtype=None):
        """Its true CFG: conditional and negative calls apart (their texts differ in length), then rescaled."""
        dtype = dtype or next(getattr(module, "module", module).parameters()).dtype
        if cond.uncond is None or cond.guidance_scale <= 1.0:
            return super().denoiser(module, cond, dtype)

        def predict(x, t):
            xin, tt = x.to(dtype), t.to(x.device).expand(x.shape[0])
            pc = pack(self.call(module, xin, tt, cond.cond).float())
            pu = pack(self.call(module, xin, tt, cond.uncond).float())
            mixed = pu + cond.guidance_scale * (pc - pu)
            return unpack(mixed * (pc.norm(dim=-1, keepdim=True) / mixed.norm(dim=-1, keepdim=True)), x.shape)

        return predict

    def decode(self, latents):
        vae = self.pipe.vae
        view = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(view)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(view)
        z = latents.unsqueeze(2) * std + mean  # one frame
        image = vae.decode(z.to(vae.dtype)).sample[:, :, 0].float()
        return (image / 2 + 0.5).clamp(0, 1)
