"""Model families as objects: one picks itself for each pipeline, none is switched on by name elsewhere; FLUX.1 and
SD3.5 on the tiny kit: at eta = 0 the stock pipeline's images, at eta = 1 the engine's base process; FLUX's guidance
embedding is conditioning; a 2-step run writes an adapter that the stock pipeline's `load_lora_weights` loads and that
changes its images; two processes end with identical weights."""

import json
import re
from pathlib import Path

import pytest
import torch

from sb_finetune.config import load_config
from sb_finetune.control import DEFAULT_TARGETS, _tuner_layers, add_lora_control, save_lora_control
from sb_finetune.families import FAMILIES, family_of
from sb_finetune.pipelines import (PIPELINES, SBFluxPipeline, SBQwenImagePipeline, SBStableDiffusion3Pipeline,
                                   load_finetuned)
from sb_finetune.rollout import rollout
from sb_finetune.testing import TINY_PIPELINES, tiny_flux_pipeline

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ["a red cube", "a blue sphere"]
KW = {"prompt": PROMPTS, "num_inference_steps": 4, "height": 32, "width": 32, "guidance_scale": 3.5, "output_type": "pt"}


def _adapter(tmp_path, scale=0.05, guidance=True, kit="flux"):
    pipe = tiny_flux_pipeline(guidance=guidance) if kit == "flux" else TINY_PIPELINES[kit]()
    fam = family_of(pipe)
    add_lora_control(fam.module, rank=4, lora_alpha=8, init=True if scale == 0 else "gaussian")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in fam.module.named_parameters():
            if "lora_B" in name and scale:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    folder = tmp_path / "adapter"
    save_lora_control(pipe, fam.module, str(folder), {"base_model": f"tiny:{kit}", "family": fam.name,
                                                      "sampler": {"steps": 4, "eta": 1.0}, "alpha": 0.1})
    return str(folder)


@pytest.mark.parametrize("kit,name", [("sd", "sd"), ("sdxl", "sdxl"), ("sd3", "sd3"), ("sd35", "sd3"), ("flux", "flux"),
                                      ("qwenimage", "qwenimage"), ("ddpm", "unet2d")])
def test_each_kit_pipeline_picks_its_family_and_our_pipeline_class(kit, name):
    fam = family_of(TINY_PIPELINES[kit]())
    assert type(fam) is FAMILIES[name] and PIPELINES[name] is fam.pipeline_class()
    assert fam.pipeline_class().sb_family == name


def test_the_config_offers_every_family():
    from sb_finetune.config import _CHOICES

    assert set(_CHOICES["model.family"]) == {"auto", *FAMILIES}


def test_nothing_outside_the_family_files_switches_on_a_family_name():
    """A family's behaviour lives in its file: no `family == "sd3"`, `sb_family in (...)` or `"unet2d" if` elsewhere."""
    names = "|".join(FAMILIES)
    switch = re.compile(rf"""\b(family|sb_family)\s*((==|!=)\s*["']|(not\s+)?in\s*[([{{])|["']({names})["']\s*(==|!=|if\b)""")
    for path in [*ROOT.glob("sb_finetune/**/*.py"), *ROOT.glob("pipelines/*.py"), *ROOT.glob("rewards/*.py"), ROOT / "train.py"]:
        if "families" in path.parts:
            continue
        hits = [line for line in path.read_text().splitlines() if switch.search(line)]
        assert not hits, f"{path.relative_to(ROOT)} switches on a family name: {hits}"


def test_the_kit_is_flux_and_its_family_is_picked():
    pipe = tiny_flux_pipeline()
    fam = family_of(pipe)
    assert fam.name == "flux" and fam.pipeline_class() is SBFluxPipeline and PIPELINES["flux"] is SBFluxPipeline
    assert fam.latent_shape(2) == (2, 4, 16, 16)  # 32-pixel images: 16×16 latents, 8×8 tokens of 2×2
    with pytest.raises(ValueError, match="multiples of 4"):
        fam.latent_shape(1, 30, 32)


