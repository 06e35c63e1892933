"""Unconditional UNet2DModel bases (DDPMPipeline: the shipped digits model): no text, pixels are the state, no VAE.
diffusers has no LoRA loader for UNet2DModel: the adapter is the same file format, injected with peft."""

from __future__ import annotations

import json
import os

from .base import Family


class UNet2D(Family):
    name = "unet2d"
    pipeline = "SBDDPMPipeline"
    conditional = False

    @classmethod
    def matches(cls, pipe) -> bool:
        return getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder", None) is None

    @property
    def pixels_per_latent(self) -> int:
        return 1

    def call(self, module, x, t, c):
        return module(x, t).sample

    def decode(self, latents):
        images = (latents / 2 + 0.5).clamp(0, 1)
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # rewards take RGB

    def save_adapter(self, out_dir, layers, peft_meta):
        from safetensors.torch import save_file

        from ..control import ADAPTER_FILE, jsonable

        save_file({f"unet.{k}": v.contiguous() for k, v in layers.items()}, os.path.join(out_dir, ADAPTER_FILE),
                  metadata={"lora_adapter_metadata": json.dumps({"unet": jsonable(peft_meta)})})

    def load_adapter(self, folder):
        from peft import LoraConfig

        from ..control import ADAPTER_FILE, attach_adapter, load_lora_control, saved_lora_config

        path = os.path.join(folder, ADAPTER_FILE)
        config = saved_lora_config(path)
        if not config:
            raise ValueError(f"{path} carries no LoRA config (lora_adapter_metadata)")
        fields = {k for k in LoraConfig.__dataclass_fields__ if k not in ("peft_type",)}
        attach_adapter(self.pipe.unet, LoraConfig(**{k: v for k, v in config.items() if k in fields}))
        load_lora_control(self.pipe.unet, folder)
