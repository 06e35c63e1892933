"""peft's LoRA forward against the merged one (`control.use_merged_forward`, the trainer's default on the CPU) on a
digits training step, interleaved in one process so that this host's drifting speed hits both alike:

    python benchmarks/merged_forward.py [--rounds 5] [--batch 32]     (~3 minutes)

Each row is the digits default's rollout (its chain, reward and adapter: rank 8 on conv1, conv2 and the attention
projections, at random non-zero weights) with a fixed gradient window of K steps, batch 32, and its backward; it prints
the median seconds of each forward and their ratio. The loss of both must agree (the same step, to float rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time

from digits_diagnosis import default_problem


def main() -> None:
    import torch

    from sb_finetune.control import add_lora_control, base_denoiser, use_merged_forward
    from sb_finetune.rollout import rollout

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="timed steps of each forward per row (alternating)")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    cfg, fam, schedule, _, _, reward = default_problem()
    params = add_lora_control(fam.module, cfg.control.rank, target_modules=cfg.control.target_modules)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:  # a control away from zero, as in training
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    policy = fam.denoiser(fam.module, fam.encode(None, 1))
    base = base_denoiser(policy, fam.module)

    def step(k: int, checkpoint: bool) -> float:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(fam.latent_shape(args.batch), generator=gen)
        out = rollout(policy, base, schedule, x, window=k, generator=gen, checkpoint=checkpoint, kl_sample=2)
        loss = (cfg.objective.alpha * out.kl.sum(1) - reward(out.x)).mean()
        loss.backward()
        return float(loss.detach())

    print("| K | checkpointing | peft's forward, s | merged, s | merged / peft | loss, peft / merged |\n|---|---|---|---|---|---|")
    for k, checkpoint in [(1, True), (10, True), (20, True), (10, False)]:
        times: dict[bool, list[float]] = {False: [], True: []}
        losses = {}
        for r in range(args.rounds + 1):
            for on in (False, True):
                use_merged_forward(fam.module, on)
                t0 = time.perf_counter()
                losses[on] = step(k, checkpoint)
                if r:  # the first round warms up
                    times[on].append(time.perf_counter() - t0)
        peft, fused = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {k} | {checkpoint} | {peft:.3f} | {fused:.3f} | {fused / peft:.3f} | {losses[False]:.5f} / {losses[True]:.5f} |",
              flush=True)


if __name__ == "__main__":
    main()
