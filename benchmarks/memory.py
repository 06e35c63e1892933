"""Benchmark: peak memory and time of one training step on the tiny SD kit, vs. the chain length N and window K.

    python benchmarks/memory.py            # the full table (~3 minutes)

Pathwise rows: K is the gradient window. Adjoint Matching rows ("adjoint"): K is the number of steps regressed,
each backpropagated on its own after the lean adjoint's N vector–Jacobian products: memory flat in N and K.

Each row runs in a fresh process (torch tensors are invisible to tracemalloc; ru_maxrss is a peak, so
one measurement per process). Peak = max RSS during the step − RSS before it. Floor = the time of the
bare denoiser forward calls the step makes (policy + base at each of the N steps; in one paired call where the
trainer's default makes them so: `control.paired_denoiser`), so step/floor says
what the engine costs beyond the model; a backward through K steps adds roughly 2K forwards' worth.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(n: int, k: int, ckpt: bool, batch: int, estimator: str = "pathwise", latent: int = 16) -> dict:
    import torch

    from sb_finetune.control import add_lora_control, base_denoiser, paired_denoiser
    from sb_finetune.estimators import Task
    from sb_finetune.estimators.adjoint import AdjointMatching
    from sb_finetune.estimators.pathwise import Pathwise
    from sb_finetune.families import family_of
    from sb_finetune.testing import tiny_sd_pipeline
    from sb_finetune.trainer import auto_paired_calls

    torch.manual_seed(0)
    fam = family_of(tiny_sd_pipeline())
    unet = fam.module
    params = add_lora_control(unet, rank=4)
    cond = fam.encode(["a photo of a cat"] * batch, batch)
    policy = fam.denoiser(unet, cond)
    base = base_denoiser(policy, unet)
    size = (2 * latent, 2 * latent)  # the kit's VAE: 2 pixels a latent
    # policy and base in one call where the trainer's default (objective.paired_calls=null) makes them so
    both = paired_denoiser(fam.denoiser(unet, cond.repeat(2)), unet) if auto_paired_calls(fam, batch, size, 1) else None
    schedule = fam.schedule(n)
    x = torch.randn(fam.latent_shape(batch, *size))
    with torch.no_grad():  # warm-up, so allocator and kernels are set before measuring
        policy(x, schedule.timesteps[0])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    make = AdjointMatching(k) if estimator == "adjoint" else Pathwise(k, ckpt)
    reward = lambda latents: fam.decode(latents).mean(dim=(1, 2, 3))  # noqa: E731
    est = make(Task(policy, base, schedule, x, reward, 1.0, generator=torch.Generator().manual_seed(0), both=both))
    est.backward()
    step = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert all(p.grad is not None for p in params) or k == 0
    with torch.no_grad():
        t0 = time.perf_counter()
        for t in schedule.timesteps:
            if both is not None:
                both(x, t)
            else:
                policy(x, t)
                base(x, t)
        floor = time.perf_counter() - t0
    return {"estimator": estimator, "N": n, "K": k, "checkpoint": ckpt, "peak_mb": peak / 1024, "step_s": step, "floor_s": floor,
            "ratio": step / floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=4, metavar=("N", "K", "CKPT", "ESTIMATOR"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=16, help="latent side (16: the kit's native; 64: SD-sized memory)")
    args = parser.parse_args()
    if args.child:
        n, k, ckpt = int(args.child[0]), int(args.child[1]), args.child[2] == "1"
        print(json.dumps(child(n, k, ckpt, args.batch, args.child[3], args.latent)))
        return
    rows = [("pathwise", n, 5, False) for n in (10, 25, 50, 100)]
    rows += [("pathwise", 50, k, c) for k in (1, 5, 10, 50) for c in (False, True)]
    rows += [("adjoint", n, 5, False) for n in (10, 50, 100)] + [("adjoint", 50, k, False) for k in (1, 50)]
    print(f"tiny SD (latent 4×16×16), batch {args.batch}, one training step; fresh process per row")
    print(f"{'estimator':>9s} {'N':>4s} {'K':>4s} {'ckpt':>5s} {'peak MB':>8s} {'step s':>7s} {'floor s':>8s} {'step/floor':>10s}")
    for name, n, k, c in rows:
        r = subprocess.run([sys.executable, __file__, "--child", str(n), str(k), "1" if c else "0", name, "--batch", str(args.batch)],
                           capture_output=True, text=True, check=True)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name:>9s} {row['N']:4d} {row['K']:4d} {str(row['checkpoint']):>5s} {row['peak_mb']:8.1f} {row['step_s']:7.2f} "
              f"{row['floor_s']:8.2f} {row['ratio']:10.2f}", flush=True)


if __name__ == "__main__":
    main()
