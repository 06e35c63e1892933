"""Benchmark: the digits default at several KL weights alpha — target fraction, reward and KL per alpha.

    python benchmarks/digits_alpha.py                         # alpha ∈ {0.1, 0.3, 1, 3}, the default config
    python benchmarks/digits_alpha.py --alphas 1 optim.steps=40  # a subset, shorter (overrides go to the config)

Prints a table and writes outputs/digits_alpha/reward_kl.png (reward after vs KL after, one point per alpha).
The theory: alpha = 1 gives p_base(x | y) (KL ≈ log 1/p_base(y) ≈ 2.3 nats); smaller alpha buys more reward for
more KL, larger alpha stays nearer the base.
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
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    for alpha in args.alphas:
        out_dir = os.path.join(args.out, f"alpha_{alpha:g}")
        cfg = load_config("configs/digits.yaml", [f"objective.alpha={alpha}", f"output.dir={out_dir}", *args.overrides])
        train(cfg)
        with open(os.path.join(out_dir, "summary.json")) as f:
            rows.append({"alpha": alpha, **json.load(f)})
    print(f"{'alpha':>6s} {'frac_before':>11s} {'frac_after':>10s} {'reward_after':>12s} {'KL_after':>8s} {'diversity':>9s} {'sec':>6s}")
    for r in rows:
        print(f"{r['alpha']:6g} {r['target_fraction_before']:11.3f} {r['target_fraction_after']:10.3f} {r['reward_mean_after']:12.3f} "
              f"{r['kl_after']:8.3f} {r['diversity_after'] / r['diversity_real_after']:9.3f} {r['seconds']:6.0f}")
    _plot(rows, os.path.join(args.out, "reward_kl.png"))


def _plot(rows: list[dict], path: str) -> None:
    from PIL import Image, ImageDraw

    w, h, pad = 420, 320, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, 10, w - 10, h - pad], outline="black")
    d.text((pad, h - pad + 20), "KL after (nats) →", fill="black")
    d.text((2, 0), "reward ↑", fill="black")
    kl = [r["kl_after"] for r in rows]
    rw = [r["reward_mean_after"] for r in rows]
    kx, ky = (max(kl) - min(kl)) or 1.0, (max(rw) - min(rw)) or 1.0
    for r, k, v in zip(rows, kl, rw):
        x = pad + (w - 10 - pad) * (k - min(kl)) / kx * 0.9 + 10
        y = h - pad - (h - pad - 10) * (v - min(rw)) / ky * 0.9 - 10
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill="royalblue")
        d.text((x + 6, y - 6), f"alpha={r['alpha']:g}", fill="black")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
