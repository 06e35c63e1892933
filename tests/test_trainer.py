"""train.py and the trainer on the tiny kit: it trains, writes a loadable adapter, and refuses bad input clearly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sb_finetune.config import load_config
from sb_finetune.rewards import register_reward

ROOT = Path(__file__).resolve().parents[1]
calls = {"n": 0}


@register_reward("nan_on_second_call")
def _nan_on_second_call(images, prompts):
    calls["n"] += 1
    value = images.mean(dim=(1, 2, 3))
    return value * float("nan") if calls["n"] == 2 else value


def _smoke(tmp_path, *extra):
    return load_config(str(ROOT / "configs/smoke.yaml"), [f"output.dir={tmp_path}", "optim.steps=2", *extra])


def test_smoke_training_writes_a_diffusers_lora(tmp_path):
    from sb_finetune.trainer import train

    result = train(_smoke(tmp_path, "optim.lr=1e-2"))
    assert result["steps"] == 2 and result["skipped"] == 0
    weights = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("unet.") and ".module." not in k for k in weights)
    lora_b = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # trained: B moved off its zero init
    meta = json.loads((tmp_path / "sb_finetune.json").read_text())
    assert meta["family"] == "sd" and meta["base_model"] == "tiny:sd" and meta["alpha"] == 0.1
    assert (tmp_path / "config.yaml").exists()
    for row in result["history"]:
        assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k != "grad_norm")

    # the stock diffusers route loads it and changes the images
    from sb_finetune.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    kw = dict(prompt="a cat", num_inference_steps=3, output_type="pt")
    before = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(tmp_path))
    after = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("accum", [1, 2])
def test_nan_reward_step_is_skipped_and_training_continues(tmp_path, accum):
    """The NaN comes on the 2nd reward call: with accumulation 2 it voids the whole first step, not half of it."""
    from sb_finetune.trainer import train

    calls["n"] = 0
    result = train(_smoke(tmp_path, "optim.steps=3", "reward.name=nan_on_second_call", f"optim.grad_accum={accum}"))
    assert result["steps"] == 3 and result["skipped"] == 1
    assert result["history"][1 if accum == 1 else 0]["reward_mean"] != result["history"][1 if accum == 1 else 0]["reward_mean"]
    weights = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


@register_reward("always_nan")
def _always_nan(images, prompts):
    return images.mean(dim=(1, 2, 3)) * float("nan")


@register_reward("returns_a_list")
def _returns_a_list(images, prompts):
    return [0.0] * images.shape[0]


def test_a_reward_that_keeps_returning_nan_stops_training_with_its_name(tmp_path):
    from sb_finetune.trainer import MAX_BAD_REWARD_STEPS, train

    with pytest.warns(UserWarning, match=r"reward 'always_nan' returned non-finite values for 2 of 2 images \(\[nan, nan\]\)"):
        with pytest.raises(RuntimeError, match=rf"reward 'always_nan' returned non-finite .* on {MAX_BAD_REWARD_STEPS} steps in a row"):
            train(_smoke(tmp_path, "optim.steps=10", "reward.name=always_nan"))


def test_a_reward_returning_a_non_tensor_names_the_reward_and_the_type(tmp_path):
    from sb_finetune.trainer import train

    with pytest.raises(ValueError, match=r"reward 'returns_a_list' returned list, expected a float tensor of shape \[2\]"):
        train(_smoke(tmp_path, "reward.name=returns_a_list"))
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()


def _run_train(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_bad_inputs_exit_with_one_clear_message(tmp_path):
    cases = {
        ("optim.lrr=1",): "optim.lrr",
        ("optim.lr=fast",): "optim.lr",
        ("prompts.file=/nonexistent/prompts.txt",): "prompts.file",
        ("reward.name=no_such_reward",): "unknown reward 'no_such_reward'",
        ("--config", "configs/missing.yaml"): "config file not found",
    }
    for args, expected in cases.items():
        r = _run_train(*args, f"output.dir={tmp_path}")
        assert r.returncode == 2, (args, r.stderr[-500:])
        assert expected in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-500:])
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()


def test_wrong_reward_shape_names_the_reward():
    import pytest

    from sb_finetune.rewards import Reward
    from sb_finetune.trainer import score

    class Bad(Reward):
        name = "bad_shape"

        def forward(self, images, prompts):
            return images.mean()

    with pytest.raises(ValueError, match=r"reward 'bad_shape' returned shape \(\)"):
        score(Bad(), torch.rand(2, 3, 8, 8), ["a", "b"])


def test_base_yaml_documents_exactly_the_schema():
    from dataclasses import asdict

    from sb_finetune.config import Config

    assert asdict(load_config(str(ROOT / "configs/base.yaml"))) == asdict(Config())
    text = (ROOT / "configs/base.yaml").read_text()
    for section, fields in asdict(Config()).items():
        for name in fields:
            line = next((ln for ln in text.splitlines() if ln.strip().startswith(f"{name}:")), "")
            assert "#" in line or name in ("list", "split", "column", "project", "lr", "weight_decay", "negative_prompt",
                                            "revision", "target_modules"), f"{section}.{name} has no comment"


def test_non_differentiable_reward_is_refused_before_the_model_loads():
    from sb_finetune.rewards import Reward
    from sb_finetune.trainer import build_reward

    @register_reward("jpeg_like_test_only")
    class NotDifferentiable(Reward):
        differentiable = False

        def forward(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    with pytest.raises(ValueError, match=r"reward 'jpeg_like_test_only' is not differentiable"):
        build_reward(load_config(None, ["reward.name=jpeg_like_test_only"]))
