"""train.py and the trainer on the tiny kit: it trains, writes a loadable adapter, and refuses bad input clearly."""

import json
import math
import os
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
    return load_config(str(ROOT / "configs/smoke.yaml"), [f"output.dir={tmp_path}", "optim.steps=2", "logging.eval_every=0", *extra])


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
    assert (tmp_path / "curves.png").is_file()  # without evaluations or a summary too
    saved = load_config(str(tmp_path / "config.yaml"))
    assert saved.objective.checkpointing is False  # auto, resolved: the tiny kit's latent is small
    for row in result["history"]:
        assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k != "grad_norm")
        assert row["peak_mem_mb"] >= row["setup_mem_mb"] > 0 and 1 <= row["kl_steps"] <= 20

    # the stock diffusers route loads it and changes the images
    from sb_finetune.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    kw = dict(prompt="a cat", num_inference_steps=3, output_type="pt")
    before = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(tmp_path))
    after = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert not torch.allclose(before, after)


def test_adjoint_matching_trains_with_guidance_and_logs_its_numbers(tmp_path):
    """estimator=adjoint through the trainer: classifier-free guidance inside the rollout and the lean adjoint,
    K of the controlled steps regressed, the adapter moves; the log carries reward, KL and the adjoint's size."""
    from sb_finetune.trainer import train

    result = train(_smoke(tmp_path, "optim.lr=1e-2", "objective.estimator=adjoint", "objective.adjoint_steps=2",
                          "sampler.guidance_scale=3", "optim.steps=3"))
    assert result["steps"] == 3 and result["skipped"] == 0
    for row in result["history"]:
        assert row["grad_steps"] == 2 and math.isfinite(row["loss"]) and row["adjoint_norm"] > 0 and row["kl"] >= 0
    assert result["history"][-1]["kl"] > 0  # the control moved off the base
    weights = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)


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


def test_a_window_kl_made_in_the_backward_that_is_nan_skips_the_step(tmp_path, monkeypatch):
    """Under checkpointing the window's KL is made in the backward (`rollout(base_in_backward=True)`), after the
    pre-backward check: a NaN there must still leave the weights untouched, the step skipped and said, and the log
    shows it; the next steps train."""
    from sb_finetune import rollout as rollout_module
    from sb_finetune.trainer import train

    made, step_kl = {"n": 0}, rollout_module.step_kl

    def nan_once_in_the_backward(mean_policy, mean_base, std):
        kl = step_kl(mean_policy, mean_base, std)
        if mean_base.requires_grad:  # the backward's call (the forward's KLs are made without a graph to the base)
            made["n"] += 1
            if made["n"] == 1:
                return kl * float("nan")
        return kl

    monkeypatch.setattr(rollout_module, "step_kl", nan_once_in_the_backward)
    with pytest.warns(UserWarning, match="step 0: the KL to the base was not finite; step skipped, weights untouched"):
        result = train(_smoke(tmp_path, "optim.steps=3", "objective.checkpointing=true", "optim.lr=1e-2"))
    assert made["n"] >= 3 and result["steps"] == 3 and result["skipped"] == 1
    first, later = result["history"][0], result["history"][1:]
    assert math.isnan(first["kl"]) and math.isnan(first["grad_norm"])
    assert all(math.isfinite(row["kl"]) and row["kl"] > 0 for row in later[1:])  # the control moved after the skip
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


# ----------------------------------------------------------------------------- checkpoints, resume, many processes


