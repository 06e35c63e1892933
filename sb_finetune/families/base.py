"""What every model family shares: the one model contract (a `Denoiser(x, t) -> prediction` with conditioning and
classifier-free guidance bound in), the start noise, the VAE decode and the schedule from the pipeline's scheduler.

A family is one object bound to a loaded pipeline (k-diffusion's model wrappers; diffusers' per-pipeline
encode_prompt / prepare_latents / decode): `encode` the prompts, `call` the denoiser module, `latent_shape`,
`start_noise`, `decode` to images in [0, 1], `schedule`, and its pipeline class. The trainer, evaluation and
pipelines hold the object and call it; only the files in this package know what a family is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..rollout import Denoiser
from ..sde import Schedule, make_schedule


@dataclass
class Conditioning:
    """Per-sample conditioning (every tensor batch-first, one row per sample); `uncond` set when classifier-free
    guidance is on (scale > 1)."""

    cond: dict[str, Tensor] = field(default_factory=dict)
    uncond: dict[str, Tensor] | None = None
    guidance_scale: float = 1.0
    batch: int = 0

    def repeat(self, n: int) -> "Conditioning":
        """The batch n times over ([c; c; …]): for one call at n copies of the states (`control.paired_denoiser`)."""
        def rep(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: torch.cat([v] * n) for k, v in d.items()}

        return Conditioning(rep(self.cond), None if self.uncond is None else rep(self.uncond), self.guidance_scale,
                            self.batch * n)


class Family:
    """One model family, bound to a pipeline. Subclasses set `name` and `pipeline` and implement `matches`,
    `encode` (if conditional) and `call`."""

    name: ClassVar[str] = ""
    pipeline: ClassVar[str] = ""  # our pipeline class, by name in sb_finetune.pipelines (imported when asked)
    conditional: ClassVar[bool] = True  # takes prompts
    adapter_prefix: ClassVar[str] = "unet"  # the LoRA file's key prefix (diffusers' loader: unet. or transformer.)
    network: ClassVar[str] = ""  # the denoiser's class name, where that alone tells the family
    vae_shift: ClassVar[bool] = False  # decode adds the VAE's shift_factor (SD3, FLUX), as their stock pipelines do

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    @classmethod
    def matches(cls, pipe) -> bool:
        """Whether `pipe` is of this family (by default: its denoiser is a `network`)."""
        return bool(cls.network) and type(getattr(pipe, cls.adapter_prefix, None)).__name__ == cls.network

    # ---- the model
    @property
    def module(self) -> torch.nn.Module:
        """The denoiser network (the UNet or transformer) the control adapts."""
        return getattr(self.pipe, self.adapter_prefix)

    def encode(self, prompts: list[str] | None, batch: int, guidance_scale: float = 1.0,
               negative_prompt: str | list[str] | None = None, size: tuple[int, int] | None = None) -> Conditioning:
        """Text conditioning for a batch, without gradient (the text encoders are frozen). `size`: the image (h, w)."""
        return Conditioning({}, None, 1.0, batch)

    def call(self, module, x: Tensor, t: Tensor, c: dict[str, Tensor]) -> Tensor:
        """One call of `module` (the network, possibly DDP-wrapped) on a batch: the model's own prediction."""
        raise NotImplementedError

    def denoiser(self, module, cond: Conditioning, dtype: torch.dtype | None = None) -> Denoiser:
        """The engine's contract; CFG batches uncond+cond in one call. The state arrives in fp32; it is cast to the
        model's dtype for the call and the prediction back to fp32."""
        dtype = dtype or next(getattr(module, "module", module).parameters()).dtype
        cfg = cond.uncond is not None and cond.guidance_scale > 1.0
        both = {k: torch.cat([cond.uncond[k], v]) for k, v in cond.cond.items()} if cfg else cond.cond

        def predict(x: Tensor, t: Tensor) -> Tensor:
            xin = x.to(dtype)
            tt = t.to(x.device).expand(xin.shape[0] * (2 if cfg else 1))
            if not cfg:
                return self.call(module, xin, tt, both).float()
            pu, pc = self.call(module, torch.cat([xin, xin]), tt, both).float().chunk(2)
            return pu + cond.guidance_scale * (pc - pu)

        return predict

    # ---- latents, images, schedule
    @property
    def pixels_per_latent(self) -> int:
        return self.pipe.vae_scale_factor

    def default_size(self) -> tuple[int, int]:
        """The model's native image (h, w) in pixels."""
        side = self.module.config.sample_size * self.pixels_per_latent
        return side, side

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """The state x's shape for `batch` images of height × width pixels (default: the model's native size)."""
        h0, w0 = self.default_size()
        height, width = height or h0, width or w0
        p = self.pixels_per_latent
        if height % p or width % p:
            raise ValueError(f"height and width must be multiples of {p}, got {height}×{width}")
        return (batch, self.module.config.in_channels, height // p, width // p)

    def start_noise(self, shape, generator: torch.Generator | None, device) -> Tensor:
        """x_0 ~ N(0, I) scaled by the scheduler's init_noise_sigma (1 for DDPM/DDIM and flow)."""
        sigma = float(getattr(self.pipe.scheduler, "init_noise_sigma", 1.0))
        return sigma * torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images in [0, 1], [B, 3, H, W], differentiable (the reward's gradient flows back)."""
        vae = self.pipe.vae
        z = latents / vae.config.scaling_factor
        if self.vae_shift:
            z = z + (getattr(vae.config, "shift_factor", None) or 0.0)
        image = vae.decode(z.to(vae.dtype)).sample.float()
        return (image / 2 + 0.5).clamp(0, 1)

    def schedule(self, steps: int, eta: float = 1.0, flow_method: str = "posterior",
                 size: tuple[int, int] | None = None, timesteps: list[int] | None = None) -> Schedule:
        """The sampler's schedule from the pipeline's scheduler (`size`: the image, for resolution-shifted models;
        `timesteps`: a VP grid of one's own, `sampler.timesteps`)."""
        return make_schedule(self.pipe.scheduler, steps, eta, flow_method, timesteps)

    def sampler_schedule(self, sampler, size: tuple[int, int] | None = None) -> Schedule:
        """The schedule a config's `sampler` section (SamplerConfig) describes: steps, eta, flow_method, timesteps."""
        return self.schedule(sampler.steps, sampler.eta, sampler.flow_method, size, sampler.timesteps)

    # ---- adapters
    def save_adapter(self, out_dir: str, layers: dict[str, Tensor], peft_meta: dict) -> None:
        """The LoRA in diffusers' format, so the stock pipeline's `load_lora_weights` loads it."""
        type(self.pipe).save_lora_weights(out_dir, **{f"{self.adapter_prefix}_lora_layers": layers,
                                                      f"{self.adapter_prefix}_lora_adapter_metadata": peft_meta})

    def load_adapter(self, folder: str) -> None:
        """Attach a saved adapter to the pipeline, as a user of the stock pipeline would."""
        self.pipe.load_lora_weights(folder)

    def pipeline_class(self) -> type:
        import sb_finetune.pipelines as pipelines  # they import this package: asked for late

        return getattr(pipelines, self.pipeline)
