"""What every sb-finetune pipeline shares: the engine's sampler behind `__call__`, the output, the loaders.

The sampling math is the engine's (`sb_finetune.sde` + `sb_finetune.rollout`); a pipeline only encodes the
prompts, runs the rollout under `no_grad`, and post-processes the images as diffusers does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import BaseOutput

from sb_finetune.control import base_denoiser, has_adapter
from sb_finetune.families import Conditioning, family_of
from sb_finetune.hub import read_adapter_folder, resolve_adapter_folder
from sb_finetune.rollout import Rollout, rollout


@dataclass
class SBPipelineOutput(BaseOutput):
    """images: PIL list, numpy [B, H, W, 3] or tensor [B, 3, H, W] in [0, 1] (or latents);
    kl: [B, N] per-step KL of the sampled path to the base model, nats (with `return_kl=True`);
    trajectory: the states x_0 … x_N (with `return_trajectory=True`)."""

    images: list | np.ndarray | torch.Tensor
    kl: torch.Tensor | None = None
    trajectory: list[torch.Tensor] | None = None


class SBFinetunedMixin:
    """`from_finetuned` and `load_sb_control` for a stock diffusers pipeline class with `sb_family` set (the name
    of its family object in `sb_finetune.families`)."""

    sb_family: str = ""

    @property
    def sb_model(self):
        """This pipeline's family object: encode, denoise, latents, decode, schedule."""
        return family_of(self, self.sb_family)

    @classmethod
    def from_finetuned(cls, path_or_hub_id: str, base=None, **from_pretrained_kwargs):
        """Base model (from the adapter's `sb_finetune.json`, or `base=`: an id, a folder or a pipeline) + adapter."""
        folder = resolve_adapter_folder(path_or_hub_id)
        meta = read_adapter_folder(folder, require_metadata=base is None)
        _check_family(meta, cls, folder)
        pipe = _load_base(cls, base if base is not None else meta.get("base_model"), from_pretrained_kwargs)
        pipe.load_sb_control(folder)
        return pipe

    def load_sb_control(self, path_or_hub_id: str):
        """Attach a saved control adapter (diffusers' LoRA loader; peft injection for UNet2DModel)."""
        folder = resolve_adapter_folder(path_or_hub_id)
        meta = read_adapter_folder(folder, require_metadata=False)
        _check_family(meta, type(self), folder)
        try:
            self.sb_model.load_adapter(folder)
        except (ValueError, RuntimeError, KeyError) as err:
            raise ValueError(f"the adapter in '{folder}' does not fit this {type(self).__name__}'s model "
                             f"({str(err).splitlines()[0][:200]})") from None
        if not has_adapter(self.sb_model.module):
            raise ValueError(f"the adapter in '{folder}' matched no layer of this {type(self).__name__}'s model")
        self.sb_metadata = meta
        return self


def _check_family(meta: dict, cls, folder: str) -> None:
    family = meta.get("family")
    if family and family != cls.sb_family:
        from . import PIPELINES

        raise ValueError(f"the adapter in '{folder}' was trained for model family '{family}'; {cls.__name__} is for "
                         f"'{cls.sb_family}' (use {PIPELINES[family].__name__}, or sb_finetune.pipelines.load_finetuned)")


def _load_base(cls, base, kwargs: dict):
    from diffusers import DiffusionPipeline

    if base is None:
        raise ValueError(f"{cls.__name__}.from_finetuned: no base model (none in the metadata); pass base=")
    if isinstance(base, DiffusionPipeline):
        return _from_components(cls, base.components)
    if str(base).startswith(("tiny:", "builtin:")):  # the kit and the shipped models: the trainer's resolver
        from sb_finetune.config import ModelConfig
        from sb_finetune.data import load_pipeline

        return _from_components(cls, load_pipeline(ModelConfig(pretrained=str(base))).components)
    from sb_finetune.hub import cache_only

    if cache_only(str(base)):
        kwargs = {"local_files_only": True, **kwargs}  # the cache or nothing: no retries against an unreachable hub
    try:
        pipe = cls.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as err:
        from sb_finetune.data import missing_model_message

        raise FileNotFoundError(missing_model_message(str(base), err)) from None
    return pipe


def _from_components(cls, components: dict):
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in components.items() if k in params}
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- sampling


