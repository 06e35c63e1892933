"""The shipped digits models: the classifier reads real digits, the DDPM draws digits of every class, the reward works."""

import pytest
import torch
from safetensors import safe_open

from sb_finetune.digits import BASE_DIR, CLASSIFIER_FILE, load_digits_tensor
from sb_finetune.rewards import load_reward


def test_shipped_classifier_reads_the_digits():
    x, y = load_digits_tensor()
    reward = load_reward("digit", target=3)
    images = ((x + 1) / 2).expand(-1, 3, -1, -1)  # as the trainer hands them over: RGB in [0, 1]
    with torch.no_grad():
        accuracy = float((reward.logits(images).argmax(1) == y).float().mean())
    with safe_open(CLASSIFIER_FILE, framework="pt") as f:
        held_out = float(f.metadata()["held_out_accuracy"])
    assert accuracy > 0.98 and held_out > 0.97


def test_digit_reward_is_log_probability_of_the_target_with_pixel_gradients():
    x, y = load_digits_tensor()
    images = ((x[:8] + 1) / 2).expand(-1, 3, -1, -1).clone().requires_grad_(True)
    out = load_reward("digit", target=int(y[0]))(images, [""] * 8)
    assert out.shape == (8,) and (out <= 0).all() and out[0] > -0.1  # a real image of the target: p ≈ 1
    out.sum().backward()
    assert images.grad.abs().sum() > 0


def test_shipped_ddpm_draws_every_digit():
    from sb_finetune.pipelines import SBDDPMPipeline

    pipe = SBDDPMPipeline.from_pretrained(BASE_DIR)
    from sb_finetune.config import load_config

    out = pipe(batch_size=200, timesteps=load_config("digits").sampler.timesteps, output_type="pt",  # the default's chain
               generator=torch.Generator().manual_seed(0))
    reward = load_reward("digit", target=0)
    with torch.no_grad():
        probs = torch.softmax(reward.logits(out.images), dim=1)
    counts = torch.bincount(probs.argmax(1), minlength=10)
    assert (counts >= 5).all() and counts.max() <= 50, counts.tolist()  # every class, none dominant (base ≈ 1/10 each)
    assert probs.max(1).values.mean() > 0.8  # the classifier is sure: the samples look like digits


def test_a_short_default_run_raises_the_reward_and_writes_its_summary(tmp_path):
    import json

    from sb_finetune.config import load_config
    from sb_finetune.trainer import train

    from pathlib import Path

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs/digits.yaml"), [f"output.dir={tmp_path}", "optim.steps=4", "optim.batch_size=16",
                                              "logging.summary_samples=64"])
    train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["kl_before"] == 0.0 and summary["kl_after"] > 0
    assert summary["reward_mean_after"] > summary["reward_mean_before"] + 1.0
    assert summary["target_fraction_after"] > summary["target_fraction_before"]
    assert {"diversity_after", "diversity_real_after", "seconds", "objective_after"} <= set(summary)
    # the optimum's reference, from the base samples: p_base(0) ≈ 0.11, so −log Z ≈ 2.2 nats, most mass on 0s
    best = summary["optimum"]
    assert 1.0 < best["objective"] < 3.5 and 0 < best["kl"] < best["objective"] and best["target_fraction"] > 0.7
    # after training it rests on the base and the trained samples together: more effective samples than before
    assert best["effective_samples"] > summary["optimum_base_only"]["effective_samples"]
    gap = summary["gap_after"]  # alpha·KL(P_θ ‖ P*) on paths: ≥ 0 up to noise, and what is left to gain
    assert gap["objective"] > -3 * gap["objective_se"] and gap["objective"] < summary["objective_after"]
    # the same distance by the per-step KL: the summary's objective less the optimum's; both count the optimum's error
    assert gap["objective_by_kl"] == pytest.approx(summary["objective_after"] - best["objective"], abs=1e-4)
    assert min(gap["objective_se"], gap["objective_by_kl_se"]) > best["objective_se"] > 0
    assert len(summary["kl_per_step_after"]) == 20 and abs(sum(summary["kl_per_step_after"]) - summary["kl_after"]) < 1e-3
    for name in ("samples_before.png", "samples_after.png", "curves.png", "pytorch_lora_weights.safetensors"):
        assert (tmp_path / name).exists(), name
    from sb_finetune.pipelines import SBDDPMPipeline, load_finetuned

    pipe = load_finetuned(str(tmp_path))  # base "builtin:digits" + the adapter, in one line, on the grid it was trained on
    assert summary["timesteps"] == cfg.sampler.timesteps and cfg.sampler.timesteps[0] == 999
    seen = []
    out = pipe(batch_size=4, output_type="pt", return_kl=True, generator=torch.Generator().manual_seed(0),
               callback_on_step_end=lambda p, k, t, tensors: seen.append(int(t)) or {})
    assert isinstance(pipe, SBDDPMPipeline) and out.images.shape == (4, 3, 16, 16) and out.kl.sum() > 0
    assert seen == cfg.sampler.timesteps
