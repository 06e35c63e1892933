"""Diffusers pipelines that sample with the memoryless SDE and carry the LoRA control drift."""
