"""Rewards on open_clip models: LAION aesthetic predictor, CLIP score, HPSv2 / HPSv2.1.

Each loads its published weights by hub id (cached) or a local file given in the reward kwargs, and can be
built with random weights of the same architecture (`pretrained=False`, for tests). Images go through
`clip_preprocess` in torch, so gradients reach the pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .preprocess import clip_preprocess
from .registry import Reward, register_reward
from .weights import build_empty, load_into, load_state_dict, random_fill, resolve_file

AESTHETIC_REPO, AESTHETIC_FILE = "camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth"
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def open_clip_model(reward: str, arch: str, pretrained: str | None, checkpoint: str | None = None, seed: int = 0):
    """An open_clip CLIP, frozen and in eval mode, with its weights from `checkpoint` (a local file),
    else from the hub files of open_clip's `pretrained` tag, else seeded random (`pretrained=None`)."""
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained and not checkpoint else {}
    if pretrained and not checkpoint and not tag_cfg:
        raise ValueError(f"reward '{reward}': open_clip has no pretrained tag '{pretrained}' for '{arch}' "
                         f"(it has {open_clip.list_pretrained_tags_by_model(arch)})")
    if tag_cfg:  # files first: a missing download fails before the build
        checkpoint = resolve_file(reward, None, tag_cfg["hf_hub"].strip("/"), OPEN_CLIP_FILES, kwarg="clip_checkpoint")
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"reward '{reward}': open_clip has no model '{arch}'")
    cfg = dict(cfg, quick_gelu=cfg.get("quick_gelu", False) or bool(tag_cfg.get("quick_gelu", False)))  # OpenAI weights: QuickGELU
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    model = build_empty(lambda: (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg))
    if checkpoint:
        load_into(model, open_clip.factory.convert_state_dict(model, load_state_dict(checkpoint)), checkpoint)
    else:
        random_fill(model, seed)
    return model.eval().requires_grad_(False)


class _OpenClipReward(Reward):
    """Shared: open_clip image/text embeddings (L2-normalised) of [0, 1] images and prompts."""

    def __init__(self, model, arch: str):
        super().__init__()
        import open_clip

        self.clip = model
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)

    def image_embeddings(self, images: Tensor) -> Tensor:
        pixels = clip_preprocess(images, self.image_size).to(next(self.clip.parameters()).dtype)
        return torch.nn.functional.normalize(self.clip.encode_image(pixels).float(), dim=-1)

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        device = next(self.clip.parameters()).device
        with torch.no_grad():
            tokens = self.tokenizer(list(prompts)).to(device)
            return torch.nn.functional.normalize(self.clip.encode_text(tokens).float(), dim=-1)


class AestheticMLP(torch.nn.Module):
    """The LAION improved-aesthetic-predictor head (its key names: layers.0/2/4/6/7; dropouts at 1/3/5)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
        )

    def forward(self, embedding: Tensor) -> Tensor:
        return self.layers(embedding)


@register_reward("aesthetic")
class Aesthetic(_OpenClipReward):
    """LAION aesthetic score (≈1–10): the MLP head on L2-normalised CLIP ViT-L/14 (OpenAI) image embeddings.

    kwargs: checkpoint (head file, .pth or .safetensors), clip_checkpoint (CLIP file), clip_model, clip_pretrained,
    pretrained=False for random weights."""

    def __init__(self, checkpoint: str | None = None, clip_checkpoint: str | None = None, clip_model: str = "ViT-L-14",
                 clip_pretrained: str = "openai", pretrained: bool = True):
        head = resolve_file("aesthetic", checkpoint, AESTHETIC_REPO, AESTHETIC_FILE) if (pretrained or checkpoint) else None
        model = open_clip_model("aesthetic", clip_model, clip_pretrained if pretrained else None, clip_checkpoint)
        super().__init__(model, clip_model)
        self.head = AestheticMLP(model.visual.output_dim).eval().requires_grad_(False)
        if head:
            load_into(self.head, load_state_dict(head), head)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.head(self.image_embeddings(images)).squeeze(-1)


@register_reward("clip_score")
class ClipScore(_OpenClipReward):
    """100 · cos(image, prompt) in CLIP space (the CLIPScore scale, not clamped at 0 so it keeps a gradient).

    kwargs: clip_model (default ViT-L-14), clip_pretrained (open_clip tag, default openai), clip_checkpoint, pretrained."""

    def __init__(self, clip_model: str = "ViT-L-14", clip_pretrained: str = "openai", clip_checkpoint: str | None = None,
                 pretrained: bool = True):
        super().__init__(open_clip_model("clip_score", clip_model, clip_pretrained if pretrained else None, clip_checkpoint), clip_model)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return 100.0 * (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)


@register_reward("hpsv2")
class HPSv2(_OpenClipReward):
    """Human Preference Score v2 / v2.1: cos(image, prompt) of the HPS-tuned open_clip ViT-H/14 (≈0.2–0.35).

    kwargs: version ("v2.1" or "v2.0"), checkpoint (local HPS .pt file), clip_model, pretrained=False for random."""

    def __init__(self, version: str = "v2.1", checkpoint: str | None = None, clip_model: str = "ViT-H-14", pretrained: bool = True):
        if version not in HPS_FILES:
            raise ValueError(f"reward 'hpsv2': version must be one of {list(HPS_FILES)}, got {version!r}")
        path = resolve_file("hpsv2", checkpoint, HPS_REPO, HPS_FILES[version]) if (pretrained or checkpoint) else None
        # The HPS file holds the whole CLIP (both towers): no separate backbone download.
        super().__init__(open_clip_model("hpsv2", clip_model, None, path), clip_model)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