@pytest.mark.parametrize("lora_plus", ["1", "4"])
def test_resume_continues_exactly(tmp_path, lora_plus):
    """4 steps straight == 2 steps, stop, `--resume latest` to 4: same adapter, same step count, same history, the
    learning-rate schedule where it was (cosine with a warm-up step: lr 0, then 1e-2 · (1 + cos(π·i/3))/2); with
    LoRA+ (`optim.lora_plus_ratio=4`) the B matrices' group restarts at 4× that."""
    from sb_finetune.trainer import train

    lr = ("optim.lr=1e-2", "optim.lr_schedule=cosine", "optim.warmup_steps=1", f"optim.lora_plus_ratio={lora_plus}")
    straight = train(_smoke(tmp_path / "straight", "optim.steps=4", *lr))
    first = train(_smoke(tmp_path / "split", "optim.steps=2", *lr, "output.checkpoint_every=2"))
    checkpoint = tmp_path / "split" / "checkpoints" / "checkpoint_2"  # named by its step
    assert (checkpoint / "pytorch_lora_weights.safetensors").exists() and (checkpoint / "config.yaml").exists()
    assert not list(checkpoint.glob("model*.safetensors"))  # the LoRA, not the frozen model, per checkpoint
    resumed = train(_smoke(tmp_path / "split", "optim.steps=4", *lr, "output.checkpoint_every=2"), resume="latest")
    assert first["steps"] == 2 and resumed["steps"] == 4 and len(resumed["history"]) == 4
    for k, v in straight["lora"].items():
        assert torch.equal(v, resumed["lora"][k]), k
    assert [h["reward_mean"] for h in straight["history"]] == [h["reward_mean"] for h in resumed["history"]]
    expected = [0.0] + [1e-2 * (1 + math.cos(math.pi * i / 3)) / 2 for i in range(3)]  # the lr each step used
    assert [h["lr"] for h in resumed["history"]] == pytest.approx(expected)
    assert [h["lr"] for h in straight["history"]] == pytest.approx(expected)
    assert any(not torch.equal(v, first["lora"][k]) for k, v in resumed["lora"].items())


def test_lora_plus_gives_the_b_matrices_their_own_rate(tmp_path):
    """`optim.lora_plus_ratio=4`: B starts at 0, so A has no gradient on the first step and stays at its init, while
    Adam moves every B entry by its rate times g/(|g| + ε): 4× the entries of the same step at ratio 1, entry for entry.
    A checkpoint of the other kind (one group against two) is refused on resume with the key to set."""
    from sb_finetune.trainer import train

    one = ("optim.steps=1", "optim.lr=1e-2", "output.checkpoint_every=1")
    plain = train(_smoke(tmp_path / "plain", *one))["lora"]
    plus = train(_smoke(tmp_path / "plus", *one, "optim.lora_plus_ratio=4"))["lora"]
    b_keys = [k for k in plain if "lora_B" in k or "lora.up" in k]
    assert b_keys and len(b_keys) * 2 == len(plain)
    for k, v in plain.items():
        if k in b_keys:
            assert float(v.abs().max()) > 1e-3 and torch.allclose(plus[k], 4 * v, rtol=1e-4, atol=1e-7), k
        else:
            assert torch.equal(plus[k], v), k
    with pytest.raises(ValueError, match=r"another number of parameter groups than this run's 2 \(optim.lora_plus_ratio=4"):
        train(_smoke(tmp_path / "plain", "optim.steps=2", "optim.lr=1e-2", "optim.lora_plus_ratio=4"), resume="latest")
    from sb_finetune.config import ConfigError

    with pytest.raises(ConfigError, match=r"'optim.lora_plus_ratio': .* must be > 0, got 0"):
        _smoke(tmp_path, "optim.lora_plus_ratio=0")


def test_a_run_starts_from_a_saved_adapter_and_refuses_one_that_does_not_fit(tmp_path):
    """`control.init_from`: the saved adapter is the run's starting control (at lr 0 its one step changes nothing, and
    that step already pays KL where a fresh adapter's pays none); a different rank, module list or scale, or no
    adapter at all, stops the run with what differs."""
    from sb_finetune.trainer import train

    first = train(_smoke(tmp_path / "first", "optim.lr=1e-2"))
    again = train(_smoke(tmp_path / "again", f"control.init_from={tmp_path / 'first'}", "optim.lr=0", "optim.steps=1"))
    assert first["lora"].keys() == again["lora"].keys()
    for k, v in first["lora"].items():
        assert torch.equal(v, again["lora"][k]), k
    fresh = train(_smoke(tmp_path / "fresh", "optim.lr=0", "optim.steps=1"))
    assert again["history"][0]["kl"] > 1e-6 and fresh["history"][0]["kl"] == 0
    assert load_config(str(tmp_path / "again" / "config.yaml")).control.init_from == str(tmp_path / "first")
    bare = tmp_path / "bare"  # the LoRA file alone, as another tool would hand it over: no sb_finetune.json
    bare.mkdir()
    adapter_file = "pytorch_lora_weights.safetensors"
    (bare / adapter_file).write_bytes((tmp_path / "first" / adapter_file).read_bytes())
    from_bare = train(_smoke(tmp_path / "from_bare", f"control.init_from={bare}", "optim.lr=0", "optim.steps=1"))
    assert all(torch.equal(v, from_bare["lora"][k]) for k, v in first["lora"].items())

    start = f"control.init_from={tmp_path / 'first'}"
    with pytest.raises(ValueError, match=r"shapes or scale differ: .*lora_A.*\(4, \d+\) in the file, \(2, \d+\) here"):
        train(_smoke(tmp_path / "bad", start, "control.rank=2"))
    with pytest.raises(ValueError, match="the file has and this adapter lacks"):
        train(_smoke(tmp_path / "bad", start, "control.target_modules=[to_q,to_k]"))
    with pytest.raises(ValueError, match=r"scale lora_alpha / r: 1 in the file, 2 here"):
        train(_smoke(tmp_path / "bad", start, "control.lora_alpha=8"))
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        train(_smoke(tmp_path / "bad", f"control.init_from={tmp_path / 'nowhere' / 'x'}"))


