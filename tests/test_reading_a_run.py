"""What a user sees while a run goes: held-out rewards beside the trained one, the optimum as every curve's reference,
the KL per sampling step, readable grids, and an alarm when the KL runs away."""

import glob
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from sb_finetune.config import ConfigError, load_config
from sb_finetune.plots import grid_image, save_curves, series

ROOT = Path(__file__).resolve().parents[1]
CRIMSON = (220, 20, 60)  # the optimum's reference line


def _colors(path) -> set:
    return {c for _, c in Image.open(path).convert("RGB").getcolors(1 << 20)}


def test_smoke_run_with_a_held_out_reward_shows_the_optimum_the_kl_profile_and_logs_it(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sb_finetune.trainer import train

    cfg = load_config(str(ROOT / "configs/smoke.yaml"), [
        f"output.dir={tmp_path}", "optim.steps=2", "logging.eval_every=1", "logging.summary_samples=8",
        "logging.eval_rewards=[contrast,jpeg_compressibility]", "logging.tracker=tensorboard"])
    result = train(cfg)
    history = result["history"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    optimum = summary["optimum"]
    for row in history:  # every evaluation scored by the trained and the held-out rewards, and the gap logged
        assert {"eval/reward", "eval/contrast", "eval/jpeg_compressibility", "eval/kl"} <= set(row)
        assert row["objective_gap"] == pytest.approx(row["objective"] - summary["optimum_base_only"]["objective"])
    assert {"eval/contrast_before", "eval/contrast_after", "eval/jpeg_compressibility_after"} <= set(summary)
    for held_out in ("eval/contrast", "eval/jpeg_compressibility"):  # what the optimum does to them: their reference
        assert held_out in optimum and held_out in summary["optimum_base_only"]
    assert (tmp_path / "samples" / "before_after.png").is_file()
    assert CRIMSON in _colors(tmp_path / "curves.png")  # the optimum's dashed line is drawn
    curves = Image.open(tmp_path / "curves.png")
    assert curves.height == 230 * 7  # reward, KL, objective and the four evaluation panels (kl, reward, 2 held out)
    assert (tmp_path / "kl_profile.png").is_file() and (tmp_path / "samples_before_after.png").is_file()
    grid = Image.open(tmp_path / "samples" / "step_000002.png")
    assert grid.width >= 2 * 128 + 170 and grid.height >= 3 * 128  # 2 seeds × 3 prompts, upscaled, labelled rows
    events = EventAccumulator(glob.glob(str(tmp_path / "sb-finetune" / "events*"))[0]).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"optimum/objective", "optimum/kl", "optimum/eval/contrast", "objective_gap", "eval/contrast", "eval/kl"} <= tags
    assert events.Scalars("optimum/kl")[0].value == pytest.approx(summary["optimum_base_only"]["kl"], rel=1e-5)
    assert optimum["effective_samples"] > 0
    assert "kl_profile" in events.Tags()["images"]


def test_curves_draw_the_reference_and_evaluations_at_their_steps(tmp_path):
    history = [{"reward_mean": 0.1 * i, "kl": 0.2 * i, "objective": 1.0 - 0.1 * i} for i in range(5)]
    history[1]["eval/contrast"], history[4]["eval/contrast"] = 0.3, 0.2
    assert series(history, "eval/contrast", {"eval/contrast": 0.4}) == [(0, 0.4), (2, 0.3), (5, 0.2)]
    save_curves(history, str(tmp_path / "no_ref.png"))
    assert CRIMSON not in _colors(tmp_path / "no_ref.png")
    save_curves(history, str(tmp_path / "ref.png"), {"kl": 3.0, "effective_samples": 40.0})
    assert CRIMSON in _colors(tmp_path / "ref.png")


def test_grids_are_upscaled_with_nearest_and_labelled():
    images = torch.rand(6, 3, 16, 16)
    plain = grid_image(images, 3)
    assert plain.size == (3 * 128 + 4 * 2, 2 * 128 + 3 * 2)
    tile = torch.nn.functional.interpolate(images[:1], scale_factor=8, mode="nearest")[0]
    first = torch.tensor(list(plain.crop((2, 2, 130, 130)).getdata()), dtype=torch.float32).view(128, 128, 3) / 255
    torch.testing.assert_close(first.permute(2, 0, 1), tile, atol=1 / 255, rtol=0)  # sharp pixels, not blurred
    assert grid_image(images, 3, ["a cat", "a red car"]).width == plain.width + 170


def test_kl_alarm_warns_once_and_can_stop_the_run(tmp_path):
    from sb_finetune.trainer import train

    cfg = load_config(str(ROOT / "configs/smoke.yaml"), [f"output.dir={tmp_path}", "optim.steps=6", "logging.eval_every=0",
                                                         "optim.lr=1e-2", "logging.kl_alarm=1e-9", "logging.kl_alarm_stop=true"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg)
    said = [str(w.message) for w in caught if "logging.kl_alarm" in str(w.message)]
    assert len(said) == 1 and "stopping here" in said[0] and said[0].startswith(f"step {result['steps']}:")
    assert 2 <= result["steps"] < 6  # the zero control pays no KL at step 1; the first update does
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(ConfigError, match="logging.kl_alarm"):
        load_config(None, ["logging.kl_alarm=0"])


def test_the_summary_draws_the_base_paths_once_and_scores_the_trained_control_along_them(monkeypatch):
    """summary.json's before and after rest on the same base paths (one seed): before training, with the adapter
    still zero, the control's samples ARE those paths, drawn at one denoiser call a step; after, the kept paths are
    scored along their states (one policy call a step), not drawn again. Every number is the one a fresh draw gives,
    bit for bit; the model sees 1 and 3 rows a path and step instead of 2 and 4. A control that starts nonzero
    (`control.init_from`) gets its optimum from the base's own paths, not from its samples."""
    from sb_finetune.control import add_lora_control, control_is_zero
    from sb_finetune.evaluation import draw_base_paths, sample_paths, summarize
    from sb_finetune.families import family_of
    from sb_finetune.objective import tilted_optimum
    from sb_finetune.testing import TINY_PIPELINES

    fam = family_of(TINY_PIPELINES["sd"]())
    params = add_lora_control(fam.module, rank=4)
    schedule, prompts, n, chunk = fam.schedule(4), ["a cat", "a red square", "a dog"], 10, 4
    reward = lambda images, shown: images.mean((1, 2, 3)) * 8 - 4 * torch.tensor(  # noqa: E731  (depends on the prompt)
        [float(p == "a dog") for p in shown])
    held_out = {"brightness": lambda images, shown: images.mean((1, 2, 3))}
    rows = []
    fam.module.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))

    def summary(optimum, base=None):
        rows.clear()
        numbers, images, kept = summarize(fam, fam.module, schedule, reward, prompts, n, chunk, seed=7, guidance_scale=3.0,
                                          alpha=0.5, optimum=optimum, held_out=held_out, base=base)
        return numbers, kept, sum(rows) // 2  # classifier-free guidance: [uncond; cond] a call

    assert control_is_zero(fam.module)
    before, kept, seen = summary("base")
    assert seen == n * schedule.num_steps and kept.kept  # the base alone, once
    drawn_anew = sample_paths(fam, fam.module, schedule, reward, prompts, n, chunk, seed=7, guidance_scale=3.0)
    assert before["kl"] == 0 and before["reward_mean"] == float(drawn_anew.reward.mean())
    fresh = tilted_optimum(drawn_anew.reward, 0.5).numbers()
    assert {k: before["optimum"][k] for k in fresh} == fresh
    assert before["optimum"]["eval/brightness"] != before["eval/brightness"]  # reweighted to the optimum
    # where training starts: the base's distance alpha·KL(P_base ‖ P*) = alpha·log Z* − E_base[R] > 0
    assert before["gap"]["objective"] == pytest.approx(0.5 * math.log(float(
        torch.exp(drawn_anew.reward.double() / 0.5).mean())) - float(drawn_anew.reward.double().mean()), rel=1e-6)
    assert before["gap"]["objective"] > 0

    with torch.no_grad():  # "training": the control moves
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    assert not control_is_zero(fam.module)
    after_kept, _, seen_kept = summary("both", kept)
    after_fresh, _, seen_fresh = summary("both")
    assert after_kept == after_fresh and after_kept["gap"]["objective"] > 0
    assert (seen_kept, seen_fresh) == (3 * n * schedule.num_steps, 4 * n * schedule.num_steps)
    other = draw_base_paths(fam, fam.module, schedule, reward, prompts, n, chunk, seed=8, guidance_scale=3.0)
    assert summary("both", other)[0] == after_fresh  # kept paths of another draw are not used

    started, _, _ = summary("base")  # a control loaded before the first step: the optimum is still the base's
    assert started["kl"] > 0 and {k: started["optimum"][k] for k in fresh} == fresh
    # its distance to the base's optimum: by the per-step KL, its objective less the optimum's
    assert started["gap"]["objective_by_kl"] == pytest.approx(started["objective"] - started["optimum"]["objective"])
    assert started["gap"]["objective"] > before["gap"]["objective"]  # this random control is farther than the base

    from sb_finetune import evaluation

    monkeypatch.setattr(evaluation, "KEEP_BASE_PATHS_BYTES", 1)  # paths too large to keep: drawn again, as before
    too_large = draw_base_paths(fam, fam.module, schedule, reward, prompts, n, chunk, seed=7, guidance_scale=3.0)
    assert not too_large.kept
    assert summary("both", too_large)[0] == after_fresh
    scored = sample_paths(fam, fam.module, schedule, reward, prompts, n, chunk, seed=7, guidance_scale=3.0,
                          from_base=True)
    assert scored.log_ratio.abs().sum() > 0 and torch.equal(scored.reward, too_large.paths.reward)
