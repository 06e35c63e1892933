"""Tiny-model kit: offline, seeded, sub-second diffusers pipelines for tests, benchmarks and smoke runs.

Every builder returns a real diffusers object with the real architecture classes, only small. The
CLIP tokenizer is the real one (49,408-entry vocabulary), built from open_clip's bundled BPE file, so
prompts tokenize exactly as they would with a hub tokenizer (see `clip_tokenizer`).
"""

from __future__ import annotations

import torch

from .tokenizer import clip_tokenizer, clip_tokenizer_files  # noqa: F401  (re-exported: the kit's tokenizer)

# Shared sizes. Text encoders: hidden 32; SD/SDXL latents 4×16×16 → images 32×32 (VAE downsamples ×2).
TEXT_HIDDEN = 32
LATENT_SIZE = 16
IMAGE_SIZE = 32


def _text_encoder(seed: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=TEXT_HIDDEN,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_vae(seed: int = 0, latent_channels: int = 4, flow: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = dict(shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False) if flow else {}
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        sample_size=IMAGE_SIZE,
        norm_num_groups=32,
        **extra,
    ).eval()


def tiny_unet(seed: int = 0, sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {}
    if sdxl:  # SDXL: text_time added conditioning; cross-attention on both encoders' hidden states
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * 8,
            use_linear_projection=True,
        )
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_HIDDEN if sdxl else TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
        **extra,
    ).eval()


def tiny_sd_pipeline(seed: int = 0, scheduler: str = "ddim", prediction_type: str = "epsilon"):
    """A tiny Stable Diffusion 1.x pipeline (32×32 images). scheduler: 'ddim' or 'ddpm'."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=tiny_vae(seed + 1),
        text_encoder=_text_encoder(seed + 2, projection=False),
        tokenizer=clip_tokenizer(),
        unet=tiny_unet(seed),
        scheduler=vp_scheduler(scheduler, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """A tiny SDXL pipeline: two CLIP text encoders (the second with projection), text_time conditioning."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 1),
        text_encoder=_text_encoder(seed + 2, projection=False),
        text_encoder_2=_text_encoder(seed + 3, projection=True),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=tiny_unet(seed, sdxl=True),
        scheduler=vp_scheduler(scheduler),
        add_watermarker=False,
    )


