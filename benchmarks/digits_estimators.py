"""Benchmark: the four estimators on the digits default, and the reward-only ones on a reward without a gradient.

    python benchmarks/digits_estimators.py                      # every row, one after another (~6–9 min each)
    python benchmarks/digits_estimators.py weighted decision_weighted
    python benchmarks/digits_estimators.py --report-only        # the table again, from the runs' summary.json
    python benchmarks/digits_estimators.py --count pathwise adjoint   # measure the rows' calls (~2 min a row)

Each row is `accelerate launch train.py` (the digits default, `configs/digits.yaml`) with the row's overrides, at the
rate the table was measured at (lr 3e-3 without warm-up, the default's until 2026-12-05, unless the row sets one), in a
fresh process, into outputs/digits_estimators/<row>/. The numbers are the run's own summary.json: the gap to the
optimum p_base · exp(R/alpha) (objective excess alpha · KL(P_θ ‖ P*) on paths, ± its standard error), the KL's
excess, the target fraction against the optimum's, and the training wall. `decision` rows train on the classifier's
decision, R = 5 · 1[argmax = 0] (the optimum puts 0.96 of its samples on 0): a reward no gradient method can use.

`--count` measures what a row spends (`count_rows`: images through the denoiser forward and back, reward queries and
reward gradients, per path and step and over the whole run) into the row's calls.json; the table shows it, or, for a
row not measured, the calls it should make (`CALLS`). Measured per path and step (2026-12-03): pathwise 51 forward /
20 backward on average over its window (the policy every step, the base inside the window and on 2 logged steps
before it, checkpointing's recompute; K = 1: 25 / 2, K = 20: 77 / 38), one reward gradient; adjoint 59 / 38, one
reward gradient; weighted 43 / 4 and policy_gradient 47 / 4 (K = 4), no reward gradient; base_pool 2–2.5 / 2 an
update after its pool of 2,048 base paths (40,960 base calls and 2,048 reward queries, once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from digits_diagnosis import RATE_3E3  # the digits default's rate until 2026-12-05: every row's unless it sets one

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "outputs", "digits_estimators")
DECISION = ["reward.kwargs.decision=5"]
FROM_POOL = [f"control.init_from={os.path.join(OUT, 'decision_base_pool_hold2')}", "objective.grad_steps=4", "optim.lr=1e-3",
             "optim.steps=120", *DECISION]  # the two-stage rows' second stage
BASE_POOL = ["objective.estimator=base_pool", "objective.grad_steps=2", "optim.steps=1200"]  # 2,048 base paths, once
CONTRAST = ["objective.estimator=base_pool", "objective.grad_steps=2", "optim.steps=600", "objective.pool_target=contrast"]
ROWS = {
    "pathwise": ("the default", []),
    "adjoint": ("Adjoint Matching", ["objective.estimator=adjoint", "objective.checkpointing=false"]),
    "weighted": ("weighted regression, path target", ["objective.estimator=weighted", "objective.grad_steps=4"]),
    "weighted_forward": ("weighted regression, forward target", ["objective.estimator=weighted", "objective.grad_steps=4",
                                                                 "objective.weighted_target=forward"]),
    "policy_gradient": ("policy gradient", ["objective.estimator=policy_gradient", "objective.grad_steps=4"]),
    "decision_weighted": ("weighted, decision reward", ["objective.estimator=weighted", "objective.grad_steps=4", *DECISION]),
    "decision_weighted_lr1e-3": ("weighted, decision reward, lr 1e-3", ["objective.estimator=weighted", "objective.grad_steps=4",
                                                                         "optim.lr=1e-3", *DECISION]),
    "decision_weighted_k20_lr1e-3": ("weighted, decision reward, all 20 steps, lr 1e-3, 150 steps",
                                    ["objective.estimator=weighted", "optim.lr=1e-3", "optim.steps=150", *DECISION]),
    "decision_weighted_reuse5": ("weighted, decision reward, each batch 5 updates of 4 steps, lr 1e-3, 90 batches",
                                 ["objective.estimator=weighted", "objective.grad_steps=4", "optim.updates_per_batch=5",
                                  "optim.lr=1e-3", "optim.steps=90", *DECISION]),
    "decision_weighted_reuse5_ess0.25": ("weighted, decision reward, as reuse5, tempered to ESS ≥ 0.25 G (not 0.5)",
                                         ["objective.estimator=weighted", "objective.grad_steps=4",
                                          "optim.updates_per_batch=5", "optim.lr=1e-3", "optim.steps=90",
                                          "objective.min_ess=0.25", *DECISION]),
    "decision_policy_gradient": ("policy gradient, decision reward", ["objective.estimator=policy_gradient",
                                                                      "objective.grad_steps=4", *DECISION]),
    "base_pool": ("base pool, 1,200 updates of 2 steps, no step held", [*BASE_POOL, "objective.pool_hold=0"]),
    "decision_base_pool": ("base pool, decision reward, 1,200 updates of 2 steps, no step held",
                           [*BASE_POOL, "objective.pool_hold=0", *DECISION]),
    "base_pool_hold2": ("base pool, the last 2 controlled steps held to the base (the default)",
                        [*BASE_POOL, "objective.pool_hold=2"]),
    "decision_base_pool_hold2": ("base pool, decision reward, the last 2 controlled steps held to the base (the default)",
                                 [*BASE_POOL, "objective.pool_hold=2", *DECISION]),
    # the contrast (objective.pool_target=contrast): less a second control fitted to the untilted pool, 600 updates
    "decision_base_pool_contrast": ("base pool, decision reward, the contrast target, 600 updates of 2 steps, 2 held",
                                    [*CONTRAST, *DECISION]),
    "base_pool_contrast": ("base pool, the contrast target, 600 updates of 2 steps, 2 held", CONTRAST),
    # two-stage: started from the row above's adapter (run it first), 120 steps of a reward-only gradient at lr 1e-3
    "decision_pool_then_policy_gradient": ("decision, policy gradient from the base pool's adapter (hold 2), 120 steps",
                                           ["objective.estimator=policy_gradient", *FROM_POOL]),
    "decision_pool_then_weighted": ("decision, weighted from the base pool's adapter (hold 2), 120 steps",
                                    ["objective.estimator=weighted", *FROM_POOL]),
}


def overrides(name: str) -> list[str]:
    """The row's command-line overrides, on the rate its table was measured at."""
    return [*RATE_3E3, *ROWS[name][1]]


