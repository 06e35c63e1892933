"""Reward weights: a local file or a Hugging Face Hub file, loaded without pickle code execution.

Offline and not cached gives one `FileNotFoundError` sentence naming the file and where to put it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


def resolve_file(reward: str, path: str | None, repo: str, filenames: str | tuple[str, ...], kwarg: str = "checkpoint") -> str:
    """`path` if given (it must exist), else the first of `filenames` found in hub repo `repo` (or its cache)."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reward '{reward}': {kwarg}='{path}' does not exist")
        return path
    from huggingface_hub import hf_hub_download

    from sb_finetune.hub import download_hint, hub_offline

    names = (filenames,) if isinstance(filenames, str) else filenames
    for name in names:
        try:
            return hf_hub_download(repo, name, local_files_only=hub_offline())
        except Exception:  # offline, not cached, no such file, gated: all end in the same advice
            continue
    name = names[0]
    raise FileNotFoundError(
        f"reward '{reward}': cannot get '{name}' from the Hugging Face Hub repo '{repo}' (offline and not cached?); "
        f"download it on a machine with network ({download_hint(repo, name, local_dir='weights')}) "
        f"and pass {kwarg}=weights/{name} in the reward kwargs"
    )


def load_state_dict(path: str) -> dict[str, Tensor]:
    """A state dict from safetensors, or from a torch pickle with `weights_only=True`.

    Unwraps a `{"state_dict": ...}` checkpoint and a DDP `module.` prefix, as the published files need."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"'{path}' is not a loadable weights file (safetensors, or a torch state dict "
                             f"loadable with weights_only=True): {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"'{path}' does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_into(module: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with an error that names the file and the first mismatching keys.

    Parameters still on the meta device (see `build_empty`) are replaced by the file's tensors, in fp32."""
    missing, unexpected = set(module.state_dict()) - set(state), set(state) - set(module.state_dict())
    if missing or unexpected:
        raise ValueError(f"'{source}' does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    shapes = module.state_dict()
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(shapes[k].shape)]
    if wrong:
        raise ValueError(f"'{source}' does not match the model: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                         f"the model wants {tuple(shapes[wrong[0]].shape)}")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)


def build_empty(factory):
    """Build a model with its parameters on the meta device (buffers real): no time spent on an init that the
    weights file (or `random_fill`) replaces anyway — 18 s for ViT-H/14 on 2 CPU cores."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def random_fill(module: torch.nn.Module, seed: int = 0) -> None:
    """Seeded random weights for a `build_empty` model: N(0, 0.02) matrices, unit norm scales, zero biases,
    CLIP's initial logit scale log(1/0.07). The real architecture, for tests; not a trained model.

    Every matrix is a view at its own offset into one pool of normal draws as long as the largest matrix:
    no copy, so ViT-H/14 (986M parameters) takes 0.2 GB and a second, not 4 GB and a CPU minute."""
    import math

    from accelerate.utils import set_module_tensor_to_device

    params = list(module.named_parameters())
    largest = max(p.numel() for _, p in params)
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(largest + 104_729, generator=g) * 0.02
    for i, (name, p) in enumerate(params):
        if p.ndim >= 2:
            offset = (i * 7919) % (pool.numel() - p.numel() + 1)
            value = pool[offset : offset + p.numel()].view(p.shape)
        elif name.endswith("bias"):
            value = torch.zeros(p.shape)
        elif p.ndim == 1:
            value = torch.ones(p.shape)
        else:
            value = torch.full(p.shape, math.log(1 / 0.07))
        set_module_tensor_to_device(module, name, "cpu", value=value)
