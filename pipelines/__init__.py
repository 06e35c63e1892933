"""Diffusers pipelines that sample with the memoryless SDE and carry the LoRA control drift.

    from sb_finetune.pipelines import load_finetuned
    pipe = load_finetuned("outputs/my-run")        # or a hub repo id: base model + adapter, ready
    out = pipe("a photo of a cat", return_kl=True)  # out.images, out.kl [B, N] nats to the base model
"""

from sb_finetune.families import FAMILIES

from .core import SBFinetunedMixin, SBPipelineOutput
from .ddpm import SBDDPMPipeline
from .text_to_image import (SBFluxPipeline, SBQwenImagePipeline, SBStableDiffusion3Pipeline, SBStableDiffusionPipeline,
                            SBStableDiffusionXLPipeline)

# family name → our pipeline class: each family object names its own
PIPELINES = {name: globals()[family.pipeline] for name, family in FAMILIES.items()}


def load_finetuned(path_or_hub_id: str, base=None, **from_pretrained_kwargs):
    """The pipeline class the adapter's metadata names (its model family), with base model and adapter loaded."""
    from sb_finetune.hub import read_adapter_folder, resolve_adapter_folder

    folder = resolve_adapter_folder(path_or_hub_id)
    family = read_adapter_folder(folder).get("family")
    if family not in PIPELINES:
        raise ValueError(f"the adapter in '{folder}' names model family {family!r}; known: {sorted(PIPELINES)}")
    return PIPELINES[family].from_finetuned(folder, base=base, **from_pretrained_kwargs)


__all__ = ["PIPELINES", "SBDDPMPipeline", "SBFluxPipeline", "SBQwenImagePipeline", "SBFinetunedMixin", "SBPipelineOutput", "SBStableDiffusion3Pipeline",
           "SBStableDiffusionPipeline", "SBStableDiffusionXLPipeline", "load_finetuned"]
