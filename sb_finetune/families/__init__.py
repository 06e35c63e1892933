"""Model families, one object each (one file each): `family_of(pipe)` picks the one that fits a loaded pipeline.

    fam = family_of(pipe)                    # or family_of(pipe, "sdxl") to insist
    cond = fam.encode(prompts, len(prompts), guidance_scale=5.0)
    denoiser = fam.denoiser(fam.module, cond)
    images = fam.decode(x)                   # [B, 3, H, W] in [0, 1]
"""

from __future__ import annotations

from .base import Conditioning, Family
from .flux import Flux
from .qwenimage import QwenImage
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL
from .unet2d import UNet2D

# detection order: the most specific first (an SDXL pipeline also has SD's parts)
FAMILIES: dict[str, type[Family]] = {f.name: f for f in (Flux, QwenImage, StableDiffusionXL, StableDiffusion3, StableDiffusion, UNet2D)}


def family_of(pipe, name: str = "auto") -> Family:
    """The family object for `pipe`: the one named, or ("auto") the first whose `matches(pipe)` holds."""
    if name != "auto":
        if name not in FAMILIES:
            raise ValueError(f"unknown model family {name!r}; one of {sorted(FAMILIES)}")
        return FAMILIES[name](pipe)
    for family in FAMILIES.values():
        if family.matches(pipe):
            return family(pipe)
    raise ValueError(f"cannot tell the model family of {type(pipe).__name__}; set model.family to one of {sorted(FAMILIES)}")


__all__ = ["Conditioning", "FAMILIES", "Family", "family_of"]
