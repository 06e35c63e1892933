"""Rewards: built-ins on the real architectures, published checkpoint formats, torch preprocessing, plug-in routes."""

import os
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from sb_finetune.rewards import check_reward_output, list_rewards, load_reward
from sb_finetune.testing import tiny_clip_config, tiny_open_clip

PROMPTS = ["a photo of a cat", "an oil painting of a harbour at dusk"]


def _tiny_kwargs(name):
    arch = tiny_open_clip()
    return {
        "aesthetic": {"clip_model": arch, "pretrained": False},
        "clip_score": {"clip_model": arch, "pretrained": False},
        "hpsv2": {"clip_model": arch, "pretrained": False},
        "pickscore": {"pretrained": False, "config": tiny_clip_config()},
    }[name]


@pytest.mark.parametrize("name", ["aesthetic", "clip_score", "hpsv2", "pickscore"])
def test_builtin_on_any_image_size_returns_a_finite_batch_with_pixel_gradients(name):
    reward = load_reward(name, **_tiny_kwargs(name))
    assert reward.differentiable and name in list_rewards()
    for shape in [(2, 3, 40, 56), (2, 3, 300, 200)]:
        images = torch.rand(*shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = check_reward_output(reward(images, PROMPTS), name, 2)
        assert torch.isfinite(out).all() and out[0] != out[1]
        out.sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert not any(p.requires_grad for p in reward.parameters())  # frozen: the trainer never updates the judge


def test_builtins_on_their_real_architectures():
    """ViT-L/14 + the 768→1 head; HPSv2's and PickScore's ViT-H/14; random weights, real shapes and code path."""
    expected = {"aesthetic": 428_544_482, "clip_score": 427_616_513, "hpsv2": 986_109_441, "pickscore": 986_109_441}
    images = torch.rand(1, 3, 256, 320, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for name, n_params in expected.items():
        reward = load_reward(name, pretrained=False)
        assert sum(p.numel() for p in reward.parameters()) == n_params, name
        out = check_reward_output(reward(images, PROMPTS[:1]), name, 1)
        (grad,) = torch.autograd.grad(out.sum(), images)
        assert torch.isfinite(out).all() and grad.abs().sum() > 0, name
        del reward


def test_jpeg_compressibility_is_declared_non_differentiable_and_prefers_flat_images():
    reward = load_reward("jpeg_compressibility")
    assert reward.differentiable is False
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = check_reward_output(reward(torch.cat([flat, noise]), ["a", "b"]), "jpeg_compressibility", 2)
    assert out[0] > out[1] and out[1] < -5  # noise: > 5 kB at quality 95; a flat grey image: well under 1 kB


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [(512, 512), (480, 640), (768, 512), (200, 300)])
def test_torch_preprocessing_matches_open_clips_transform(size):
    import open_clip
    import torch.nn.functional as F
    from PIL import Image

    from sb_finetune.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, clip_preprocess

    h, w = size
    g = torch.Generator().manual_seed(h + w)
    smooth = F.interpolate(torch.rand(1, 3, h // 16 + 1, w // 16 + 1, generator=g), size=(h, w), mode="bilinear")
    u8 = ((0.8 * smooth + 0.2 * torch.rand(1, 3, h, w, generator=g)) * 255).round().to(torch.uint8)
    reference = open_clip.image_transform(224, is_train=False)(Image.fromarray(u8[0].permute(1, 2, 0).numpy()))
    ours = clip_preprocess(u8.float() / 255)[0]
    assert ours.shape == reference.shape == (3, 224, 224)
    diff = (ours - reference).abs()
    assert diff.max() < 0.02 and diff.mean() < 0.006  # one uint8 level is 0.015 after normalisation (PIL rounds)
    # the check has teeth: resizing without antialiasing is far off
    naive = F.interpolate(u8.float() / 255, size=(224, 224 * w // h) if h <= w else (224 * h // w, 224), mode="bicubic")
    top, left = (naive.shape[-2] - 224) // 2, (naive.shape[-1] - 224) // 2
    naive = (naive[..., top:top + 224, left:left + 224] - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)
    if max(h, w) > 300:
        assert (naive[0] - reference).abs().max() > 0.1


# ----------------------------------------------------------------------------- published checkpoint formats

AESTHETIC_KEYS = {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
                  "layers.4.weight": (64, 128), "layers.4.bias": (64,), "layers.6.weight": (16, 64), "layers.6.bias": (16,),
                  "layers.7.weight": (1, 16), "layers.7.bias": (1,)}


def _random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


def _open_clip_file(tmp_path, fmt, seed=1):
    """A CLIP checkpoint as open_clip publishes it (open_clip_pytorch_model.bin / open_clip_model.safetensors)."""
    from sb_finetune.rewards.clip import open_clip_model

    model = open_clip_model("test", tiny_open_clip(), None, seed=seed)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    path = tmp_path / ("open_clip_model.safetensors" if fmt == "safetensors" else "open_clip_pytorch_model.bin")
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
    return str(path), model


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_loads_the_published_head_and_clip_formats(tmp_path, fmt):
    from sb_finetune.rewards.preprocess import clip_preprocess

    head_state = _random_state(AESTHETIC_KEYS)
    head = tmp_path / ("sac+logos+ava1-l14-linearMSE.pth" if fmt == "pth" else "aesthetic.safetensors")
    torch.save(head_state, head) if fmt == "pth" else save_file(head_state, head)
    clip_file, clip = _open_clip_file(tmp_path, fmt)
    reward = load_reward("aesthetic", checkpoint=str(head), clip_checkpoint=clip_file, clip_model=tiny_open_clip())
    for k, v in head_state.items():
        assert torch.equal(reward.head.state_dict()[k], v), k
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = torch.nn.functional.normalize(clip.encode_image(clip_preprocess(images)), dim=-1)
        expected = emb @ head_state["layers.0.weight"].T + head_state["layers.0.bias"]
        for i in (2, 4, 6, 7):
            expected = expected @ head_state[f"layers.{i}.weight"].T + head_state[f"layers.{i}.bias"]
        assert torch.allclose(reward(images, PROMPTS), expected.squeeze(-1), atol=1e-5)


@pytest.mark.parametrize("layout", ["state_dict", "module_prefix", "bare"])
def test_hpsv2_loads_its_checkpoint_layouts(tmp_path, layout):
    from sb_finetune.rewards.clip import open_clip_model

    source = open_clip_model("test", tiny_open_clip(), None, seed=3)
    state = {k: v.contiguous().clone().half() for k, v in source.state_dict().items()}  # the "compressed" file is fp16
    if layout == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    payload = {"state_dict": state, "epoch": 1, "name": "hps"} if layout != "bare" else state
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save(payload, path)
    reward = load_reward("hpsv2", checkpoint=str(path), clip_model=tiny_open_clip())
    for k, v in source.state_dict().items():
        assert torch.equal(reward.clip.state_dict()[k], v.half().float()), k
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = reward(images, PROMPTS)
    assert out.shape == (2,) and (out.abs() <= 1.0 + 1e-5).all()  # a cosine


def test_pickscore_loads_a_transformers_folder(tmp_path):
    from transformers import CLIPModel

    source = CLIPModel(tiny_clip_config()).eval()
    source.save_pretrained(tmp_path / "PickScore_v1")
    assert (tmp_path / "PickScore_v1" / "model.safetensors").exists()
    reward = load_reward("pickscore", model=str(tmp_path / "PickScore_v1"))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    from sb_finetune.rewards.preprocess import clip_preprocess
    from sb_finetune.tokenizer import clip_tokenizer

    with torch.no_grad():
        tok = clip_tokenizer()(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
        out = source(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=clip_preprocess(images))
        assert torch.allclose(reward(images, PROMPTS), out.logits_per_image.diagonal(), atol=1e-4)


def test_bad_weight_files_name_the_file(tmp_path):
    import argparse

    pickled = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": argparse.Namespace(code="anything")}, pickled)  # not allowed by weights_only
    with pytest.raises(ValueError, match="evil.pth.*weights_only"):
        load_reward("aesthetic", checkpoint=str(pickled), clip_model=tiny_open_clip(), pretrained=False)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="wrong.safetensors.*missing"):
        load_reward("aesthetic", checkpoint=str(wrong), clip_model=tiny_open_clip(), pretrained=False)
    with pytest.raises(FileNotFoundError, match="checkpoint='/no/such/file.pth' does not exist"):
        load_reward("aesthetic", checkpoint="/no/such/file.pth", clip_model=tiny_open_clip(), pretrained=False)


@pytest.mark.parametrize("name, file", [("aesthetic", "sac+logos+ava1-l14-linearMSE.pth"), ("hpsv2", "HPS_v2.1_compressed.pt"),
                                        ("clip_score", "open_clip_model.safetensors"), ("pickscore", "yuvalkirstain/PickScore_v1")])
def test_offline_and_not_cached_gives_one_sentence_naming_the_file(name, file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as err:
        load_reward(name)
    message = str(err.value)
    assert file in message and "hf download" in message and "\n" not in message


# ----------------------------------------------------------------------------- plugging in


def test_reward_from_a_module_loads_by_import_path_and_by_entry_point(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_for_test.py").write_text(textwrap.dedent("""
        import torch

        def redness(images, prompts):
            return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))

        class Scaled(torch.nn.Module):
            differentiable = True
            def __init__(self, scale=1.0):
                super().__init__()
                self.scale = scale
            def forward(self, images, prompts):
                return self.scale * images.mean(dim=(1, 2, 3))
    """))
    dist = tmp_path / "my_rewards_for_test-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rewards-for-test\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sb_finetune.rewards]\nredness_ep = my_rewards_for_test:redness\nscaled_ep = my_rewards_for_test:Scaled\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    by_path = load_reward("my_rewards_for_test:redness")
    by_ep = load_reward("redness_ep")
    assert {"redness_ep", "scaled_ep"} <= set(list_rewards())
    assert torch.equal(by_path(images, PROMPTS), by_ep(images, PROMPTS)) and by_ep.name == "redness_ep"
    scaled = load_reward("scaled_ep", scale=3.0)
    assert torch.allclose(scaled(images, PROMPTS), 3 * images.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="reward 'my_rewards_for_test:nothing': cannot import it"):
        load_reward("my_rewards_for_test:nothing")
    os.sys.modules.pop("my_rewards_for_test", None)
