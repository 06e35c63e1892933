"""Pictures of a run, drawn with PIL alone (no plotting dependency): readable sample grids, training curves with the
optimum as a reference line, and the per-step KL profile."""

from __future__ import annotations

import math
import os
import textwrap

import torch

REFERENCE = {"eval/reward": "reward_mean", "eval/kl": "kl"}  # an evaluation panel's number in the optimum's terms
UNITS = {"reward_mean": "reward (training batch mean)", "kl": "path KL, nats (training batch)",
         "objective": "alpha * KL - reward, nats (training batch)", "eval/reward": "reward on the eval grid",
         "eval/kl": "path KL on the eval grid, nats"}  # ASCII: PIL's default font has no '·' or '−'


def _ready(path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return path


def grid_image(images: torch.Tensor, columns: int, labels: list[str] | None = None, tile: int = 128):
    """A PIL grid of images [n, 3, H, W] in [0, 1], row-major, each tile upscaled (nearest: a 16-pixel digit stays
    sharp) to at least `tile` pixels a side, with `labels` (one a row: the prompt) on the left."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    scale = max(1, math.ceil(tile / max(images.shape[-2:])))
    big = torch.nn.functional.interpolate(images.float().clamp(0, 1), scale_factor=scale, mode="nearest")
    grid = make_grid(big, nrow=columns, padding=2, pad_value=1.0)
    picture = Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())
    if not labels or not any(labels):
        return picture
    margin, row = 170, big.shape[-2] + 2
    canvas = Image.new("RGB", (picture.width + margin, picture.height), "white")
    canvas.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(labels):
        draw.multiline_text((4, 4 + i * row), "\n".join(textwrap.wrap(text, 26)[:6]), fill="black")
    return canvas


def save_grid(images: torch.Tensor, columns: int, path: str, labels: list[str] | None = None, tile: int = 128) -> None:
    grid_image(images, columns, labels, tile).save(_ready(path))


def side_by_side(left: str, right: str, path: str, titles: tuple[str, str] = ("before", "after")) -> None:
    """Two PNGs next to each other, each under its title."""
    from PIL import Image, ImageDraw

    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    canvas = Image.new("RGB", (a.width + b.width + 24, max(a.height, b.height) + 22), "white")
    canvas.paste(a, (0, 22))
    canvas.paste(b, (a.width + 24, 22))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), titles[0], fill="black")
    draw.text((a.width + 28, 4), titles[1], fill="black")
    canvas.save(_ready(path))


def series(history: list[dict], key: str, start: dict | None = None) -> list[tuple[int, float]]:
    """(step, value) of `key` over the run: row i of the history is step i + 1; `start` holds step 0's numbers."""
    points = [(0, float(start[key]))] if start and key in start else []
    points += [(i + 1, float(row[key])) for i, row in enumerate(history) if key in row and row[key] == row[key]]
    return points


def save_curves(history: list[dict], path: str, reference: dict | None = None, start: dict | None = None,
                keys: tuple[str, ...] | None = None) -> None:
    """One panel per number over the optimizer steps: the training batch's reward, KL and objective, and every held-out
    reward (`eval/…`, scored at the evaluations). `reference` (summary.json's "optimum": objective, kl, reward_mean,
    effective_samples) draws what the optimal control reaches as a dashed line, with the effective sample size it
    rests on."""
    from PIL import Image, ImageDraw

    evals = sorted({k for row in [start or {}, *history] for k in row if k.startswith("eval/")})
    keys = keys or ("reward_mean", "kl", "objective", *evals)
    w, h, left, bottom = 640, 230, 70, 40
    canvas = Image.new("RGB", (w, h * len(keys)), "white")
    draw = ImageDraw.Draw(canvas)
    steps = max(len(history), 1)
    for panel, key in enumerate(keys):
        top = panel * h
        pts = series(history, key, start)
        ref = (reference or {}).get(REFERENCE.get(key, key))
        x0, x1, y0, y1 = left, w - 12, top + 22, top + h - bottom
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, top + 4), f"{key}: {UNITS.get(key, 'held-out reward on the eval grid (never trained on)')}",
                  fill="black")
        draw.text((x0, y1 + 4), "0", fill="black")
        draw.text((x1 - 60, y1 + 4), f"step {steps}", fill="black")
        draw.text(((x0 + x1) // 2 - 40, y1 + 18), "optimizer step", fill="black")
        values = [v for _, v in pts] + ([ref] if ref is not None else [])
        if not values:
            continue
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        lo, hi = lo - 0.05 * span, hi + 0.05 * span

        def xy(step: float, value: float) -> tuple[float, float]:
            return x0 + (x1 - x0) * step / steps, y1 - (y1 - y0) * (value - lo) / (hi - lo)

        draw.text((2, y0), f"{hi:.3g}", fill="black")
        draw.text((2, y1 - 12), f"{lo:.3g}", fill="black")
        if ref is not None:
            y = xy(0, ref)[1]
            for x in range(int(x0), int(x1), 12):
                draw.line([(x, y), (min(x + 6, x1), y)], fill="crimson", width=2)
            ess = (reference or {}).get("effective_samples")
            draw.text((x0 + 6, y - 14), f"optimum {ref:.3g}" + (f" (ESS {ess:.0f})" if ess else ""), fill="crimson")
        if len(pts) == 1:
            x, y = xy(*pts[0])
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="royalblue")
        elif pts:
            draw.line([xy(s, v) for s, v in pts], fill="royalblue", width=2)
    canvas.save(_ready(path))


def save_kl_profile(per_step: list[float], path: str, title: str = ""):
    """Bars of the KL paid at each sampling step, nats; returns the picture (PIL) it saved."""
    from PIL import Image, ImageDraw

    n = len(per_step)
    w, h, left, bottom = max(360, 70 + 22 * n), 240, 60, 40
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    x0, x1, y0, y1 = left, w - 10, 24, h - bottom
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text((x0, 4), title or f"KL per sampling step, nats (sum {sum(per_step):.3g})", fill="black")
    top = max([*per_step, 1e-9])
    draw.text((2, y0), f"{top:.3g}", fill="black")
    draw.text((2, y1 - 12), "0", fill="black")
    width = (x1 - x0) / max(n, 1)
    for k, v in enumerate(per_step):
        draw.rectangle((x0 + k * width + 2, y1 - (y1 - y0) * v / top, x0 + (k + 1) * width - 1, y1), fill="royalblue")
        if n <= 30 or k % 5 == 0:
            draw.text((x0 + k * width + 2, y1 + 4), str(k), fill="black")
    draw.text(((x0 + x1) // 2 - 60, y1 + 20), "sampling step (0 = pure noise)", fill="black")
    canvas.save(_ready(path))
    return canvas