def train(name: str) -> None:
    out = os.path.join(OUT, name)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", os.path.join(ROOT, "train.py"), *overrides(name), f"output.dir={out}"]
    print(" ".join(cmd[2:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"  {name}: {time.time() - t0:.0f} s", flush=True)


# model calls a training step makes on its 32 paths of N = 20 steps (20 controlled), and reward gradients per path
CALLS = {
    "pathwise": ("20 policy; the base in the window K ~ U[1, 20] and on 2 logged steps; the window with graph "
                 "(checkpointed)", 1),
    "adjoint": ("20 policy + 20 base without graph, 19 base VJPs, 20 policy with graph", 1),
    "weighted": ("20 policy + 20 base without graph, K = 4 policy with graph", 0),
    "weighted_forward": ("20 policy + 20 base without graph, 4 base without and 4 policy with graph", 0),
    "policy_gradient": ("20 policy + 20 base without graph, 4 base without and 4 policy with graph", 0),
    "decision_weighted_k20_lr1e-3": ("20 policy + 20 base without graph, 20 policy with graph", 0),
    "base_pool": ("2 policy with graph (before the first: 20 base calls a path for the pool's 2,048, once)", 0),
    "base_pool_contrast": ("2 policy and 2 second-control calls with graph, 2 base and 2 second-control without "
                           "(before the first: 20 base calls a path for the pool's 2,048, once)", 0),
}


def _calls(name: str) -> tuple[str, int]:
    for key in sorted(CALLS, key=len, reverse=True):
        if key in name:
            return CALLS[key]
    return CALLS["pathwise"]


def count_rows(name: str, steps: tuple[int, int] = (2, 4)) -> dict[str, float]:
    """Measure a row's training cost: images through the denoiser (forward, and back: a parameter gradient or a
    vector–Jacobian product) and through the reward model, tallied in a `sb_finetune.costs.Costs` by hooks on every
    module call in this process over two short runs of the row (`steps` optimizer steps each, nothing else changed)
    whose difference cancels the set-up and the before/after evaluation. A checkpointed call's recompute counts as a
    forward (most of one: it stops once the tensors the backward needs are back), a paired call (policy and base in
    one batch) as its rows. Returns them per path and step, and the whole run's (its steps × batch, plus base_pool's
    pool: `pool_size` paths of N base calls and one reward query each, drawn once)."""
    import torch
    from diffusers import UNet2DModel

    from sb_finetune.config import load_config
    from sb_finetune.costs import Costs
    from sb_finetune.digits import DigitClassifier
    from sb_finetune.trainer import train as run

    cfg = load_config(os.path.join(ROOT, "configs/digits.yaml"), overrides(name))  # the row as it trains
    o, n = cfg.objective, cfg.sampler.steps
    pool = o.pool_size if o.estimator == "base_pool" else 0
    small_pool = ["objective.pool_size=64"] if pool else []  # set-up: cancels in the difference
    costs = Costs()

    def kind(module) -> str | None:
        return "unet" if isinstance(module, UNet2DModel) else "reward" if isinstance(module, DigitClassifier) else None

    def count_forward(module, args):  # a pre-hook: a checkpointed recompute stops early, before forward hooks run
        if kind(module):
            costs.forward[kind(module)] = costs.forward.get(kind(module), 0) + args[0].shape[0]

    def count_backward(module, args, output):
        out = getattr(output, "sample", output[0] if isinstance(output, tuple) else output)
        if kind(module) and isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad, key=kind(module), rows=args[0].shape[0]: costs._backward(key, rows))

    def per_step(extra: list[str]) -> dict[str, float]:
        totals = []
        for s in steps:
            costs.forward.clear()
            costs.backward.clear()
            with tempfile.TemporaryDirectory() as out:
                run(load_config(os.path.join(ROOT, "configs/digits.yaml"),
                                [*overrides(name), *extra, f"optim.steps={s}", f"output.dir={out}", "logging.eval_every=0",
                                 "logging.summary_samples=16", *small_pool]))
            totals.append(costs.per((steps[1] - steps[0]) * cfg.optim.batch_size))
        return {k: totals[1].get(k, 0.0) - totals[0].get(k, 0.0)
                for k in ("unet_fwd", "unet_bwd", "reward_fwd", "reward_bwd")}

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(count_forward),
               torch.nn.modules.module.register_module_forward_hook(count_backward)]
    try:
        if o.estimator == "pathwise" and o.window_min != min(o.window_max or n, n):
            # a random window K ~ U[lo, hi]: a step's calls are linear in K, so measure both ends and take the mean's
            lo, hi = o.window_min, min(o.window_max or n, n)
            at = [per_step([f"objective.window_min={k}", f"objective.window_max={k}"]) for k in (lo, hi)]
            cost = {k: (at[0][k] + at[1][k]) / 2 for k in at[0]}
        else:
            cost = per_step([])
    finally:
        for handle in handles:
            handle.remove()
    images = cfg.optim.steps * cfg.optim.batch_size
    return {**cost, "run_unet": (cost["unet_fwd"] + cost["unet_bwd"]) * images + pool * n,
            "run_reward_fwd": cost["reward_fwd"] * images + pool, "run_reward_bwd": cost["reward_bwd"] * images}


