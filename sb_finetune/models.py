"""One model contract for every family: a `Denoiser(x, t) -> prediction` with conditioning and CFG bound.

Families: "sd" (SD 1.x/2.x, UNet2DConditionModel), "sdxl", "sd3" (flow; FLUX shares the flow math but
not this conditioning yet), "unet2d" (unconditional UNet2DModel). Each family needs four things, kept
here as free functions: encode the prompts, call the denoiser, the start noise, decode to images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch
from torch import Tensor

from .rollout import Denoiser

FAMILIES = ("sd", "sdxl", "sd3", "unet2d")


def detect_family(pipe) -> str:
    name = type(pipe).__name__
    if "XL" in name:
        return "sdxl"
    if "3" in name or hasattr(pipe, "transformer"):
        return "sd3"
    if hasattr(pipe, "text_encoder"):
        return "sd"
    if hasattr(pipe, "unet"):
        return "unet2d"
    raise ValueError(f"cannot tell the model family of {name}; set model.family to one of {FAMILIES}")


def denoiser_module(pipe) -> torch.nn.Module:
    return pipe.transformer if hasattr(pipe, "transformer") and pipe.transformer is not None else pipe.unet


@dataclass
class Conditioning:
    """Per-sample conditioning; `uncond` set when classifier-free guidance is on (scale > 1)."""

    cond: dict[str, Tensor] = field(default_factory=dict)
    uncond: dict[str, Tensor] | None = None
    guidance_scale: float = 1.0
    batch: int = 0


@torch.no_grad()
def encode(pipe, family: str, prompts: list[str] | None, batch: int, guidance_scale: float = 1.0,
           negative_prompt: str | list[str] | None = None, size: tuple[int, int] | None = None) -> Conditioning:
    """Text conditioning for a batch (no grad: the text encoders are frozen). `size`: the image (h, w), for SDXL's
    size conditioning (default: the model's native size)."""
    cfg = guidance_scale > 1.0
    device = pipe.device
    if family == "unet2d":
        return Conditioning({}, None, 1.0, batch)
    prompts = list(prompts)
    # No negative prompt: None, so each pipeline applies its own convention ("" for SD/SD3, zeros for SDXL's
    # force_zeros_for_empty_prompt), as its stock __call__ does.
    neg = None
    if cfg and negative_prompt is not None:
        neg = list(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else [negative_prompt] * len(prompts)
    if family == "sd":
        pe, ne = pipe.encode_prompt(prompts, device, 1, cfg, negative_prompt=neg)
        return Conditioning({"encoder_hidden_states": pe}, {"encoder_hidden_states": ne} if cfg else None, guidance_scale, len(prompts))
    if family == "sdxl":
        pe, ne, pooled, npooled = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                     do_classifier_free_guidance=cfg, negative_prompt=neg)
        size = size or (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
        dim = pipe.text_encoder_2.config.projection_dim
        ids = pipe._get_add_time_ids(tuple(size), (0, 0), tuple(size), dtype=pe.dtype, text_encoder_projection_dim=dim)
        ids = ids.to(device).repeat(len(prompts), 1)
        c = {"encoder_hidden_states": pe, "text_embeds": pooled, "time_ids": ids}
        u = {"encoder_hidden_states": ne, "text_embeds": npooled, "time_ids": ids} if cfg else None
        return Conditioning(c, u, guidance_scale, len(prompts))
    if family == "sd3":
        pe, ne, pooled, npooled = pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                                     do_classifier_free_guidance=cfg, negative_prompt=neg)
        c = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        u = {"encoder_hidden_states": ne, "pooled_projections": npooled} if cfg else None
        return Conditioning(c, u, guidance_scale, len(prompts))
    raise ValueError(f"unknown model family {family!r}; one of {FAMILIES}")


def _call(module, family: str, x: Tensor, t: Tensor, c: dict[str, Tensor]) -> Tensor:
    tt = t.to(x.device).expand(x.shape[0])
    if family == "unet2d":
        return module(x, tt).sample
    if family == "sd":
        return module(x, tt, encoder_hidden_states=c["encoder_hidden_states"]).sample
    if family == "sdxl":
        added = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}
        return module(x, tt, encoder_hidden_states=c["encoder_hidden_states"], added_cond_kwargs=added).sample
    if family == "sd3":
        return module(hidden_states=x, timestep=tt, encoder_hidden_states=c["encoder_hidden_states"],
                      pooled_projections=c["pooled_projections"]).sample
    raise ValueError(f"unknown model family {family!r}; one of {FAMILIES}")


def make_denoiser(module, family: str, cond: Conditioning, dtype: torch.dtype | None = None) -> Denoiser:
    """The family's denoiser as the engine's contract; CFG batches uncond+cond in one call.

    The state arrives in fp32; it is cast to the model's dtype for the call and the prediction back to fp32.
    """
    dtype = dtype or next(getattr(module, "module", module).parameters()).dtype
    cfg = cond.uncond is not None and cond.guidance_scale > 1.0
    both = {k: torch.cat([cond.uncond[k], v]) for k, v in cond.cond.items()} if cfg else cond.cond

    def predict(x: Tensor, t: Tensor) -> Tensor:
        xin = x.to(dtype)
        if not cfg:
            return _call(module, family, xin, t, both).float()
        pu, pc = _call(module, family, torch.cat([xin, xin]), t, both).float().chunk(2)
        return pu + cond.guidance_scale * (pc - pu)

    return predict


def latent_shape(pipe, family: str, batch: int, resolution: int | None = None) -> tuple[int, ...]:
    module = denoiser_module(pipe)
    pixels_per_latent = 1 if family == "unet2d" else pipe.vae_scale_factor
    size = resolution // pixels_per_latent if resolution else module.config.sample_size
    return (batch, module.config.in_channels, size, size)


def start_noise(pipe, shape, generator: torch.Generator | None, device) -> Tensor:
    """x_0 ~ N(0, I) scaled by the scheduler's init_noise_sigma (1 for DDPM/DDIM and flow)."""
    sigma = float(getattr(pipe.scheduler, "init_noise_sigma", 1.0))
    return sigma * torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def decode(pipe, family: str, latents: Tensor) -> Tensor:
    """Latents → images in [0, 1], [B, 3, H, W], differentiable (the reward's gradient flows back)."""
    if family == "unet2d":
        images = (latents / 2 + 0.5).clamp(0, 1)
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # rewards take RGB
    vae = pipe.vae
    z = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if family == "sd3" and shift is not None:
        z = z + shift
    image = vae.decode(z.to(vae.dtype)).sample.float()
    return (image / 2 + 0.5).clamp(0, 1)