def test_the_lora_config_is_read_from_either_header_layout(tmp_path):
    """A LoRA file's peft config, as ours writes it ({"unet": {...}}) and as diffusers' stock writer packs it
    ({"unet.r": ..., "unet.lora_alpha": ...}); a file without one reads as {}."""
    from safetensors.torch import save_file

    from sb_finetune.control import saved_lora_config

    layouts = {"ours": {"unet": {"r": 4, "lora_alpha": 8, "rank_pattern": {}}},
               "stock": {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {}}}
    for name, meta in layouts.items():
        save_file({"w": torch.zeros(1)}, tmp_path / f"{name}.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)})
        config = saved_lora_config(str(tmp_path / f"{name}.safetensors"))
        assert (config["r"], config["lora_alpha"]) == (4, 8), name
    save_file({"w": torch.zeros(1)}, tmp_path / "bare.safetensors")
    assert saved_lora_config(str(tmp_path / "bare.safetensors")) == {}


def test_eval_grids_are_written_before_during_and_after(tmp_path):
    from PIL import Image

    from sb_finetune.trainer import train

    train(_smoke(tmp_path, "optim.steps=4", "logging.eval_every=2", "logging.eval_seeds=[0,1,2]",
                 "logging.eval_prompts=[a cat, a dog]"))
    grids = sorted(p.name for p in (tmp_path / "samples").glob("step_*.png"))
    assert grids == ["step_000000.png", "step_000002.png", "step_000004.png"]
    assert (tmp_path / "samples" / "before_after.png").is_file()  # step 0 next to the last grid
    width, height = Image.open(tmp_path / "samples" / "step_000000.png").size
    assert (width, height) == (170 + 3 * 128 + 4 * 2, 2 * 128 + 3 * 2)  # labels; 3 seeds × 2 prompts, 32 px → 128


@pytest.mark.parametrize("run", ["kl_grad=window", "kl_grad=all", "stl", "checkpointing", "checkpointing_apart",
                                 "adjoint", "base_pool", "base_pool_contrast"])
def test_two_processes_end_with_identical_trained_control(two_ranks, run):
    """With kl_grad=all every step before the window has its own local backward (DDP's no_sync), reduced with the
    window's; Adjoint Matching backpropagates each regressed step on its own, all-reduced with the last; stl calls the
    policy a second time, outside DDP, with its weights held fixed (checkpointed: recomputed in the backward); a
    checkpointed window (`rollout._InBackward`) calls the policy without a graph first, then in the backward the
    policy and the base paired, or the base outside DDP and the policy apart, the weights' gradients leaving that
    backward as its outputs, and checks its KL there; base_pool
    regresses each process's own pool (kept in the checkpoint, one file a process) at steps both draw alike, and with
    the contrast target each process its own second control beside it. Were any left out of that all-reduce, the ranks
    would end with different weights."""
    from sb_finetune.pipelines import SBStableDiffusionPipeline

    out = two_ranks(run)
    if run.startswith("base_pool"):
        pools = [load_file(out / "checkpoints" / "checkpoint_4" / f"estimator_state_{i}.safetensors") for i in (0, 1)]
        assert all(p["pool_ends"].shape[0] == 4 for p in pools)
        assert not torch.equal(pools[0]["pool_ends"], pools[1]["pool_ends"])  # each process drew its own
        second = [{k: v for k, v in p.items() if k.startswith("pool_mean.param.")} for p in pools]
        assert bool(second[0]) == (run == "base_pool_contrast")  # the contrast's second control, one a process,
        assert not second[0] or any(not torch.equal(second[0][k], second[1][k]) for k in second[0])  # fitted apart
    r0, r1 = (load_file(out / f"rank{i}_of_2.safetensors") for i in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    lora_b = [v for k, v in r0.items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # moved off peft's zero init of B
    pipe = SBStableDiffusionPipeline.from_finetuned(str(out))
    images = pipe("a cat", num_inference_steps=4, output_type="pt", return_kl=True, generator=torch.Generator().manual_seed(0))
    assert images.kl.sum() > 0


def test_a_nan_on_one_process_skips_the_step_on_every_process(two_ranks):
    """Process 1's reward is NaN on step 1 while process 0's is finite. Skipping the backward on process 1 alone
    would leave process 0's all-reduce unpaired (a hang, or gloo aborting when it pairs with the next collective);
    every process must skip that step and end with the same, finite control."""
    out = two_ranks("nan_on_rank1")
    counts = [json.loads((out / f"rank{i}_of_2.json").read_text()) for i in (0, 1)]
    assert counts == [{"steps": 3, "skipped": 1}] * 2
    r0, r1 = (load_file(out / f"rank{i}_of_2.safetensors") for i in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) and torch.isfinite(r0[k]).all() for k in r0)
    history = json.loads((out / "history.json").read_text())  # process 0's: finite reward, yet skipped
    assert [h["skipped"] for h in history] == [0, 1, 1] and math.isfinite(history[1]["reward_mean"])


@pytest.mark.parametrize("name", ["sd15_aesthetic", "sd15_hps_pickscore", "sdxl_aesthetic", "sd3_pickscore",
                                  "flux_dev_pickscore", "flux_schnell_pickscore", "qwenimage_pickscore"])
def test_gpu_configs_are_valid_and_say_what_to_download_when_offline(name, tmp_path):
    cfg = load_config(str(ROOT / f"configs/{name}.yaml"))
    assert cfg.model.pretrained and not cfg.model.pretrained.startswith("tiny:") and cfg.objective.checkpointing
    assert Path(ROOT / cfg.prompts.file).is_file()
    r = _run_train("--config", f"configs/{name}.yaml", f"output.dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-800:]
    assert "hf download" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-800:]


@pytest.mark.parametrize("args", [("--config", "configs/sd15_aesthetic.yaml"),
                                  ("--config", "configs/smoke.yaml", "reward.name=aesthetic")])
def test_an_unreachable_hub_fails_at_once_with_one_sentence_not_retries(args, tmp_path):
    """Not told it is offline (no HF_HUB_OFFLINE), with the hub's endpoint refusing connections: the model or the reward's
    weights are looked up in the cache only, and the run stops with the one sentence, without huggingface_hub's retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # port 9: refused; an empty cache
    r = subprocess.run([sys.executable, "train.py", *args, f"output.dir={tmp_path / 'out'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Retry" not in r.stderr, r.stderr[-1500:]
    assert "hf download" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-1500:]


def test_checkpointing_turns_itself_on_for_large_latents():
    from sb_finetune.families import family_of
    from sb_finetune.testing import tiny_sd_pipeline
    from sb_finetune.trainer import AUTO_CHECKPOINT_LATENT, auto_checkpointing

    fam = family_of(tiny_sd_pipeline(), "auto")
    assert not auto_checkpointing(fam, None)  # the kit's own 32 px: 4·16·16 latent elements
    side = 2 * math.isqrt(AUTO_CHECKPOINT_LATENT // 4)  # 2 pixels a latent
    assert auto_checkpointing(fam, (side, side)) and not auto_checkpointing(fam, (side - 2, side - 2))


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_paired_calls_train_as_two_calls_do_and_turn_themselves_on_for_small_calls(tmp_path, monkeypatch, checkpointing):
    """objective.paired_calls: policy and base in one call of the DDP-wrapped module with the conditioning doubled
    (CFG on) gives the same losses, KL and adapter as two calls; under checkpointing every window step is
    `rollout._InBackward`, whose backward makes the paired call or the two apart; null resolves by the call's size, and
    config.yaml keeps what it resolved to."""
    from sb_finetune import rollout
    from sb_finetune.families import family_of
    from sb_finetune.testing import tiny_sd_pipeline
    from sb_finetune.trainer import AUTO_PAIRED_CALL, auto_paired_calls, train

    made = []
    apply = rollout._InBackward.apply
    monkeypatch.setattr(rollout._InBackward, "apply", lambda *a: made.append((a[7], a[3] is not None)) or apply(*a))
    runs = {}
    for paired in ("true", "false"):
        out = tmp_path / paired
        runs[paired] = train(_smoke(out, "optim.steps=2", "optim.lr=1e-2", "sampler.guidance_scale=4.0",
                                    "objective.window_min=6", f"objective.paired_calls={paired}",
                                    f"objective.checkpointing={checkpointing}"))
        assert f"paired_calls: {paired}" in (out / "config.yaml").read_text()
    # the window is the whole chain of 6 controlled steps: under checkpointing each step makes 6, paired or apart
    assert made == ([(k, paired) for paired in (True, False) for _ in range(2) for k in range(6)]
                    if checkpointing == "true" else [])
    for key in ("loss", "kl", "objective", "grad_norm"):
        a, b = ([h[key] for h in runs[p]["history"]] for p in ("true", "false"))
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), key
    # Adam's first steps are ±lr wherever a gradient is nonzero, so rounding flips the step of a near-zero gradient here
    # and there: one entry of 256 took a cross-attention key's up matrix 5.5 % away under AVX2 kernels
    # (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2), where a batch of twice the rows sums in another order. So: the
    # adapter as one within 1 %, and in every tensor all but a few entries equal; a missed mask or a swapped copy moves most
    flat = {p: torch.cat([v.flatten() for v in runs[p]["lora"].values()]) for p in ("true", "false")}
    assert (flat["true"] - flat["false"]).norm() <= 1e-2 * flat["true"].norm()
    for k, v in runs["true"]["lora"].items():
        off = ((v - runs["false"]["lora"][k]).abs() > 1e-3 * v.abs().max()).float().mean().item()
        assert off <= 0.05, (k, off)
    assert any(v.abs().sum() > 0 for k, v in runs["true"]["lora"].items() if "lora_B" in k or "lora.up" in k)
    if checkpointing == "true":
        return

    fam = family_of(tiny_sd_pipeline(), "auto")
    per_sample = math.prod(fam.latent_shape(1))  # the kit's 32 px: 4·16·16
    rows = AUTO_PAIRED_CALL // per_sample
    assert auto_paired_calls(fam, rows, None, 1) and auto_paired_calls(fam, rows // 2, None, 2)
    assert not auto_paired_calls(fam, rows + 1, None, 1) and not auto_paired_calls(fam, rows, None, 2)
    train(_smoke(tmp_path / "auto", "optim.steps=1"))
    assert "paired_calls: true" in (tmp_path / "auto" / "config.yaml").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_freed_activations_go_back_to_the_system():
    """glibc keeps a large block freed twice (its threshold rises to the first one's size), so a training step's
    resident set grew with every step of the window; the trainer fixes the threshold."""
    script = '''
import sys, torch
from sb_finetune.trainer import _release_freed_activations
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "fixed":
    _release_freed_activations()
a = torch.ones(2 << 20); del a  # 8 MB, freed: glibc alone would raise its mmap threshold to this size
b = torch.ones(2 << 20)
held = rss(); del b
print(held - rss())
'''
    returned = float(subprocess.run([sys.executable, "-c", script, "fixed"], capture_output=True, text=True,
                                    check=True).stdout)
    assert returned >= 7.5  # the 8 MB went back


def test_cpu_threads_share_the_physical_cores_among_local_processes(monkeypatch):
    """`accelerate launch` leaves OMP_NUM_THREADS=1 without --cpu; the trainer spreads the cores itself."""
    import psutil

    from sb_finetune.trainer import _cpu_threads

    cores = psutil.cpu_count(logical=False) or 1
    monkeypatch.delenv("SB_FINETUNE_CPU_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert _cpu_threads() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert _cpu_threads() == 1  # never zero
    monkeypatch.setenv("SB_FINETUNE_CPU_THREADS", "3")
    assert _cpu_threads() == 3