def tiny_sd3_transformer(seed: int = 0, sd35: bool = False):
    """SD3's MMDiT; sd35: SD3.5's shape (RMS qk-norm in every block, and a dual-attention first block as in 3.5 medium)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    extra = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {}
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2 if sd35 else 1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=2 * TEXT_HIDDEN,  # CLIP-L ⊕ CLIP-G hidden states (T5 left out: zeros of this width)
        pooled_projection_dim=2 * TEXT_HIDDEN,
        pos_embed_max_size=LATENT_SIZE,
        **extra,
    ).eval()


def tiny_sd3_pipeline(seed: int = 0, shift: float = 3.0, sd35: bool = False):
    """A tiny SD3 pipeline (flow matching); sd35: an SD3.5 transformer. The T5 encoder is left out, as diffusers allows."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed, sd35),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=tiny_vae(seed + 1, flow=True),
        text_encoder=_text_encoder(seed + 2, projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_text_encoder(seed + 3, projection=True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_sd35_pipeline(seed: int = 0):
    """A tiny SD3.5 pipeline: the SD3 family with qk-norm and a dual-attention block."""
    return tiny_sd3_pipeline(seed, sd35=True)


def tiny_flux_transformer(seed: int = 0, guidance: bool = True):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels × a 2×2 token
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,  # T5's hidden states
        pooled_projection_dim=TEXT_HIDDEN,  # CLIP's pooled output
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    ).eval()


def t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer (its conventions: </s> appended, <pad> 0, </s> 1, <unk> 2, sentencepiece's ▁ word marks) over
    characters, built offline: the tiny kit's stand-in for the hub's 32k-piece T5 tokenizer."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(seed: int = 0, vocab_size: int = 192):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=TEXT_HIDDEN, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return T5EncoderModel(config).eval()


def tiny_flux_pipeline(seed: int = 0, guidance: bool = True):
    """A tiny FLUX.1 pipeline ([dev] with the guidance embedding; guidance=False: [schnell]-like): CLIP (pooled) and
    T5 text encoders, packed 2×2 latents, the dynamic shift; 32×32 images (16×16 latents, 8×8 tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tokenizer_2 = t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256,
                                                  base_shift=0.5, max_shift=1.15),
        vae=tiny_vae(seed + 1, flow=True),
        text_encoder=_text_encoder(seed + 2, projection=False),
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(seed + 3, len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=tiny_flux_transformer(seed, guidance),
    )
    pipe.default_sample_size = LATENT_SIZE  # × vae_scale_factor 2: 32-pixel images by default
    return pipe


QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                 "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                 "<|im_start|>assistant\n")  # QwenImagePipeline's prompt template


def qwen_tokenizer():
    """A Qwen2 tokenizer (byte-level BPE, its chat specials), built offline: the 256 bytes, plus whole-word pieces for
    the words of Qwen-Image's prompt template, so the template's system part is 34 tokens as with the hub's 151k-piece
    tokenizer (the stock pipeline drops exactly those 34 from the text states)."""
    from open_clip.tokenizer import bytes_to_unicode
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = []
    parts = QWEN_TEMPLATE.replace("<|im_start|>", "{}").replace("<|im_end|>", "{}").split("{}")  # as the specials cut it
    for word, _ in (piece for part in parts for piece in split.pre_tokenize_str(part)):
        for i in range(1, len(word)):  # merge the word left to right, one byte at a time
            if word[: i + 1] not in vocab:
                merges.append((word[:i], word[i]))
                vocab[word[: i + 1]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = split
    tok.decoder = decoders.ByteLevel()
    return Qwen2TokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def tiny_qwen25vl(seed: int = 0, vocab_size: int = 512):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, bos_token_id=0, eos_token_id=1)
    vision = dict(depth=1, hidden_size=TEXT_HIDDEN, intermediate_size=37, num_heads=4, out_hidden_size=TEXT_HIDDEN,
                  fullatt_block_indexes=[0])
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=vocab_size, bos_token_id=0, eos_token_id=1)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwenimage_pipeline(seed: int = 0):
    """A tiny Qwen-Image pipeline: a Qwen2.5-VL text encoder, the video VAE (one frame, per-channel mean/std), packed
    2×2 latents, the dynamic shift; 32×32 images (16×16 latents, 8×8 tokens)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                 temperal_downsample=[False], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                 latents_std=[1.5, 0.8, 1.2, 1.0]).eval()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                                              num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6)).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256,
                                                  base_shift=0.5, max_shift=0.9),
        vae=vae, text_encoder=tiny_qwen25vl(seed + 2, len(tokenizer)), tokenizer=tokenizer, transformer=transformer)
    pipe.default_sample_size = LATENT_SIZE  # × vae_scale_factor 2: 32-pixel images
    return pipe


def tiny_unet2d(seed: int = 0, sample_size: int = LATENT_SIZE, channels: int = 3):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    ).eval()


def tiny_ddpm_pipeline(seed: int = 0):
    """A tiny unconditional UNet2DModel + DDPMScheduler pipeline (16×16 RGB)."""
    from diffusers import DDPMPipeline

    return DDPMPipeline(unet=tiny_unet2d(seed), scheduler=vp_scheduler("ddpm"))


def vp_scheduler(kind: str = "ddim", prediction_type: str = "epsilon"):
    """The SD 1.x scheduler configuration (scaled-linear betas), as DDIM or DDPM."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction_type,
    )
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1)
    if kind == "ddpm":
        return DDPMScheduler(**common, variance_type="fixed_small")
    raise ValueError(f"vp_scheduler: kind must be 'ddim' or 'ddpm', got {kind!r}")


TINY_PIPELINES = {
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline,
    "sd35": tiny_sd35_pipeline,
    "flux": tiny_flux_pipeline,
    "qwenimage": tiny_qwenimage_pipeline,
    "ddpm": tiny_ddpm_pipeline,
}


# --------------------------------------------------------------------------- reward models


def tiny_open_clip(embed_dim: int = 768, image_size: int = 224, patch_size: int = 14, name: str | None = None) -> str:
    """Register a tiny open_clip config (same code path as ViT-L-14 / ViT-H-14, 2 layers of width 64); return its name.

    embed_dim 768 matches the LAION aesthetic head's input."""
    import json
    import os
    import tempfile

    import open_clip

    name = name or f"sbf-tiny-clip-{embed_dim}-{image_size}"
    if name in open_clip.list_models():
        return name
    cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "head_width": 32, "patch_size": patch_size},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    path = os.path.join(tempfile.mkdtemp(prefix="sbf_open_clip_"), f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    open_clip.add_model_config(path)
    return name


def tiny_clip_config(image_size: int = 224, patch_size: int = 14):
    """A tiny transformers CLIPConfig (PickScore's architecture class, 2 layers of width 64)."""
    from transformers import CLIPConfig

    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "max_position_embeddings": 77, "vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": patch_size}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)
