"""PickScore (Kirstain et al. 2023): a transformers CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

score = exp(logit_scale) · cos(image, prompt)  (≈ 15–25 for typical images). The tokenizer is the CLIP BPE
built offline (same vocabulary as the hub processor), the image preprocessing is `clip_preprocess` in torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .preprocess import clip_preprocess
from .registry import Reward, register_reward
from .weights import build_empty, random_fill

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"


def pickscore_config():
    """PickScore_v1's architecture: CLIP ViT-H/14 (the laion/CLIP-ViT-H-14-laion2B-s32B-b79K shapes)."""
    from transformers import CLIPConfig

    text = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "bos_token_id": 49406,
            "eos_token_id": 49407, "pad_token_id": 1}
    vision = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
              "image_size": 224, "patch_size": 14, "hidden_act": "gelu"}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)


def _projected(out) -> Tensor:
    """transformers < 5 returns the projected embedding; 5.x an output whose pooler_output holds it."""
    return out if isinstance(out, Tensor) else out.pooler_output


@register_reward("pickscore")
class PickScore(Reward):
    """kwargs: model (hub id or local folder of a transformers CLIPModel; default yuvalkirstain/PickScore_v1);
    pretrained=False builds seeded random weights of PickScore's architecture, or of `config` (a CLIPConfig / dict)."""

    def __init__(self, model: str = PICKSCORE_MODEL, pretrained: bool = True, config=None):
        super().__init__()
        from transformers import CLIPConfig, CLIPModel

        from sb_finetune.hub import cache_only, download_hint
        from sb_finetune.tokenizer import clip_tokenizer

        if pretrained:
            try:
                clip = CLIPModel.from_pretrained(model, local_files_only=cache_only(model))
            except OSError as err:
                raise FileNotFoundError(
                    f"reward 'pickscore': cannot load '{model}' (not a local CLIPModel folder, and the Hugging Face Hub "
                    f"is unreachable or it is not cached); download it on a machine with network "
                    f"({download_hint(model, local_dir='weights/PickScore_v1')}) and pass "
                    f"model=weights/PickScore_v1 in the reward kwargs ({str(err).splitlines()[0][:120]})") from None
        else:  # the real architecture (default CLIPConfig = PickScore's ViT-H/14) with seeded random weights
            cfg = config if isinstance(config, CLIPConfig) else (CLIPConfig(**config) if config else pickscore_config())
            clip = build_empty(lambda: CLIPModel(cfg))
            random_fill(clip)
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = clip_tokenizer()
        self.image_size = int(self.clip.config.vision_config.image_size)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        device = self.clip.logit_scale.device
        pixels = clip_preprocess(images, self.image_size).to(self.clip.dtype)
        image = torch.nn.functional.normalize(_projected(self.clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
        with torch.no_grad():
            tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=77, return_tensors="pt")
            text = _projected(self.clip.get_text_features(input_ids=tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device)))
            text = torch.nn.functional.normalize(text.float(), dim=-1)
        return self.clip.logit_scale.exp().float() * (image * text).sum(-1)
