"""Models and prompts from the config: hub ids, local folders, or the tiny kit; prompt lists, files, datasets."""

from __future__ import annotations

import csv
import json
import os

import torch

from .config import ModelConfig, PromptsConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_pipeline(cfg: ModelConfig):
    """A diffusers pipeline: `tiny:<name>` from the kit, else `DiffusionPipeline.from_pretrained` (hub id or folder)."""
    if cfg.pretrained == "builtin:digits":  # the shipped DDPM (sb_finetune.digits)
        from diffusers import DDPMPipeline

        from .digits import BASE_DIR

        pipe = DDPMPipeline.from_pretrained(BASE_DIR)
    elif cfg.pretrained.startswith("tiny:"):
        from .testing import TINY_PIPELINES

        name = cfg.pretrained.split(":", 1)[1]
        if name not in TINY_PIPELINES:
            raise ValueError(f"model.pretrained: unknown tiny model '{name}', one of {sorted(TINY_PIPELINES)}")
        pipe = TINY_PIPELINES[name]()
    else:
        from diffusers import DiffusionPipeline

        from .hub import cache_only

        kwargs = dict(torch_dtype=DTYPES[cfg.dtype], revision=cfg.revision, variant=cfg.variant)
        if cache_only(cfg.pretrained):
            kwargs["local_files_only"] = True  # the cache or nothing: no retries against an unreachable hub
        try:
            pipe = DiffusionPipeline.from_pretrained(cfg.pretrained, **{k: v for k, v in kwargs.items() if v is not None})
        except (OSError, ValueError) as err:
            raise RuntimeError(missing_model_message(cfg.pretrained, err)) from None
    pipe.set_progress_bar_config(disable=True)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    return pipe


def missing_model_message(name: str, err: Exception) -> str:
    if os.path.isdir(name):
        return f"'{name}' is not a diffusers pipeline folder (no model_index.json or weights): {str(err).splitlines()[0]}"
    from .hub import download_hint

    folder = f"models/{name.split('/')[-1]}"
    return (f"cannot load '{name}': it is neither a local folder nor reachable on the Hugging Face Hub. "
            f"Download it on a machine with network ({download_hint(name, local_dir=folder)}) "
            f"and set model.pretrained={folder}")


def load_prompts(cfg: PromptsConfig) -> list[str]:
    """The training prompts: a file (.txt one a line, .json list, .csv/.jsonl column), a dataset, or the list."""
    if cfg.file:
        path = cfg.file
        ext = os.path.splitext(path)[1].lower()
        with open(path, encoding="utf-8") as f:
            if ext == ".json":
                prompts = json.load(f)
            elif ext == ".jsonl":
                prompts = [json.loads(line)[cfg.column] for line in f if line.strip()]
            elif ext == ".csv":
                prompts = [row[cfg.column] for row in csv.DictReader(f)]
            else:
                prompts = [line.strip() for line in f if line.strip()]
        source = path
    elif cfg.dataset:
        from datasets import load_dataset

        prompts = list(load_dataset(cfg.dataset, split=cfg.split)[cfg.column])
        source = cfg.dataset
    else:
        prompts, source = list(cfg.list), "prompts.list"
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts from {source}: need a non-empty list of strings")
    return prompts
