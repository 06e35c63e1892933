"""Stable Diffusion 1.x/2.x, SDXL and SD3 with the memoryless SDE sampler and the LoRA control drift.

Each subclasses the stock diffusers pipeline and overrides `__call__` only (loading, saving, LoRA loading,
offloading are the stock ones). `eta=1` is the memoryless sampler the adapter was trained with (for SD/SDXL
the DDPM posterior step, for SD3 the exact flow posterior step); lower eta is less noisy but not the process
the fine-tuning targets.
"""

from __future__ import annotations

import torch
from diffusers import (FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)

from .core import SBFinetunedMixin, check_call_inputs, finish, sample, sampler_grid


def _text_to_image(pipe, prompt, height, width, num_inference_steps, guidance_scale, negative_prompt, num_images_per_prompt,
                   eta, flow_method, generator, latents, output_type, return_dict, callback_on_step_end,
                   callback_on_step_end_tensor_inputs, return_kl, return_trajectory, timesteps, unsupported):
    check_call_inputs(pipe, generator, callback_on_step_end_tensor_inputs, unsupported)
    num_inference_steps, timesteps = sampler_grid(pipe, num_inference_steps, timesteps, pipe.sb_default_steps)
    if prompt is None:
        raise ValueError(f"{type(pipe).__name__}: give a prompt (a string or a list of strings)")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    if isinstance(negative_prompt, (list, tuple)):
        negative_prompt = [n for n in negative_prompt for _ in range(num_images_per_prompt)]
    fam = pipe.sb_model
    default_h, default_w = fam.default_size()
    height, width = height or default_h, width or default_w
    shape = fam.latent_shape(len(prompts), height, width)  # checks the size fits the latent grid
    cond = fam.encode(prompts, len(prompts), guidance_scale, negative_prompt, size=(height, width))
    extras = {
        "prompt_embeds": cond.cond["encoder_hidden_states"],
        "negative_prompt_embeds": cond.uncond["encoder_hidden_states"] if cond.uncond else None,
        "pooled_prompt_embeds": cond.cond.get("pooled_projections"),
        "add_text_embeds": cond.cond.get("text_embeds"),
        "add_time_ids": cond.cond.get("time_ids"),
    }
    result = sample(pipe, cond, shape, num_inference_steps=num_inference_steps, eta=eta, flow_method=flow_method,
                    generator=generator, latents=latents, return_kl=return_kl, return_trajectory=return_trajectory,
                    callback=callback_on_step_end, callback_tensor_inputs=callback_on_step_end_tensor_inputs,
                    extra_tensors={k: v for k, v in extras.items() if v is not None}, size=(height, width),
                    timesteps=timesteps)
    return finish(pipe, result, output_type, return_dict, return_kl, return_trajectory)


class SBTextToImageMixin(SBFinetunedMixin):
    """The one `__call__` of the text-to-image pipelines; defaults per model from the class attributes."""

    sb_default_steps: int = 50
    sb_default_guidance: float = 7.5

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 1.0,
                 flow_method: str = "posterior", generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",), return_kl: bool = False,
                 return_trajectory: bool = False, timesteps: list[int] | None = None, **unsupported):
        """Sample with the memoryless SDE (η = `eta`; 1 = memoryless, 0 = the adapted model's ODE).

        Flow models (SD3): `flow_method` "posterior" (exact step, no singularity at σ = 1) or "euler_maruyama".
        `return_kl` adds the per-step KL of each path to the base model (nats), `return_trajectory` the states.
        `timesteps` (VP models): a grid of one's own; with neither it nor `num_inference_steps`, the grid the loaded
        adapter was trained on where it has its own (`sampler.timesteps`).
        Returns `SBPipelineOutput(images, kl, trajectory)`, or that tuple with `return_dict=False`."""
        return _text_to_image(self, prompt, height, width, num_inference_steps,
                              self.sb_default_guidance if guidance_scale is None else guidance_scale, negative_prompt,
                              num_images_per_prompt, eta, flow_method, generator, latents, output_type, return_dict,
                              callback_on_step_end, callback_on_step_end_tensor_inputs, return_kl, return_trajectory,
                              timesteps, unsupported)


class SBStableDiffusionPipeline(SBTextToImageMixin, StableDiffusionPipeline):
    sb_family = "sd"


class SBStableDiffusionXLPipeline(SBTextToImageMixin, StableDiffusionXLPipeline):
    sb_family = "sdxl"
    sb_default_guidance = 5.0


class SBStableDiffusion3Pipeline(SBTextToImageMixin, StableDiffusion3Pipeline):
    sb_family = "sd3"
    sb_default_steps = 28
    sb_default_guidance = 7.0


class SBFluxPipeline(SBTextToImageMixin, FluxPipeline):
    """FLUX.1 [dev] / [schnell]: `guidance_scale` is [dev]'s guidance embedding (one model call a step, no CFG);
    callbacks see the latents unpacked, [B, C, h, w] (the stock pipeline's are packed into 2×2 tokens)."""

    sb_family = "flux"
    sb_default_steps = 28
    sb_default_guidance = 3.5


class SBQwenImagePipeline(SBTextToImageMixin, QwenImagePipeline):
    """Qwen-Image: `guidance_scale` is the stock pipeline's true CFG scale (`true_cfg_scale`), against
    `negative_prompt` ("" when not given; the stock pipeline skips CFG then); callbacks see the latents unpacked."""

    sb_family = "qwenimage"
    sb_default_steps = 50
    sb_default_guidance = 4.0
