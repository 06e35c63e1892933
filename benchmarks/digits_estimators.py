"""Benchmark: the four estimators on the digits default, and the reward-only ones on a reward without a gradient.

    python benchmarks/digits_estimators.py                      # every row, one after another (~6–9 min each)
    python benchmarks/digits_estimators.py weighted decision_weighted
    python benchmarks/digits_estimators.py --report-only        # the table again, from the runs' summary.json

Each row is `accelerate launch train.py` (the digits default, `configs/digits.yaml`) with the row's overrides, in a
fresh process, into outputs/digits_estimators/<row>/. The numbers are the run's own summary.json: the gap to the
optimum p_base · exp(R/alpha) (objective excess alpha · KL(P_θ ‖ P*) on paths, ± its standard error), the KL's
excess, the target fraction against the optimum's, and the training wall. `decision` rows train on the classifier's
decision, R = 5 · 1[argmax = 0] (the optimum puts 0.96 of its samples on 0): a reward no gradient method can use.
Per step, on 32 paths of N = 20 steps: pathwise makes 20 policy + 20 base calls and backpropagates through a window
of K ~ U[1, 20] of them, with 32 reward gradients; adjoint 20 policy + 20 base calls without graph, 19 base
vector–Jacobian products, and 20 policy calls with graph, 32 reward gradients; weighted and policy_gradient 20 + 20
calls without graph and K = 4 with graph (policy_gradient: + 4 base calls), and no reward gradient; base_pool
20 base calls a path for its 2,048 paths once (1,280 calls of 32), then K = 2 policy calls with graph an update.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

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


def train(name: str) -> None:
    out = os.path.join(OUT, name)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", os.path.join(ROOT, "train.py"), *ROWS[name][1], f"output.dir={out}"]
    print(" ".join(cmd[2:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"  {name}: {time.time() - t0:.0f} s", flush=True)


# model calls a training step makes on its 32 paths of N = 20 steps (20 controlled), and reward gradients per path
CALLS = {
    "pathwise": ("20 policy + 20 base, K ~ U[1, 20] of each pair with graph (checkpointed)", 1),
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


def report(names: list[str]) -> None:
    print("| row | what | gap ± se | KL − KL* | target fraction (optimum) | reward (optimum) | train s | peak RSS MB "
          "| model calls a step | reward queries / gradients a path |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        path = os.path.join(OUT, name, "summary.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            s = json.load(f)
        gap, opt = s["gap_after"], s["optimum"]
        print(f"| {name} | {ROWS[name][0]} | {gap['objective']:.2f} ± {gap['objective_se']:.2f} | {gap['kl']:.2f} | "
              f"{s['target_fraction_after']:.3f} ({opt['target_fraction']:.3f}) | {s['reward_mean_after']:.2f} "
              f"({opt['reward_mean']:.2f}) | {s['seconds']:.0f} | {s.get('peak_rss_mb', 0):.0f} | {_calls(name)[0]} | "
              f"1 / {_calls(name)[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="*", help=f"rows to run, of {list(ROWS)} (default: all)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.rows = args.rows or list(ROWS)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}: of {list(ROWS)}")
    if not args.report_only:
        for name in args.rows:
            train(name)
    report(args.rows)


if __name__ == "__main__":
    main()
