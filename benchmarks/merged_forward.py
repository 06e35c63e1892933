"""A digits training step two ways, interleaved in one process so that this host's drifting speed hits both alike:
peft's LoRA forward against the merged one (`control.use_merged_forward`, the trainer's default on the CPU), or, with
`--base-in-backward`, a checkpointed window whose base is called in the first pass and again in the backward against
one whose base is called in the backward only (`rollout(base_in_backward=True)`, pathwise's way since 2026-12-04).

    python benchmarks/merged_forward.py [--rounds 5] [--batch 32]     (~3 minutes)
    python benchmarks/merged_forward.py --base-in-backward             (~3 minutes)

Each row is the digits default's rollout (its chain, reward and adapter: rank 8 on conv1, conv2 and the attention
projections, at random non-zero weights) with a fixed gradient window of K steps, batch 32, and its backward; it prints
the median seconds of each way and their ratio. The loss of both must agree (the same step, to float rounding). The
merged comparison keeps the base in both passes of a checkpointed window, as its table in benchmarks/README.md was
measured (before the base moved into the backward).
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
    ap.add_argument("--rounds", type=int, default=5, help="timed steps of each way per row (alternating)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--base-in-backward", action="store_true", help="compare where a checkpointed window calls the base")
    args = ap.parse_args()
    cfg, fam, schedule, _, _, reward = default_problem()
    params = add_lora_control(fam.module, cfg.control.rank, target_modules=cfg.control.target_modules)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:  # a control away from zero, as in training
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    policy = fam.denoiser(fam.module, fam.encode(None, 1))
    base = base_denoiser(policy, fam.module)

    def step(k: int, checkpoint: bool, late: bool) -> float:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(fam.latent_shape(args.batch), generator=gen)
        out = rollout(policy, base, schedule, x, window=k, generator=gen, checkpoint=checkpoint, kl_sample=2,
                      base_in_backward=late)
        r = reward(out.x)
        (cfg.objective.alpha * out.kl.sum(1) - r).mean().backward()
        return float((cfg.objective.alpha * out.kl.detach().sum(1) - r.detach()).mean())  # the window's KL filled in

    if args.base_in_backward:  # the merged forward on in both, as the trainer runs on the CPU
        use_merged_forward(fam.module)
        names, rows = ("base in both passes", "base in the backward"), [(1, True), (10, True), (19, True)]
    else:
        names, rows = ("peft's forward", "merged"), [(1, True), (10, True), (20, True), (10, False)]
    print(f"| K | checkpointing | {names[0]}, s | {names[1]}, s | ratio | loss, one / the other |\n|---|---|---|---|---|---|")
    for k, checkpoint in rows:
        times: dict[bool, list[float]] = {False: [], True: []}
        losses = {}
        for r in range(args.rounds + 1):
            for way in (False, True):
                if not args.base_in_backward:
                    use_merged_forward(fam.module, way)
                t0 = time.perf_counter()
                losses[way] = step(k, checkpoint, way and args.base_in_backward)
                if r:  # the first round warms up
                    times[way].append(time.perf_counter() - t0)
        one, other = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {k} | {checkpoint} | {one:.3f} | {other:.3f} | {other / one:.3f} | {losses[False]:.5f} / {losses[True]:.5f} |",
              flush=True)


if __name__ == "__main__":
    main()