def check_call_inputs(pipe, generator, callback_tensor_inputs, unsupported: dict) -> None:
    given = {k: v for k, v in unsupported.items() if v is not None}
    if given:
        raise TypeError(f"{type(pipe).__name__} does not support {sorted(given)} (the SDE sampler takes prompts, sizes, "
                        f"guidance, eta, generator, latents and callbacks)")
    if isinstance(generator, list):
        raise TypeError(f"{type(pipe).__name__}: pass one torch.Generator (the whole batch is one SDE rollout), not a list")
    allowed = getattr(pipe, "_callback_tensor_inputs", ["latents"])
    bad = [k for k in callback_tensor_inputs or [] if k not in allowed]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not among {allowed}")


def sampler_grid(pipe, num_inference_steps: int | None, timesteps: list[int] | None, default_steps: int
                 ) -> tuple[int, list[int] | None]:
    """(N, timesteps) of a call: the `timesteps` given; else, when no step count is given either, the grid the loaded
    adapter was trained on (its sb_finetune.json's `sampler.timesteps`, where it has one); else `num_inference_steps`
    (or `default_steps`) on the scheduler's own grid."""
    if timesteps is None and num_inference_steps is None:
        timesteps = ((getattr(pipe, "sb_metadata", None) or {}).get("sampler") or {}).get("timesteps")
    if timesteps is None:
        return num_inference_steps or default_steps, None
    timesteps = [int(t) for t in timesteps]
    if num_inference_steps not in (None, len(timesteps)):
        raise ValueError(f"num_inference_steps={num_inference_steps} and {len(timesteps)} timesteps: give one of them")
    return len(timesteps), timesteps


def sample(pipe, cond: Conditioning, shape: tuple[int, ...], *, num_inference_steps: int, eta: float,
           flow_method: str = "posterior", generator=None, latents=None, return_kl: bool = False,
           return_trajectory: bool = False, callback=None, callback_tensor_inputs=("latents",), extra_tensors=None,
           size: tuple[int, int] | None = None, timesteps: list[int] | None = None) -> Rollout:
    """The engine's rollout with the pipeline's model: the adapter (if any) as policy, the adapter off as base."""
    fam = pipe.sb_model
    module = fam.module
    device = module.device
    schedule = fam.schedule(num_inference_steps, eta, flow_method, size, timesteps)
    policy = fam.denoiser(module, cond)
    if eta == 0 and return_kl:
        raise ValueError("return_kl needs eta > 0: a deterministic sampler's path KL to the base is undefined")
    # The trained process: deterministic steps (a memoryless chain's last one) are the base's. At eta = 0 every
    # step is deterministic: that is the adapted model's ODE, as the stock pipeline samples it.
    base = base_denoiser(policy, module) if has_adapter(module) and eta > 0 else policy
    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)}")
        x = latents.to(device=device, dtype=torch.float32)
    else:
        x = fam.start_noise(shape, generator, device)

    def on_step(k: int, x: torch.Tensor):  # diffusers' callback_on_step_end; it may replace the latents
        tensors = {"latents": x, **(extra_tensors or {})}
        out = callback(pipe, k, schedule.timesteps[k], {name: tensors.get(name) for name in callback_tensor_inputs})
        return (out or {}).get("latents")

    return rollout(policy, base, schedule, x, window=0, generator=generator, return_trajectory=return_trajectory,
                   on_step=on_step if callback is not None else None, compute_kl=return_kl)


def finish(pipe, result: Rollout, output_type: str, return_dict: bool, return_kl: bool, return_trajectory: bool):
    """Decode and post-process as diffusers does; the output dataclass or a tuple (images, kl, trajectory)."""
    if output_type == "latent":
        images = result.x
    else:
        fam = pipe.sb_model
        images = fam.decode(result.x.to(fam.module.dtype))
        if output_type in ("np", "pil"):
            images = images.permute(0, 2, 3, 1).float().cpu().numpy()
            images = pipe.numpy_to_pil(images) if output_type == "pil" else images
        elif output_type != "pt":
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
    pipe.maybe_free_model_hooks()
    kl = result.kl if return_kl else None
    trajectory = result.trajectory if return_trajectory else None
    if not return_dict:
        return images, kl, trajectory
    return SBPipelineOutput(images=images, kl=kl, trajectory=trajectory)
