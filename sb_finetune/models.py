"""The model contract's old entry point, kept for code written against it. Everything a model family does is a
method of its object now: `sb_finetune.families` (`family_of(pipe)`)."""

from __future__ import annotations

import torch

from .families import Conditioning, family_of

__all__ = ["Conditioning", "denoiser_module"]


def denoiser_module(pipe) -> torch.nn.Module:
    """The network the control adapts (the UNet or the transformer): `family_of(pipe).module`."""
    return family_of(pipe).module
