"""Unconditional UNet2DModel bases (DDPMPipeline) with the memoryless SDE sampler and the LoRA control drift."""

from __future__ import annotations

import torch
from diffusers import DDPMPipeline

from .core import SBFinetunedMixin, check_call_inputs, finish, sample, sampler_grid


class SBDDPMPipeline(SBFinetunedMixin, DDPMPipeline):
    sb_family = "unet2d"
    _callback_tensor_inputs = ["latents"]

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | None = None, num_inference_steps: int | None = None,
                 eta: float = 1.0, latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] = ("latents",),
                 return_kl: bool = False, return_trajectory: bool = False, timesteps: list[int] | None = None,
                 **unsupported):
        """Sample `batch_size` images with the SDE (η = `eta`; 1 = DDPM, memoryless); `return_kl` adds the
        per-step KL to the base model. Steps: `timesteps` (a grid of one's own), else `num_inference_steps` on the
        scheduler's grid, else the grid the loaded adapter was trained on where it has its own, else 1,000."""
        check_call_inputs(self, generator, callback_on_step_end_tensor_inputs, unsupported)
        steps, timesteps = sampler_grid(self, num_inference_steps, timesteps, 1000)
        cond = self.sb_model.encode(None, batch_size)
        shape = self.sb_model.latent_shape(batch_size)
        result = sample(self, cond, shape, num_inference_steps=steps, eta=eta, generator=generator, timesteps=timesteps,
                        latents=latents, return_kl=return_kl, return_trajectory=return_trajectory,
                        callback=callback_on_step_end, callback_tensor_inputs=callback_on_step_end_tensor_inputs)
        return finish(self, result, output_type, return_dict, return_kl, return_trajectory)
