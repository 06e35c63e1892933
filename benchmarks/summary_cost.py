"""What summary.json costs on the digits default, the base paths drawn once against drawn anew, interleaved in one
process so that this host's drifting speed hits both alike.

    python benchmarks/summary_cost.py [--samples 512] [--rounds 2]     (~4 minutes at 512 samples)

Before training, with the adapter still zero, the summary's samples of the control ARE its base samples: drawn once,
one denoiser call a step (`draw_base_paths`), against the control's rollout beside the base's (two calls a step, the
way before 2026-12-05). After training, the summary (`summarize`) scores the trained control along the kept base
paths (one policy call a step at their states), against drawing those paths again (one base call a step more). Both
ways give the same paths and numbers, bit for bit (checked here, and in `tests/test_reading_a_run.py`). The trained
control is an adapter from a digits run if `--adapter` names its folder, else the default's adapter at random
non-zero weights.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    import torch

    from sb_finetune.control import add_lora_control
    from sb_finetune.evaluation import draw_base_paths, sample_paths, summarize
    from sb_finetune.config import load_config
    from sb_finetune.pipelines import SBDDPMPipeline, load_finetuned
    from sb_finetune.digits import BASE_DIR
    from sb_finetune.rewards import load_reward

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--adapter", help="a digits run's folder: its adapter is the trained control")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = load_config("digits")
    reward, held_out = load_reward(cfg.reward.name, **cfg.reward.kwargs), {"contrast": load_reward("contrast")}
    fresh = SBDDPMPipeline.from_pretrained(BASE_DIR).sb_model
    add_lora_control(fresh.module, cfg.control.rank, cfg.control.lora_alpha, cfg.control.target_modules)
    if args.adapter:
        trained = load_finetuned(args.adapter).sb_model
    else:
        trained = SBDDPMPipeline.from_pretrained(BASE_DIR).sb_model
        params = add_lora_control(trained.module, cfg.control.rank, cfg.control.lora_alpha, cfg.control.target_modules)
        with torch.no_grad():
            for p in params:
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    schedule, n, batch = fresh.sampler_schedule(cfg.sampler), args.samples, 4 * cfg.optim.batch_size
    common = dict(alpha=cfg.objective.alpha, held_out=held_out)

    def before_then():  # the zero control's rollout beside the base's: its samples, which are the base's
        return sample_paths(fresh, fresh.module, schedule, reward, [""], n, batch)

    def before_now():  # the base's paths alone, their states kept
        return draw_base_paths(fresh, fresh.module, schedule, reward, [""], n, batch)

    kept = summarize(fresh, fresh.module, schedule, reward, [""], n, batch, optimum="base", **common)[2]
    rows = {"before": ([], []), "after": ([], [])}
    for _ in range(args.rounds):
        for name, ways in (("before", (before_then, before_now)),
                           ("after", (lambda: summarize(trained, trained.module, schedule, reward, [""], n, batch,
                                                        optimum="both", **common)[0],
                                      lambda: summarize(trained, trained.module, schedule, reward, [""], n, batch,
                                                        optimum="both", base=kept, **common)[0]))):
            results = []
            for times, way in zip(rows[name], ways):
                t0 = time.perf_counter()
                results.append(way())
                times.append(time.perf_counter() - t0)
            if name == "before":
                then, now = results[0], results[1].paths
                assert torch.equal(then.reward, now.reward) and torch.equal(then.images, now.images), "other paths"
                assert not then.kl.any() and not then.log_ratio.any()
            else:
                assert results[0] == results[1], "the kept paths gave other numbers"
    print(f"digits default, {n} samples, batches of {batch}, median of {args.rounds} interleaved rounds")
    print(f"{'summary':8s} {'drawn anew, s':>14s} {'drawn once, s':>14s} {'ratio':>6s}")
    for name, (then, now) in rows.items():
        a, b = statistics.median(then), statistics.median(now)
        print(f"{name:8s} {a:14.2f} {b:14.2f} {b / a:6.2f}")


if __name__ == "__main__":
    main()