def test_eta_0_is_the_stock_flux_pipeline_with_the_adapter(tmp_path):
    """Same seed, same prompts, same guidance: our SDE at eta = 0 is the stock flow-Euler sampler, the shift mu and the
    σ grid as FluxPipeline computes them, and the guidance embedding reaches the model."""
    folder = _adapter(tmp_path)
    stock = tiny_flux_pipeline()
    stock.load_lora_weights(folder)
    reference = stock(**KW, generator=torch.Generator().manual_seed(0)).images
    ours = SBFluxPipeline.from_finetuned(folder)
    images = ours(**KW, eta=0.0, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == reference.shape == (2, 3, 32, 32)
    assert torch.allclose(images, reference, atol=1e-4), (images - reference).abs().max()
    other = ours(**{**KW, "guidance_scale": 1.0}, eta=0.0, generator=torch.Generator().manual_seed(0)).images
    assert (other - images).abs().max() > 1e-3  # the guidance embedding is conditioning, not ignored


@pytest.mark.parametrize("kit", ["flux", "qwenimage"])
def test_eta_1_is_the_engines_base_process_and_zero_control_pays_no_kl(tmp_path, kit):
    zero = PIPELINES[kit].from_finetuned(_adapter(tmp_path, scale=0, kit=kit))
    out = zero(**KW, eta=1.0, return_kl=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.kl, torch.zeros_like(out.kl)) and out.kl.shape == (2, 4)
    fam = family_of(TINY_PIPELINES[kit]())
    g = torch.Generator().manual_seed(0)
    base = fam.denoiser(fam.module, fam.encode(PROMPTS, 2, 3.5))
    x = fam.start_noise(fam.latent_shape(2, 32, 32), g, "cpu")
    with torch.no_grad():
        engine = fam.decode(rollout(base, base, fam.schedule(4, 1.0, "posterior", (32, 32)), x, window=0, generator=g).x)
    assert torch.allclose(out.images, engine, atol=1e-5)


def test_schnell_without_guidance_embedding_samples_too(tmp_path):
    folder = _adapter(tmp_path, guidance=False)
    stock = tiny_flux_pipeline(guidance=False)
    stock.load_lora_weights(folder)
    reference = stock(**KW, generator=torch.Generator().manual_seed(0)).images
    ours = SBFluxPipeline.from_finetuned(folder, base=tiny_flux_pipeline(guidance=False))
    assert torch.allclose(ours(**KW, eta=0.0, generator=torch.Generator().manual_seed(0)).images, reference, atol=1e-4)


def test_two_training_steps_write_an_adapter_the_stock_pipeline_loads_and_that_changes_its_images(tmp_path):
    from sb_finetune.trainer import train

    result = train(load_config(None, [f"output.dir={tmp_path}", "model.pretrained=tiny:flux", "sampler.steps=4",
                                      "sampler.guidance_scale=3.5", "optim.steps=2", "optim.lr=1e-2", "optim.batch_size=2",
                                      "objective.alpha=0.1", "logging.tracker=none"]))
    assert result["steps"] == 2 and result["skipped"] == 0
    assert json.loads((tmp_path / "sb_finetune.json").read_text())["family"] == "flux"
    assert type(load_finetuned(str(tmp_path))) is SBFluxPipeline
    stock = tiny_flux_pipeline()
    before = stock(**KW, generator=torch.Generator().manual_seed(0)).images
    stock.load_lora_weights(str(tmp_path))
    after = stock(**KW, generator=torch.Generator().manual_seed(0)).images
    assert (after - before).abs().max() > 1e-4


def test_two_processes_train_flux_to_identical_weights(two_ranks):
    from safetensors.torch import load_file

    out = two_ranks("flux")  # tiny FLUX, 4 steps, guidance 3.5, 2 optimizer steps
    r0, r1 = (load_file(out / f"rank{i}_of_2.safetensors") for i in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(v.abs().sum() > 0 for k, v in r0.items() if "lora.up" in k)  # moved off the zero init of B


def test_sd35_shape_eta_0_is_the_stock_pipeline_and_a_trained_adapter_loads_there(tmp_path):
    """SD3.5's transformer (RMS qk-norm, a dual-attention block) through the SD3 family: the stock
    StableDiffusion3Pipeline's images at eta = 0, and a 2-step run's adapter changes them."""
    from sb_finetune.trainer import train

    kw = {"prompt": PROMPTS, "num_inference_steps": 4, "output_type": "pt", "guidance_scale": 1.0}
    stock = TINY_PIPELINES["sd35"]()
    assert stock.transformer.config.qk_norm == "rms_norm" and list(stock.transformer.config.dual_attention_layers) == [0]
    before = stock(**kw, generator=torch.Generator().manual_seed(0)).images
    result = train(load_config(None, [f"output.dir={tmp_path}", "model.pretrained=tiny:sd35", "sampler.steps=4",
                                      "optim.steps=2", "optim.lr=1e-2", "optim.batch_size=2", "objective.alpha=0.1",
                                      "logging.tracker=none"]))
    assert result["steps"] == 2 and json.loads((tmp_path / "sb_finetune.json").read_text())["family"] == "sd3"
    ours = load_finetuned(str(tmp_path))
    assert type(ours) is SBStableDiffusion3Pipeline
    stock.load_lora_weights(str(tmp_path))
    after = stock(**kw, generator=torch.Generator().manual_seed(0)).images
    assert (after - before).abs().max() > 1e-4
    images = ours(**kw, eta=0.0, generator=torch.Generator().manual_seed(0)).images
    assert torch.allclose(images, after, atol=1e-4), (images - after).abs().max()


def test_qwenimage_eta_0_is_the_stock_pipeline_without_and_with_its_true_cfg(tmp_path):
    """Qwen-Image through its family: the stock pipeline's images at eta = 0, without CFG and with its "true CFG" (the
    negative prompt's own call, the mix rescaled per token to the conditional prediction's norm)."""
    folder = _adapter(tmp_path, kit="qwenimage")
    stock = TINY_PIPELINES["qwenimage"]()
    stock.load_lora_weights(folder)
    ours = SBQwenImagePipeline.from_finetuned(folder)
    kw = {"prompt": PROMPTS, "num_inference_steps": 4, "height": 32, "width": 32, "output_type": "pt"}
    plain = stock(**kw, generator=torch.Generator().manual_seed(0)).images  # no negative prompt: no CFG
    mine = ours(**kw, guidance_scale=1.0, eta=0.0, generator=torch.Generator().manual_seed(0)).images
    assert mine.shape == (2, 3, 32, 32) and torch.allclose(mine, plain, atol=1e-4), (mine - plain).abs().max()
    guided = stock(**kw, negative_prompt=["", ""], true_cfg_scale=4.0, generator=torch.Generator().manual_seed(0)).images
    mine = ours(**kw, guidance_scale=4.0, eta=0.0, generator=torch.Generator().manual_seed(0)).images
    assert torch.allclose(mine, guided, atol=1e-4), (mine - guided).abs().max()
    assert (guided - plain).abs().max() > 1e-3


def test_qwenimage_trains_and_its_adapter_loads_in_the_stock_pipeline(tmp_path):
    from sb_finetune.trainer import train

    result = train(load_config(None, [f"output.dir={tmp_path}", "model.pretrained=tiny:qwenimage", "sampler.steps=4",
                                      "sampler.guidance_scale=4.0", "optim.steps=2", "optim.lr=1e-2", "optim.batch_size=2",
                                      "objective.alpha=0.1", "logging.tracker=none"]))
    assert result["steps"] == 2 and json.loads((tmp_path / "sb_finetune.json").read_text())["family"] == "qwenimage"
    assert type(load_finetuned(str(tmp_path))) is SBQwenImagePipeline
    stock = TINY_PIPELINES["qwenimage"]()
    kw = {"prompt": PROMPTS, "num_inference_steps": 4, "height": 32, "width": 32, "output_type": "pt"}
    before = stock(**kw, generator=torch.Generator().manual_seed(0)).images
    stock.load_lora_weights(str(tmp_path))
    assert (stock(**kw, generator=torch.Generator().manual_seed(0)).images - before).abs().max() > 1e-4


@pytest.mark.parametrize("kit,merged", [("sd", False), ("flux", False), ("qwenimage", False), ("ddpm", False),
                                         ("sd", True), ("ddpm", True)])
def test_policy_and_base_in_one_call_equal_two_calls_values_and_gradients(kit, merged):
    """`paired_denoiser`: one call on [x; x] with the adapter masked off the second copy gives the policy's and the
    base's predictions as two calls do, and the same gradients to the state and the adapter; through a checkpointed
    rollout window too, paired in both passes, or the policy alone in the first pass and its calls, paired or apart,
    in the backward (`base_in_backward` with `params`). (sd: CFG's
    [uncond; cond] doubling; qwenimage: its true CFG's two calls; flux: tokens.) With the merged LoRA forward on (the
    trainer's CPU default) each layer splits the paired rows itself, the adapter's merged weight on the first copy and
    the base's on the second, without calling A or B; under autocast, where it keeps peft's forward, the mask on B's
    output does it."""
    from sb_finetune.control import base_denoiser, paired_denoiser, use_merged_forward

    fam = family_of(TINY_PIPELINES[kit]())
    params = add_lora_control(fam.module, rank=4, target_modules=MERGE_TARGETS[kit] if merged else DEFAULT_TARGETS)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:  # a control far from zero, so that policy and base differ
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    cond = fam.encode(PROMPTS if fam.conditional else None, 2, 4.0, "blurry" if kit == "qwenimage" else None)
    policy = fam.denoiser(fam.module, cond)
    base, both = base_denoiser(policy, fam.module), paired_denoiser(fam.denoiser(fam.module, cond.repeat(2)), fam.module)
    schedule = fam.schedule(3)
    x = fam.start_noise(fam.latent_shape(2), g, "cpu").requires_grad_(True)
    t = schedule.timesteps[1]
    if merged:  # under autocast the merged forward steps aside for peft's, and the mask on B's output still applies
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_apart, bf16_together = (policy(x, t), base(x, t)), both(x, t)
        for a, b in zip(bf16_apart, bf16_together):
            assert (a - b).abs().max() < 0.05 * a.abs().max(), (a - b).abs().max()
        assert (bf16_together[0] - bf16_together[1]).abs().max() > 0.1 * (bf16_apart[0] - bf16_apart[1]).abs().max()
        assert use_merged_forward(fam.module) == len(_tuner_layers(fam.module))
        for m in _tuner_layers(fam.module):  # the merged forward splits the paired rows itself: A and B are never called
            m.lora_A["default"].forward = m.lora_B["default"].forward = _never
    apart, together = (policy(x, t), base(x, t)), both(x, t)
    assert (apart[0] - apart[1]).abs().max() > 1e-2
    for a, b in zip(apart, together):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    grads = [torch.autograd.grad((1.3 * p + 0.7 * q).square().sum(), [x, *params]) for p, q in (apart, together)]
    for a, b in zip(*grads):
        assert a.norm() > 0 and (a - b).norm() < 1e-4 * a.norm(), (a - b).norm() / a.norm()

    def window(pair, late=False):  # a whole-chain window through both predictions, checkpointed
        out = rollout(policy, base, schedule, x.detach(), window=schedule.num_steps, checkpoint=True, both=pair,
                      generator=torch.Generator().manual_seed(5), base_in_backward=late, params=params if late else ())
        loss = out.kl.sum() - out.x.square().mean()
        grads = torch.autograd.grad(loss, params)
        return out.kl.detach(), grads  # with `late` the backward has filled the window's KL in

    # apart, paired in both passes, and the policy alone in the first pass then, in the backward, one paired call or
    # the base's and the policy's apart (`_InBackward`)
    # This control pays up to 10⁴ nats a step, and the chain carries a call's float rounding (a batch of twice the rows
    # sums in another order) into the gradients: up to 0.13 % apart on an Intel Xeon host, 2e-6 with the model in
    # float64. A mask missed or a copy swapped moves them by their own size.
    (kl_apart, g_apart), *others = window(None), window(both), window(both, late=True), window(None, late=True)
    for kl, g in others:
        assert kl_apart.sum() > 1e-3 and torch.allclose(kl_apart, kl, rtol=1e-3, atol=1e-6)
        for a, b in zip(g_apart, g):
            assert a.norm() > 0 and (a - b).norm() < 1e-2 * a.norm(), (a - b).norm() / a.norm()


@pytest.mark.parametrize("kit,merged", [("sd", False), ("ddpm", False), ("ddpm", True)])
def test_the_frozen_policy_has_the_policys_value_and_state_gradient_and_none_for_the_adapter(kit, merged):
    """`frozen_denoiser` (pathwise's stl): the policy's prediction, its gradient to the state x the policy's own, and
    no gradient to the adapter; under a checkpointed window the stl loss reaches the adapter through the states only,
    and differs from the KL loss's gradient. The same with the merged LoRA forward on."""
    from sb_finetune.control import base_denoiser, frozen_denoiser, use_merged_forward

    fam = family_of(TINY_PIPELINES[kit]())
    params = add_lora_control(fam.module, rank=4, target_modules=MERGE_TARGETS[kit] if merged else DEFAULT_TARGETS)
    if merged:
        assert use_merged_forward(fam.module) > 0
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    cond = fam.encode(PROMPTS if fam.conditional else None, 2, 4.0)
    policy = fam.denoiser(fam.module, cond)
    base, frozen = base_denoiser(policy, fam.module), frozen_denoiser(policy, fam.module)
    schedule = fam.schedule(3)
    x = fam.start_noise(fam.latent_shape(2), g, "cpu").requires_grad_(True)
    t = schedule.timesteps[1]
    out, out_frozen = policy(x, t), frozen(x, t)
    assert torch.allclose(out, out_frozen, rtol=1e-4, atol=1e-5)  # fp32 order: ~3e-6 on ddpm
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    (gx_frozen,) = torch.autograd.grad(out_frozen.square().sum(), x)
    assert gx.norm() > 0 and (gx - gx_frozen).norm() < 1e-4 * gx.norm(), (gx - gx_frozen).norm() / gx.norm()
    assert all(gp is None for gp in torch.autograd.grad(frozen(x, t).square().sum(), params, allow_unused=True))
    grads = {}
    for name in ("kl", "stl"):
        o = rollout(policy, base, schedule, x.detach(), window=schedule.num_steps, checkpoint=True,
                    generator=torch.Generator().manual_seed(5), frozen=frozen if name == "stl" else None)
        terms = o.kl if name == "kl" else o.path_terms
        grads[name] = torch.autograd.grad(terms.sum() - o.x.square().mean(), params)
    assert sum(float((a - b).norm()) for a, b in zip(grads["kl"], grads["stl"])) > 1e-4
    assert all(torch.isfinite(a).all() for a in grads["stl"])


# LoRA on convolutions (3×3 and the 1×1 shortcut) as well as linear layers: what the merged forward must reproduce
MERGE_TARGETS = {"sd": ["to_q", "to_v", "to_out.0", "conv1", "conv2", "proj_in"],
                 "ddpm": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut"]}


def _never(*args, **kwargs):
    raise AssertionError("the merged forward called a LoRA part whose weight was all it needed")


@pytest.mark.parametrize("kit", ["sd", "ddpm"])
def test_the_merged_lora_forward_is_peft_s_layer_in_values_and_gradients(kit):
    """`use_merged_forward`: every LoRA layer as one call with W + s·BA gives peft's outputs and the same gradients to the
    state and the adapter (3×3 and 1×1 convolutions, linear layers, lora_alpha ≠ rank), without calling the adapter's
    own A and B layers; with the adapter disabled it is the base."""
    from sb_finetune.control import adapter_disabled, use_merged_forward

    def run(merged):
        fam = family_of(TINY_PIPELINES[kit]())
        params = add_lora_control(fam.module, rank=4, lora_alpha=6, target_modules=MERGE_TARGETS[kit])
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in params:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        layers = _tuner_layers(fam.module)
        kernels = {tuple(m.get_base_layer().weight.shape[2:]) for m in layers}
        assert {(), (1, 1), (3, 3)} <= kernels, kernels  # linear, 1×1 and 3×3 layers all adapted
        if merged:
            assert use_merged_forward(fam.module) == len(layers)
            for m in layers:  # the merge reads A's and B's weights and never calls them
                m.lora_A["default"].forward = m.lora_B["default"].forward = _never
        policy = fam.denoiser(fam.module, fam.encode(PROMPTS if fam.conditional else None, 2, 4.0))
        x = fam.start_noise(fam.latent_shape(2), torch.Generator().manual_seed(4), "cpu").requires_grad_(True)
        t = fam.schedule(3).timesteps[1]
        out = policy(x, t)
        grads = torch.autograd.grad(out.square().sum(), [x, *params])
        with torch.no_grad(), adapter_disabled(fam.module):
            bare = policy(x, t)
        return out.detach(), grads, bare

    (out, grads, bare), (out_m, grads_m, bare_m) = run(False), run(True)
    assert (out - bare).abs().max() > 1e-2  # the adapter matters
    # float rounding at the output's scale (W·x + s·B(A·x) and (W + s·BA)·x sum in another order): 2.1e-5 at a scale of
    # ~1 under AVX2 kernels; the adapter itself moves the output by over 1e-2
    assert (out - out_m).abs().max() <= 1e-4 * out.abs().max(), (out - out_m).abs().max() / out.abs().max()
    assert torch.equal(bare, bare_m)
    for a, b in zip(grads, grads_m):
        assert a.norm() > 0 and (a - b).norm() < 1e-4 * a.norm(), (a - b).norm() / a.norm()


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups")
def test_the_merged_lora_forward_keeps_peft_s_where_the_merge_would_differ():
    """A grouped convolution, one that pads by reflection (peft's A pads with zeros) and half-precision weights keep
    peft's own forward; so does every layer under autocast, whose bf16 copy of W + s·BA would round the small s·BA away."""
    from peft import LoraConfig, inject_adapter_in_model

    from sb_finetune.control import use_merged_forward

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), torch.nn.Conv2d(8, 8, 3, padding=1, groups=2),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 5))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "1", "2", "4"], init_lora_weights="gaussian"), net)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 4, 6, 6)
    stock = net(x)
    assert use_merged_forward(net) == 2  # the plain 3×3 convolution and the linear layer
    # float rounding at the output's scale: the linear layer sums terms of ~10³ into outputs near 0, in another order
    assert (net(x) - stock).abs().max() <= 1e-5 * stock.abs().max()
    net[2].lora_A["default"].forward = _never  # the merge takes A's weight alone outside autocast, and A's call inside
    net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(AssertionError, match="merged forward"):
            net(x)
        net[2].lora_A["default"].__dict__.pop("forward")
        merged_bf16 = net(x)
        assert use_merged_forward(net, on=False) == 0  # peft's own forward in the same autocast
        assert torch.equal(merged_bf16, net(x))
    half = torch.nn.ModuleDict({"lin": torch.nn.Linear(4, 4).to(torch.bfloat16)})
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["lin"]), half)
    assert use_merged_forward(half) == 0


def test_a_paired_call_is_not_offered_where_masking_would_not_give_the_base():
    """DoRA rescales the whole weight, not the adapter's output alone: there the trainer calls policy and base apart."""
    from peft import LoraConfig

    from sb_finetune.control import attach_adapter, paired_denoiser

    fam = family_of(TINY_PIPELINES["sd"]())
    fam.module.requires_grad_(False)
    attach_adapter(fam.module, LoraConfig(r=2, target_modules=["to_q"], use_dora=True))
    assert paired_denoiser(fam.denoiser(fam.module, fam.encode(PROMPTS, 2).repeat(2)), fam.module) is None
