"""A digits training step two ways, interleaved in one process so that this host's drifting speed hits both alike:
peft's LoRA forward against the merged one (`control.use_merged_forward`, the trainer's default on the CPU), or, with
`--base-in-backward`, a checkpointed window whose base is called in the first pass and again in the backward against
one whose base is called in the backward only (`rollout(base_in_backward=True)`, pathwise's way since 2026-12-04).

    python benchmarks/merged_forward.py [--rounds 5] [--batch 32]     (~3 minutes)
    python benchmarks/merged_forward.py --base-in-backward             (~3 minutes)
    python benchmarks/merged_forward.py --paired                       (~2 minutes)
    python benchmarks/merged_forward.py --in-backward                  (~3 minutes)

Each row is the digits default's rollout (its chain, reward and adapter: rank 8 on conv1, conv2 and the attention
projections, at random non-zero weights) with a fixed gradient window of K steps, batch 32, and its backward; it prints
the median seconds of each way and their ratio. The loss of both must agree (the same step, to float rounding). The
merged comparison keeps the base in both passes of a checkpointed window, as its table in benchmarks/README.md was
measured (before the base moved into the backward).

`--in-backward` times the same digits step with the base in the backward both ways, under the trainer's malloc
setting: the policy under torch's checkpoint (`rollout` without `params`), or `rollout._InBackward` (the adapter's
weights as `params`, the trainer's way since 2026-12-05): the policy without a graph in the first pass, the base's
call and then the policy's with graph in the backward.

`--paired` times the policy's and the base's prediction in one paired call (`control.paired_denoiser`) on the tiny SD
kit at the peer harness's settings (latent 16, 2 images, CFG 5, LoRA r 4 on the attention projections, one torch
thread), with peft's forward, whose mask on B's output pairs the rows, against the merged one, which splits them
itself: one call's forward and backward, and a 20-step window's training step, checkpointed (the policy alone in
the first pass, the paired call in the backward) or not (the paired call with graph).
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
    ap.add_argument("--paired", action="store_true", help="compare peft's and the merged forward on paired calls")
    ap.add_argument("--in-backward", action="store_true", help="compare torch's checkpoint of the policy with "
                    "rollout._InBackward (the policy without a graph in the first pass)")
    args = ap.parse_args()
    if args.paired:
        return paired(args.rounds)
    cfg, fam, schedule, _, _, reward = default_problem()
    params = add_lora_control(fam.module, cfg.control.rank, target_modules=cfg.control.target_modules)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:  # a control away from zero, as in training
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    policy = fam.denoiser(fam.module, fam.encode(None, 1))
    base = base_denoiser(policy, fam.module)

    def step(k: int, checkpoint: bool, late: bool, weights: tuple = ()) -> float:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(fam.latent_shape(args.batch), generator=gen)
        out = rollout(policy, base, schedule, x, window=k, generator=gen, checkpoint=checkpoint, kl_sample=2,
                      base_in_backward=late, params=weights)
        r = reward(out.x)
        (cfg.objective.alpha * out.kl.sum(1) - r).mean().backward()
        return float((cfg.objective.alpha * out.kl.detach().sum(1) - r.detach()).mean())  # the window's KL filled in

    if args.in_backward:  # both with the base in the backward only; the merged forward and malloc as the trainer's
        from sb_finetune.trainer import _release_freed_activations

        _release_freed_activations()
        use_merged_forward(fam.module)
        names, rows = ("torch's checkpoint", "_InBackward"), [(1, True), (10, True), (19, True)]
    elif args.base_in_backward:  # the merged forward on in both, as the trainer runs on the CPU
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
                if not (args.base_in_backward or args.in_backward):
                    use_merged_forward(fam.module, way)
                t0 = time.perf_counter()
                if args.in_backward:
                    losses[way] = step(k, checkpoint, True, tuple(params) if way else ())
                else:
                    losses[way] = step(k, checkpoint, way and args.base_in_backward)
                if r:  # the first round warms up
                    times[way].append(time.perf_counter() - t0)
        one, other = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {k} | {checkpoint} | {one:.3f} | {other:.3f} | {other / one:.3f} | {losses[False]:.5f} / {losses[True]:.5f} |",
              flush=True)


def paired(rounds: int) -> None:
    """`--paired`: peft's forward (B's output masked) against the merged one (rows split) on paired calls."""
    import torch

    from sb_finetune.control import add_lora_control, base_denoiser, paired_denoiser, use_merged_forward
    from sb_finetune.families import family_of
    from sb_finetune.rollout import rollout
    from sb_finetune.testing import tiny_sd_pipeline

    torch.set_num_threads(1)
    fam = family_of(tiny_sd_pipeline())
    params = add_lora_control(fam.module, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:  # a control away from zero, as in training
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    cond = fam.encode(["a photo of a cat"] * 2, 2, 5.0)
    policy = fam.denoiser(fam.module, cond)
    base = base_denoiser(policy, fam.module)
    both = paired_denoiser(fam.denoiser(fam.module, cond.repeat(2)), fam.module)
    schedule = fam.schedule(20)
    x0 = fam.start_noise(fam.latent_shape(2), g, "cpu")

    def call() -> float:
        x = x0.clone().requires_grad_(True)
        pred, pred_base = both(x, schedule.timesteps[5])
        loss = (pred - pred_base).square().sum() + pred.square().mean()
        loss.backward()
        return float(loss.detach())

    def step(checkpoint: bool) -> float:
        out = rollout(policy, base, schedule, x0, window=20, generator=torch.Generator().manual_seed(1), both=both,
                      checkpoint=checkpoint, base_in_backward=True, params=tuple(params))
        loss = (out.kl.sum(1) - out.x.mean((1, 2, 3))).mean()
        loss.backward()
        return float((out.kl.detach().sum(1) - out.x.detach().mean((1, 2, 3))).mean())  # the window's KL filled in

    print("| what | peft's forward, s | merged, s | merged / peft | loss, peft / merged |\n|---|---|---|---|---|")
    for name, fn, reps in (("one paired call, forward and backward", call, 20),
                           ("K = 20 step, checkpointed", lambda: step(True), 1),
                           ("K = 20 step, not checkpointed", lambda: step(False), 1)):
        times: dict[bool, list[float]] = {False: [], True: []}
        losses = {}
        for r in range(rounds + 1):
            for way in (False, True):
                use_merged_forward(fam.module, way)
                t0 = time.perf_counter()
                for _ in range(reps):
                    losses[way] = fn()
                if r:  # the first round warms up
                    times[way].append((time.perf_counter() - t0) / reps)
        one, other = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {one:.4f} | {other:.4f} | {other / one:.3f} | {losses[False]:.5f} / {losses[True]:.5f} |",
              flush=True)


if __name__ == "__main__":
    main()