def _cost_columns(name: str) -> str:
    """The measured cost (calls.json, from `--count`), or what the row's calls should be where it was not measured."""
    path = os.path.join(OUT, name, "calls.json")
    if not os.path.isfile(path):
        return f"{_calls(name)[0]} | — | 1 / {_calls(name)[1]} |"
    with open(path) as f:
        c = json.load(f)
    return (f"{c['unet_fwd']:.1f} / {c['unet_bwd']:.1f} | {c['run_unet'] / 1e3:.0f}k | {c['reward_fwd']:.1f} / "
            f"{c['reward_bwd']:.1f} ({c['run_reward_fwd'] / 1e3:.1f}k / {c['run_reward_bwd'] / 1e3:.1f}k) |")


def report(names: list[str]) -> None:
    print("| row | what | gap ± se | KL − KL* | target fraction (optimum) | reward (optimum) | train s | peak RSS MB "
          "| denoiser images fwd / bwd a path-step | denoiser fwd + bwd, run | reward queries / gradients a path-step (run) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        path = os.path.join(OUT, name, "summary.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            s = json.load(f)
        gap, opt = s["gap_after"], s["optimum"]
        print(f"| {name} | {ROWS[name][0]} | {gap['objective']:.2f} ± {gap['objective_se']:.2f} | {gap['kl']:.2f} | "
              f"{s['target_fraction_after']:.3f} ({opt['target_fraction']:.3f}) | {s['reward_mean_after']:.2f} "
              f"({opt['reward_mean']:.2f}) | {s['seconds']:.0f} | {s.get('peak_rss_mb', 0):.0f} | {_cost_columns(name)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="*", help=f"rows to run, of {list(ROWS)} (default: all)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--count", action="store_true", help="measure each row's calls a step (two short runs, in "
                        "this process) into its folder's calls.json, instead of training it")
    args = parser.parse_args()
    args.rows = args.rows or list(ROWS)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}: of {list(ROWS)}")
    if args.count:
        for name in args.rows:
            per = count_rows(name)
            os.makedirs(os.path.join(OUT, name), exist_ok=True)
            with open(os.path.join(OUT, name, "calls.json"), "w") as f:
                json.dump(per, f, indent=1)
            print(f"  {name}: {per}", flush=True)
    elif not args.report_only:
        for name in args.rows:
            train(name)
    report(args.rows)


if __name__ == "__main__":
    main()
