"""Pipelines: the adapter saved and loaded both ways gives the same images; zero control is the base; errors are clear."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sb_finetune.control import ADAPTER_FILE, META_FILE, add_lora_control, save_lora_control
from sb_finetune.models import denoiser_module
from sb_finetune.pipelines import PIPELINES, SBDDPMPipeline, SBStableDiffusionPipeline, load_finetuned
from sb_finetune.pipelines.core import _from_components
from sb_finetune.sde import make_schedule
from sb_finetune.testing import TINY_PIPELINES

KIT = {"sd": "sd", "sdxl": "sdxl", "sd3": "sd3", "unet2d": "ddpm"}


def _call(pipe, family, seed=0, **kw):
    args = {"num_inference_steps": 5, "output_type": "pt", "generator": torch.Generator().manual_seed(seed), **kw}
    if family != "unet2d":
        args["prompt"] = ["a red cube", "a blue sphere"]
    else:
        args["batch_size"] = 2
    return pipe(**args)


def _make_adapter(tmp_path, family, init="gaussian", scale=0.05, sampler=None):
    """A saved control adapter, as training leaves it: LoRA B non-zero (unless `init` zeroes the control)."""
    pipe = TINY_PIPELINES[KIT[family]]()
    module = denoiser_module(pipe)
    params = add_lora_control(module, rank=4, lora_alpha=8, init=init)
    if scale:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
    assert params
    folder = tmp_path / f"adapter-{family}"
    save_lora_control(pipe, module, str(folder), {"base_model": f"tiny:{KIT[family]}", "family": family,
                                                  "sampler": sampler or {"steps": 5, "eta": 1.0}, "alpha": 0.1,
                                                  "reward": "brightness"})
    return str(folder)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "unet2d"])
def test_from_finetuned_and_stock_load_lora_weights_give_the_same_images(tmp_path, family):
    folder = _make_adapter(tmp_path, family)
    ours = PIPELINES[family].from_finetuned(folder)
    assert type(load_finetuned(folder)) is PIPELINES[family]
    out = _call(ours, family, return_kl=True)
    # the stock route: the stock pipeline, the stock loader, then the same sampler
    stock = TINY_PIPELINES[KIT[family]]()
    if family == "unet2d":
        via_stock = _from_components(SBDDPMPipeline, stock.components).load_sb_control(folder)
    else:
        stock.load_lora_weights(folder)
        via_stock = _from_components(PIPELINES[family], stock.components)
    assert torch.equal(out.images, _call(via_stock, family).images)
    # the adapter is really there: different images from the base, positive KL on every controlled step (not on
    # a deterministic last step, nor on SD3's steep σ = 0.5 → 0.009 posterior step at 5 steps)
    base = _from_components(PIPELINES[family], TINY_PIPELINES[KIT[family]]().components)
    assert (out.images - _call(base, family).images).abs().max() > 1e-3
    controlled = make_schedule(ours.scheduler, 5).controlled
    assert out.kl.shape == (2, 5) and int(controlled.sum()) == {"sd": 5, "sdxl": 5, "sd3": 3, "unet2d": 4}[family]
    assert (out.kl[:, controlled] > 0).all() and (out.kl[:, ~controlled] == 0).all()


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_eta_1_equals_the_stock_pipeline_with_ddim_eta_1_and_the_adapter(tmp_path, family):
    folder = _make_adapter(tmp_path, family)
    stock = TINY_PIPELINES[KIT[family]]()
    stock.load_lora_weights(folder)
    kw = {"prompt": ["a red cube", "a blue sphere"], "num_inference_steps": 5, "output_type": "pt"}
    reference = stock(**kw, eta=1.0, generator=torch.Generator().manual_seed(0)).images
    ours = PIPELINES[family].from_finetuned(folder)(**kw, eta=1.0, generator=torch.Generator().manual_seed(0)).images
    assert torch.allclose(ours, reference, atol=1e-4)


def test_sd3_eta_0_equals_the_stock_flow_euler_pipeline(tmp_path):
    folder = _make_adapter(tmp_path, "sd3")
    stock = TINY_PIPELINES["sd3"]()
    stock.load_lora_weights(folder)
    kw = {"prompt": ["a red cube", "a blue sphere"], "num_inference_steps": 5, "output_type": "pt"}
    reference = stock(**kw, generator=torch.Generator().manual_seed(0)).images
    ours = PIPELINES["sd3"].from_finetuned(folder)(**kw, eta=0.0, generator=torch.Generator().manual_seed(0)).images
    assert torch.allclose(ours, reference, atol=1e-4)


def test_ddpm_eta_1_equals_the_stock_ddpm_pipeline():
    stock = TINY_PIPELINES["ddpm"]()
    reference = stock(batch_size=2, num_inference_steps=8, output_type="np", generator=torch.Generator().manual_seed(0)).images
    ours = _from_components(SBDDPMPipeline, stock.components)
    images = ours(batch_size=2, num_inference_steps=8, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == reference.shape and abs(images - reference).max() < 1e-5


@pytest.mark.parametrize("family", ["sd", "sd3", "unet2d"])
def test_zero_or_disabled_control_is_the_base_model(tmp_path, family):
    base = _call(_from_components(PIPELINES[family], TINY_PIPELINES[KIT[family]]().components), family).images
    zero = PIPELINES[family].from_finetuned(_make_adapter(tmp_path, family, init=True, scale=0))
    out = _call(zero, family, return_kl=True)
    assert torch.equal(out.kl, torch.zeros_like(out.kl)) and torch.allclose(out.images, base, atol=1e-6)
    trained = PIPELINES[family].from_finetuned(_make_adapter(tmp_path / "t", family))
    if family == "unet2d":
        from sb_finetune.control import adapter_disabled

        with adapter_disabled(trained.unet):
            out = _call(trained, family, return_kl=True)
    else:
        trained.disable_lora()
        out = _call(trained, family, return_kl=True)
    assert torch.equal(out.kl, torch.zeros_like(out.kl)) and torch.allclose(out.images, base, atol=1e-6)


def test_pipeline_round_trips_through_save_pretrained_and_loads_the_adapter_on_a_real_folder(tmp_path):
    folder = _make_adapter(tmp_path, "sd")
    base_dir = tmp_path / "base"
    _from_components(SBStableDiffusionPipeline, TINY_PIPELINES["sd"]().components).save_pretrained(base_dir)
    from_folder = SBStableDiffusionPipeline.from_finetuned(folder, base=str(base_dir))
    from_meta = SBStableDiffusionPipeline.from_finetuned(folder)
    assert torch.equal(_call(from_folder, "sd").images, _call(from_meta, "sd").images)


def test_callback_trajectory_output_types_and_return_dict(tmp_path):
    pipe = SBStableDiffusionPipeline.from_finetuned(_make_adapter(tmp_path, "sd"))
    seen = []

    def callback(p, k, t, tensors):
        seen.append((k, int(t), tuple(tensors["latents"].shape), tuple(tensors["prompt_embeds"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if k == 4 else {}

    out = _call(pipe, "sd", return_trajectory=True, callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [s[0] for s in seen] == list(range(5)) and seen[0][2] == (2, 4, 16, 16)
    assert len(out.trajectory) == 6 and torch.equal(out.trajectory[-1], torch.zeros(2, 4, 16, 16))
    images, kl, trajectory = _call(pipe, "sd", return_dict=False, output_type="pil")
    assert len(images) == 2 and images[0].size == (32, 32) and kl is None and trajectory is None
    assert _call(pipe, "sd", output_type="np").images.shape == (2, 32, 32, 3)
    with pytest.raises(TypeError, match="does not support \\['ip_adapter_image'\\]"):
        _call(pipe, "sd", ip_adapter_image=torch.zeros(1))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs \\['nope'\\]"):
        _call(pipe, "sd", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["nope"])


@pytest.mark.parametrize("family", ["sd", "unet2d"])
def test_an_adapter_trained_on_a_grid_of_its_own_samples_on_it_by_default(tmp_path, family):
    """`sampler.timesteps` in sb_finetune.json: the loaded pipeline steps through that grid when the call names no
    step count, `timesteps=` gives it explicitly (same images), a step count alone is the scheduler's own grid,
    and the two together must agree. The model card says which grid to pass to a stock pipeline."""
    grid = [980, 700, 450, 200, 40]
    folder = _make_adapter(tmp_path, family, sampler={"steps": 5, "eta": 1.0, "timesteps": grid})
    pipe = load_finetuned(folder)
    seen = []

    def callback(p, k, t, tensors):
        seen.append(int(t))
        return {}

    own = _call(pipe, family, num_inference_steps=None, callback_on_step_end=callback).images
    assert seen == grid
    assert torch.equal(own, _call(pipe, family, num_inference_steps=None, timesteps=grid).images)
    stock_grid = _call(pipe, family).images  # num_inference_steps=5: the scheduler's spacing
    assert (own - stock_grid).abs().max() > 1e-3
    with pytest.raises(ValueError, match="num_inference_steps=4 and 5 timesteps"):
        _call(pipe, family, num_inference_steps=4, timesteps=grid)
    assert str(grid) in (tmp_path / f"adapter-{family}" / "README.md").read_text()


# ----------------------------------------------------------------------------- metadata, card, errors


def test_adapter_folder_has_metadata_model_card_and_plain_keys(tmp_path):
    folder = _make_adapter(tmp_path, "sd")
    meta = json.loads((tmp_path / "adapter-sd" / META_FILE).read_text())
    assert {"base_model", "family", "sampler", "alpha", "reward", "sb_finetune_version"} <= set(meta)
    card = (tmp_path / "adapter-sd" / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: diffusers" in header and "- sb-finetune" in header and "- lora" in header
    keys = load_file(f"{folder}/{ADAPTER_FILE}")
    assert keys and not any("module." in k for k in keys) and all(k.startswith("unet.") for k in keys)


def test_loading_errors_name_the_problem(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no adapter in '{empty}': {ADAPTER_FILE} is missing"):
        SBStableDiffusionPipeline.from_finetuned(str(empty))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / ADAPTER_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="is not a valid safetensors adapter file"):
        SBStableDiffusionPipeline.from_finetuned(str(corrupt))
    sdxl = _make_adapter(tmp_path, "sdxl")
    with pytest.raises(ValueError, match="trained for model family 'sdxl'; SBStableDiffusionPipeline is for 'sd' "
                                         "\\(use SBStableDiffusionXLPipeline"):
        SBStableDiffusionPipeline.from_finetuned(sdxl)
    # an adapter of the right family but another model's shapes
    with pytest.raises(ValueError, match="does not fit this SBStableDiffusionPipeline"):
        SBStableDiffusionPipeline.from_finetuned(_make_adapter(tmp_path, "sd"), base=_bigger_sd())
    with pytest.raises(FileNotFoundError, match="hf download someone/no-such-adapter"):
        SBStableDiffusionPipeline.from_finetuned("someone/no-such-adapter")


def _bigger_sd():
    from diffusers import UNet2DConditionModel

    pipe = TINY_PIPELINES["sd"]()
    unet = UNet2DConditionModel(block_out_channels=(64, 128), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=8)
    return _from_components(SBStableDiffusionPipeline, {**pipe.components, "unet": unet})


def test_push_to_hub_uploads_the_folder_and_fails_clearly_offline(tmp_path, monkeypatch):
    import huggingface_hub

    from sb_finetune.hub import push_to_hub

    folder = _make_adapter(tmp_path, "sd")
    with pytest.raises(RuntimeError, match="cannot push .* to the Hugging Face Hub repo 'me/my-adapter'.*hf upload"):
        push_to_hub(folder, "me/my-adapter")  # HF_HUB_OFFLINE=1 in tests
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = repo_id
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message, allow_patterns=None):
            calls["upload"] = (repo_id, folder_path)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_to_hub(folder, "me/my-adapter") == "https://huggingface.co/me/my-adapter"
    assert calls == {"create": "me/my-adapter", "upload": ("me/my-adapter", folder)}
