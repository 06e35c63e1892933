"""Benchmark: the digits default at several KL weights alpha — target fraction, reward and KL per alpha.

    python benchmarks/digits_alpha.py                         # alpha ∈ {0.1, 0.3, 1, 3}, the default config
    python benchmarks/digits_alpha.py --alphas 1 optim.steps=40  # a subset, shorter (overrides go to the config)
    python benchmarks/digits_alpha.py --report-only               # table and plot of runs already made

Prints a table and writes outputs/digits_alpha/reward_kl.png (reward after vs KL after, one point per alpha).
The theory: alpha = 1 gives p_base(x | y); smaller alpha buys more reward for more KL, larger alpha stays nearer
the base. Columns with "*" are that optimum (p_base tilted by exp(R / alpha)), estimated by importance weights on
the run's own base samples: a trained control's objective alpha·KL − E[R] can only sit above obj*. div/real and
div/base: diversity of the after-samples of the target class over that of real digits and of the base's own.
"""

from __future__ import annotations

import argparse
import json
import os

from sb_finetune.config import load_config
from sb_finetune.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--out", default="outputs/digits_alpha")
    parser.add_argument("--report-only", action="store_true", help="no training: table and plot from the runs' summary.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    for alpha in args.alphas:
        out_dir = os.path.join(args.out, f"alpha_{alpha:g}")
        if not args.report_only:
            train(load_config("configs/digits.yaml", [f"objective.alpha={alpha}", f"output.dir={out_dir}", *args.overrides]))
        with open(os.path.join(out_dir, "summary.json")) as f:
            rows.append({"alpha": alpha, **json.load(f)})
    # "*": the optimum p* ∝ p_base · exp(R / alpha), estimated from the base samples (summary.json "optimum")
    print(f"{'alpha':>6s} {'frac_before':>11s} {'frac_after':>10s} {'frac*':>6s} {'reward_after':>12s} {'reward*':>8s} "
          f"{'KL_after':>8s} {'KL*':>6s} {'objective':>9s} {'obj*':>6s} {'div/real':>8s} {'div/base':>8s} {'sec':>5s}")
    for r in rows:
        best = r["optimum"]
        print(f"{r['alpha']:6g} {r['target_fraction_before']:11.3f} {r['target_fraction_after']:10.3f} {best['target_fraction']:6.3f} "
              f"{r['reward_mean_after']:12.3f} {best['reward_mean']:8.3f} {r['kl_after']:8.3f} {best['kl']:6.3f} "
              f"{r['objective_after']:9.3f} {best['objective']:6.3f} {r['diversity_after'] / r['diversity_real_after']:8.3f} "
              f"{r['diversity_after'] / r['diversity_before']:8.3f} {r['seconds']:5.0f}")
    _plot(rows, os.path.join(args.out, "reward_kl.png"))


def _plot(rows: list[dict], path: str) -> None:
    """Reward after against KL after, one filled dot per alpha; hollow: that alpha's optimum (KL*, reward*)."""
    from PIL import Image, ImageDraw

    w, h, left, bottom = 480, 340, 60, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    x0, x1, y0, y1 = left, w - 90, 10, h - bottom  # plot area; room on the right for labels
    d.rectangle([x0, y0, x1, y1], outline="black")
    kl = [r["kl_after"] for r in rows] + [r["optimum"]["kl"] for r in rows]
    rw = [r["reward_mean_after"] for r in rows] + [r["optimum"]["reward_mean"] for r in rows]
    lo_k, hi_k, lo_r, hi_r = min(kl), max(kl), min(rw), max(rw)

    def xy(k: float, v: float) -> tuple[float, float]:
        return (x0 + 10 + (x1 - x0 - 20) * (k - lo_k) / ((hi_k - lo_k) or 1.0),
                y1 - 10 - (y1 - y0 - 20) * (v - lo_r) / ((hi_r - lo_r) or 1.0))

    d.text((x0, y1 + 4), f"{lo_k:.2f}", fill="black")
    d.text((x1 - 30, y1 + 4), f"{hi_k:.2f}", fill="black")
    d.text((x0 + 80, y1 + 20), "KL after (nats), hollow: optimum", fill="black")
    d.text((4, y1 - 14), f"{lo_r:.2f}", fill="black")
    d.text((4, y0), f"{hi_r:.2f}", fill="black")
    d.text((4, y0 + 14), "reward", fill="black")
    for r in rows:
        (x, y), (xs, ys) = xy(r["kl_after"], r["reward_mean_after"]), xy(r["optimum"]["kl"], r["optimum"]["reward_mean"])
        d.line([xs, ys, x, y], fill="lightgray")
        d.ellipse([xs - 4, ys - 4, xs + 4, ys + 4], outline="darkorange", width=2)
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill="royalblue")
        d.text((x + 6, y - 6), f"alpha={r['alpha']:g}", fill="black")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
