"""Evaluation during training: image grids of the current control on fixed prompts and seeds, scored by the trained
and the held-out rewards, with the KL profile and the curves; and the before/after summary (summary.json, sample
grids, curves.png). The pictures are drawn in `sb_finetune.plots`."""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from dataclasses import dataclass

import torch

from .config import Config
from .control import base_denoiser, control_is_zero
from .objective import tilted_optimum
from .plots import save_grid, save_kl_profile, side_by_side
from .rollout import path_log_ratio, rollout


def _rollout_images(fam, module, schedule, cond, n: int, generator: torch.Generator, resolution: int | None,
                    base_only: bool = False, keep: bool = False):
    """n samples of the current control from fresh noise: (decoded images [n, 3, H, W], the `Rollout`: per-step KL to
    the base [n, N] and log dP_θ/dP_base of the sampled transitions [n, N]). base_only: the base's paths instead, one
    denoiser call a step (the control is not called; KL and log-ratio zero), from the same draws of the generator
    (the same seed, the same noise); `keep`: with their states x_0 … x_N and the base's means, at which any control's
    log-ratio can be taken (`path_log_ratio`)."""
    device = next(module.parameters()).device
    policy = fam.denoiser(module, cond)
    base = base_denoiser(policy, module)
    x = fam.start_noise(fam.latent_shape(n, resolution, resolution), generator, device)
    out = rollout(base if base_only else policy, base, schedule, x, window=0, generator=generator,
                  return_trajectory=keep, return_means=keep)
    return fam.decode(out.x), out


def _size(resolution: int | None) -> tuple[int, int] | None:
    return (resolution, resolution) if resolution else None


@torch.no_grad()
def eval_grid(fam, module, schedule, prompts: list[str], seeds: list[int], guidance_scale: float = 1.0,
              negative_prompt: str | None = None, resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [len(prompts) · len(seeds), 3, H, W] in [0, 1] (row = prompt, column = seed) and their per-step KL to
    the base [N] (the mean over the images: its sum is the mean path KL)."""
    cond = fam.encode(prompts, len(prompts), guidance_scale, negative_prompt or None, _size(resolution))
    device = next(module.parameters()).device
    columns, kls = [], []
    for seed in seeds:
        images, out = _rollout_images(fam, module, schedule, cond, len(prompts),
                                      torch.Generator(device).manual_seed(int(seed)), resolution)
        columns.append(images)
        kls.append(out.kl)
    images = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: prompt i, seed j
    return images.cpu(), torch.cat(kls).mean(0).cpu()


@dataclass
class Paths:
    """n sampled paths: decoded images (CPU), rewards [n], per-step KL [n, N] and log dP_θ/dP_base [n, N]."""

    images: torch.Tensor
    reward: torch.Tensor
    kl: torch.Tensor
    log_ratio: torch.Tensor


def _prompt_chunks(fam, prompts: list[str], n: int, batch: int, guidance_scale: float, negative_prompt: str | None,
                   resolution: int | None):
    """(prompts, conditioning) of n samples in chunks of `batch`, prompts in turn: the control's paths and the base's
    are chunked alike, so that one seed draws the same noise for both."""
    for start in range(0, n, batch):
        chunk = [prompts[i % len(prompts)] for i in range(start, min(start + batch, n))]
        yield chunk, fam.encode(chunk, len(chunk), guidance_scale, negative_prompt or None, _size(resolution))


@torch.no_grad()
def sample_paths(fam, module, schedule, reward, prompts: list[str], n: int, batch: int, seed: int = 12345,
                 guidance_scale: float = 1.0, negative_prompt: str | None = None, resolution: int | None = None,
                 from_base: bool = False) -> Paths:
    """n paths of the current control (or of the base, scored against the control) from a fixed seed, prompts in
    turn. The same seed gives the same base paths whatever the control (from_base, or before training)."""
    if from_base:
        return draw_base_paths(fam, module, schedule, reward, prompts, n, batch, seed, guidance_scale, negative_prompt,
                               resolution, keep=False, score=True).paths
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    images, rewards, kls, ratios = [], [], [], []
    for chunk, cond in _prompt_chunks(fam, prompts, n, batch, guidance_scale, negative_prompt, resolution):
        decoded, out = _rollout_images(fam, module, schedule, cond, len(chunk), g, resolution)
        images.append(decoded.cpu())
        rewards.append(reward(decoded, chunk).float().cpu())
        kls.append(out.kl.cpu())
        ratios.append(out.log_ratio.cpu())
    return Paths(torch.cat(images), torch.cat(rewards), torch.cat(kls), torch.cat(ratios))


# the summary's base paths (their states x_0 … x_N and means, (2N + 1) latents a path, and images) are kept for the
# summary after training up to this size; larger ones (a 1024² model's) are drawn again instead
KEEP_BASE_PATHS_BYTES = 512 * 2**20


@dataclass
class BasePaths:
    """n base paths from a fixed seed: their Paths (KL and log-ratio zero: the base against itself) and, chunk by chunk,
    the prompts, states x_0 … x_N and base means (empty where not kept). `key` is what drew them: the summary after
    training reuses them only where its own draw would be the same (seed, n, chunking, prompts, guidance, grid)."""

    paths: Paths
    chunks: list[tuple[list[str], list[torch.Tensor], list[torch.Tensor]]]
    key: tuple
    guidance_scale: float = 1.0
    negative_prompt: str | None = None
    resolution: int | None = None

    @property
    def kept(self) -> bool:
        return all(trajectory for _, trajectory, _ in self.chunks)

    @property
    def nbytes(self) -> int:
        tensors = [self.paths.images, self.paths.reward] + [s for _, t, m in self.chunks for s in t + m]
        return sum(t.numel() * t.element_size() for t in tensors)


def _paths_key(schedule, prompts: list[str], n: int, batch: int, seed: int, guidance_scale: float,
               negative_prompt: str | None, resolution: int | None) -> tuple:
    return (n, batch, seed, guidance_scale, negative_prompt or None, resolution, tuple(prompts),
            tuple(schedule.timesteps.tolist()), tuple(schedule.std.tolist()))


@torch.no_grad()
def draw_base_paths(fam, module, schedule, reward, prompts: list[str], n: int, batch: int, seed: int = 12345,
                    guidance_scale: float = 1.0, negative_prompt: str | None = None, resolution: int | None = None,
                    keep: bool = True, score: bool = False) -> BasePaths:
    """n base paths from a fixed seed, prompts in turn, as `sample_paths` draws the control's (the same noise), at one
    denoiser call a step. `keep`: also their states, where they fit in `KEEP_BASE_PATHS_BYTES`; `score`: their
    log dP_θ/dP_base under the current control, taken chunk by chunk as they are drawn (else zero: the base against
    itself)."""
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    latent = fam.latent_shape(1, resolution, resolution)
    keep = keep and n * (2 * schedule.num_steps + 1) * math.prod(latent) * 4 <= KEEP_BASE_PATHS_BYTES
    images, rewards, ratios, chunks = [], [], [], []
    for chunk, cond in _prompt_chunks(fam, prompts, n, batch, guidance_scale, negative_prompt, resolution):
        decoded, out = _rollout_images(fam, module, schedule, cond, len(chunk), g, resolution, base_only=True,
                                       keep=keep or score)
        images.append(decoded.cpu())
        rewards.append(reward(decoded, chunk).float().cpu())
        if score:
            ratios.append(path_log_ratio(fam.denoiser(module, cond), schedule, out.trajectory, out.means).cpu())
        chunks.append((chunk, [v.cpu() for v in out.trajectory] if keep else [],
                       [v.cpu() for v in out.means] if keep else []))
    zeros = torch.zeros(n, schedule.num_steps)
    return BasePaths(Paths(torch.cat(images), torch.cat(rewards), zeros, torch.cat(ratios) if score else zeros.clone()),
                     chunks, _paths_key(schedule, prompts, n, batch, seed, guidance_scale, negative_prompt, resolution),
                     guidance_scale, negative_prompt, resolution)


@torch.no_grad()
def score_base_paths(walks: BasePaths, fam, module, schedule) -> Paths:
    """`walks`' paths with the current control's per-step log dP_θ/dP_base along them: one policy call a step at the
    kept states (`path_log_ratio`), the base not called again."""
    if not walks.kept:
        raise ValueError("these base paths were drawn without their states (keep=False): draw them again to score them")
    device = next(module.parameters()).device
    ratios = []
    for chunk, trajectory, means in walks.chunks:
        cond = fam.encode(chunk, len(chunk), walks.guidance_scale, walks.negative_prompt or None, _size(walks.resolution))
        policy = fam.denoiser(module, cond)
        ratios.append(path_log_ratio(policy, schedule, [s.to(device) for s in trajectory],
                                     [m.to(device) for m in means]).cpu())
    p = walks.paths
    return Paths(p.images, p.reward, p.kl, torch.cat(ratios))


def mixture_optimum(base_paths: Paths, paths: Paths, alpha: float):
    """The optimum (`tilted_optimum`) from n base paths scored against the control and n paths of the control: both
    sets drawn from the mixture ½ P_base + ½ P_θ, whose density to P_base is ½ + ½ exp(log dP_θ/dP_base)."""
    log_ratio = torch.cat([base_paths.log_ratio, paths.log_ratio]).sum(1)
    return tilted_optimum(torch.cat([base_paths.reward, paths.reward]), alpha,
                          log_proposal=torch.logaddexp(torch.zeros_like(log_ratio), log_ratio) - math.log(2))


def distance(paths: Paths, alpha: float, best) -> dict[str, float]:
    """How far the control that drew `paths` is from the optimum `best` (a `TiltedOptimum`), in nats.

    objective: alpha·KL(P_θ ‖ P*) = E[alpha·Σ_k log dP_θ/dP_base − R] + alpha·log Z*, path by path; the log-ratio makes
    it constant along paths at the optimum, so it is the low-variance estimate. objective_by_kl: the same with the
    per-step KL in place of the sampled log-ratio (objective − optimum's objective); the two differ by the martingale
    Σ_k (μ_θ − μ_base)·z_k / σ_k, mean zero, which one fixed seed does not average away (benchmarks/README.md,
    "How sure the distance is").
    Their standard errors count the paths' spread and the optimum's own (`objective_se`), as independent."""
    n = paths.reward.numel()
    r = paths.reward.double()
    by_path = alpha * paths.log_ratio.sum(1).double() - r + alpha * best.log_z
    by_kl = alpha * paths.kl.sum(1).double() - r + alpha * best.log_z

    def se(v: torch.Tensor) -> float:
        return math.sqrt(float(v.var()) / n + best.objective_se**2)

    return {"objective": float(by_path.mean()), "objective_se": se(by_path), "objective_by_kl": float(by_kl.mean()),
            "objective_by_kl_se": se(by_kl), "kl": float(paths.kl.sum(1).mean()) - best.kl}


def _weighted_metrics(reward, images: torch.Tensor, weights: torch.Tensor, device) -> dict:
    """The reward's own metrics reweighted to p*, where it takes `weights` (else none)."""
    if "weights" not in inspect.signature(getattr(reward, "metrics", lambda images: None)).parameters:
        return {}
    return reward.metrics(images.to(device), weights=weights.to(device))


def _scores(reward, images: torch.Tensor, prompts: list[str], device, batch: int = 64) -> torch.Tensor:
    """reward [n] on images scored in batches, prompts in turn (as `sample_paths` drew them)."""
    shown = [prompts[i % len(prompts)] for i in range(len(images))]
    return torch.cat([reward(chunk.to(device), shown[i:i + batch]).float().cpu()
                      for i, chunk in zip(range(0, len(images), batch), images.split(batch))])


@torch.no_grad()
def summarize(fam, module, schedule, reward, prompts: list[str], n: int, batch: int, seed: int = 12345,
              guidance_scale: float = 1.0, negative_prompt: str | None = None, resolution: int | None = None,
              alpha: float = 1.0, optimum: str | None = None, held_out: dict | None = None,
              base: BasePaths | None = None) -> tuple[dict, torch.Tensor, BasePaths | None]:
    """On n fresh samples of the current control (fixed seed): reward mean/std, path KL to the base (nats) and per
    step, the objective alpha·KL − E[R], and the reward's own `metrics(images)` if it has one. Returns (numbers,
    images, the base paths drawn or used, if any).

    optimum="base": estimate what the optimal control reaches (`tilted_optimum`) from n base samples under
    numbers["optimum"] (the reward's metrics reweighted to p* where it takes `weights`), and numbers["gap"], the
    control's distance to it (as below: for the base itself alpha·KL(P_base ‖ P*)). Where the control is still
    the base's (`control_is_zero`: before training from a fresh adapter) its samples ARE those base samples, drawn
    once at one denoiser call a step; otherwise (`control.init_from`) the base's are drawn beside them.
    optimum="both": also n base paths (the same seed: the same paths as "base" gave; `base`, those paths kept from
    then, where they match this draw, else drawn again) scored against the control, and the optimum estimated from
    both sets (far more effective samples once the control is near it); numbers["gap"] is then the distance to it:
    the objective's excess alpha·KL(P_θ ‖ P*) on paths, estimated path by path as alpha·Σ log dP_θ/dP_base − R +
    alpha·log Z* (± its standard error), and the KL's excess.
    held_out: {name: reward} scored on the samples (numbers["eval/<name>"]) and reweighted to p* (the optimum's)."""
    device = next(module.parameters()).device
    args = (fam, module, schedule, reward, prompts, n, batch, seed, guidance_scale, negative_prompt, resolution)
    key = _paths_key(schedule, prompts, n, batch, seed, guidance_scale, negative_prompt, resolution)
    if base is not None and (base.key != key or not base.kept):
        base = None  # drawn otherwise: not the paths this summary would draw
    if optimum == "base" and control_is_zero(module):
        base = draw_base_paths(*args)
        paths = base.paths
    else:
        paths = sample_paths(*args)
    kl = paths.kl.sum(1)
    numbers = {"reward_mean": float(paths.reward.mean()), "reward_std": float(paths.reward.std()), "kl": float(kl.mean()),
               "objective": alpha * float(kl.mean()) - float(paths.reward.mean()),
               "kl_per_step": [round(float(v), 5) for v in paths.kl.mean(0)]}
    if hasattr(reward, "metrics"):
        numbers.update(reward.metrics(paths.images.to(device)))
    scores = {name: _scores(r, paths.images, prompts, device) for name, r in (held_out or {}).items()}
    numbers.update({f"eval/{name}": float(v.mean()) for name, v in scores.items()})
    if optimum == "base":
        base = base or draw_base_paths(*args)
        base_scores = scores if base.paths is paths else {
            name: _scores(r, base.paths.images, prompts, device) for name, r in (held_out or {}).items()}
        best = tilted_optimum(base.paths.reward, alpha)
        numbers["optimum"] = {**best.numbers(), "estimated_from": f"{n} base samples",
                              **_weighted_metrics(reward, base.paths.images, best.weights, device),
                              **{f"eval/{name}": float((best.weights * v).sum()) for name, v in base_scores.items()}}
        numbers["gap"] = distance(paths, alpha, best)  # where training starts: the base's own, or a loaded control's
    elif optimum == "both":
        if base is None:
            base = draw_base_paths(*args, keep=False, score=True)
            base_scored = base.paths
        else:
            base_scored = score_base_paths(base, fam, module, schedule)
        best = mixture_optimum(base_scored, paths, alpha)
        images = torch.cat([base_scored.images, paths.images])
        base_scores = {name: _scores(r, base_scored.images, prompts, device) for name, r in (held_out or {}).items()}
        numbers["optimum"] = {**best.numbers(), "estimated_from": f"{n} base and {n} trained samples",
                              **_weighted_metrics(reward, images, best.weights, device),
                              **{f"eval/{name}": float((best.weights * torch.cat([base_scores[name], v])).sum())
                                 for name, v in scores.items()}}
        numbers["gap"] = distance(paths, alpha, best)
    return numbers, paths.images, base


def make_evaluator(accelerator, cfg: Config, fam, module, schedule, prompts: list[str], reward,
                   held_out: dict | None = None):
    """evaluate(step) -> numbers: on the main process, an image grid of eval prompts × seeds (samples/step_XXXXXX.png,
    one row a prompt, labelled), its per-step KL (kl_profile.png), the trained and the held-out rewards
    (`logging.eval_rewards`) on it, all to the trackers; {} on other processes and where evaluation is off."""
    eval_prompts = list(cfg.logging.eval_prompts) or prompts[:4]
    if not fam.conditional:  # one row per "prompt": as many rows as asked, or 4
        eval_prompts = [""] * max(len(cfg.logging.eval_prompts), 4)
    seeds, held_out = cfg.logging.eval_seeds, held_out or {}
    done = set()

    @torch.no_grad()
    def evaluate(step: int) -> dict[str, float]:
        if not cfg.logging.eval_every or step in done or not accelerator.is_main_process:
            return {}
        done.add(step)
        images, kl = eval_grid(fam, getattr(module, "module", module), schedule, eval_prompts, seeds,
                               cfg.sampler.guidance_scale, cfg.sampler.negative_prompt, cfg.model.resolution)
        labels = eval_prompts if fam.conditional else None
        grid = os.path.join(cfg.output.dir, "samples", f"step_{step:06d}.png")
        save_grid(images, len(seeds), grid, labels)
        first = os.path.join(cfg.output.dir, "samples", "step_000000.png")
        if step and os.path.isfile(first):  # the grid as it started next to this one
            side_by_side(first, grid, os.path.join(cfg.output.dir, "samples", "before_after.png"), ("step 0", f"step {step}"))
        profile = save_kl_profile(kl.tolist(), os.path.join(cfg.output.dir, "kl_profile.png"),
                                  f"KL per sampling step at step {step}, nats (sum {float(kl.sum()):.3g})")
        shown = [p for p in eval_prompts for _ in seeds]
        numbers = {"eval/kl": float(kl.sum())}
        numbers.update({f"eval/{name}": float(_scores(r, images, shown, accelerator.device).mean())
                        for name, r in {"reward": reward, **held_out}.items()})
        for tracker in accelerator.trackers:  # [N, H, W, 3] arrays; tensorboard must be told (its default is NCHW)
            if hasattr(tracker, "log_images"):
                tracker.log_images({"eval": images.permute(0, 2, 3, 1).numpy(), "kl_profile": _png_array(profile)}, step=step,
                                   **({"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}))
        if cfg.logging.tracker != "none":
            accelerator.log(numbers, step=step)
        return numbers

    return evaluate


def _png_array(picture):
    """A PIL picture as a [1, H, W, 3] float array in [0, 1], as trackers' log_images takes it."""
    import numpy as np

    return np.asarray(picture.convert("RGB"), dtype=np.float32)[None] / 255.0


def load_held_out(names: list[str], device) -> dict:
    """The held-out rewards (names, import paths or servers, as `reward.name` takes), frozen, on `device`."""
    from sb_finetune.rewards import load_reward

    return {name: load_reward(name).to(device).requires_grad_(False).eval() for name in names}


class KLAlarm:
    """`logging.kl_alarm`: warn once, with the step and the numbers (and with `logging.kl_alarm_stop`, stop there),
    when the path KL, averaged over the last 10 steps and over the processes, exceeds the bound in nats."""

    def __init__(self, bound: float | None, stop: bool = False):
        self.bound, self.stop, self.recent, self.fired = bound, stop, [], False

    def __call__(self, accelerator, step: int, kl: float, optimum: dict | None) -> bool:
        """True: stop the run here (every process gets the same answer)."""
        if not self.bound or self.fired:
            return False
        self.recent = [*self.recent, kl][-10:]
        mean = sum(self.recent) / len(self.recent)
        if accelerator.num_processes > 1:
            mean = float(accelerator.reduce(torch.tensor([mean], device=accelerator.device), "mean"))
        if mean <= self.bound:
            return False
        self.fired = True
        said = f"; the optimum's is {optimum['kl']:.3g} (summary.json)" if optimum else ""
        warnings.warn(f"step {step}: the path KL, {mean:.3g} nats over the last {len(self.recent)} steps, is above "
                      f"logging.kl_alarm={self.bound:g}{said}"
                      + (": stopping here (logging.kl_alarm_stop); this step's adapter is saved" if self.stop else ""))
        return self.stop


def write_summary(accelerator, cfg: Config, fam, module, schedule, reward, prompts: list[str], when: str,
                  extra: dict | None = None, held_out: dict | None = None,
                  base: BasePaths | None = None) -> tuple[dict | None, BasePaths | None]:
    """With logging.summary_samples: numbers on fresh samples "before"/"after" training → summary.json (with the
    held-out rewards' means as eval/<name>), samples_<when>.png (the first 64, upscaled) and, after,
    samples_before_after.png. Returns the optimum's numbers (None where off), the curves' reference, and the summary's
    base paths where they fit in `KEEP_BASE_PATHS_BYTES` (else None): given back as `base` after training, they spare
    drawing the same paths again.

    summary.json's "optimum" is what the best control reaches, p_base tilted by exp(R/alpha): from the base samples
    before training, then from the base and the trained samples together ("optimum_base_only" keeps the first);
    "gap_before" / "gap_after" are the control's distance to it before and after training, in nats."""
    if not cfg.logging.summary_samples or not accelerator.is_main_process:
        return None, None
    numbers, images, base = summarize(
        fam, getattr(module, "module", module), schedule, reward, prompts, cfg.logging.summary_samples,
        4 * cfg.optim.batch_size, guidance_scale=cfg.sampler.guidance_scale, negative_prompt=cfg.sampler.negative_prompt,
        resolution=cfg.model.resolution, alpha=cfg.objective.alpha, optimum="base" if when == "before" else "both",
        held_out=held_out, base=base)
    optimum = numbers.pop("optimum", None)
    out = cfg.output.dir
    save_grid(images[:64], 8, os.path.join(out, f"samples_{when}.png"), tile=96)
    path = os.path.join(out, "summary.json")
    summary = {}
    if when == "after" and os.path.isfile(path):
        with open(path) as f:
            summary = json.load(f)
    summary.update(extra or {})
    summary.update({f"{k}_{when}": v for k, v in numbers.items()})
    if optimum:
        if "optimum" in summary:
            summary["optimum_base_only"] = summary["optimum"]
        summary["optimum"] = optimum
    summary["samples"] = cfg.logging.summary_samples
    summary["timesteps"] = schedule.timesteps.tolist()  # the grid kl_per_step_* are on (balanced_timesteps' input)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    if when == "after" and os.path.isfile(os.path.join(out, "samples_before.png")):
        side_by_side(os.path.join(out, "samples_before.png"), os.path.join(out, "samples_after.png"),
                     os.path.join(out, "samples_before_after.png"))
    accelerator.print(f"summary ({when}): " + _fmt(numbers))
    if optimum:
        accelerator.print(f"optimum (from {optimum['estimated_from']}): " + _fmt(optimum))
    keep = base is not None and base.kept and base.nbytes <= KEEP_BASE_PATHS_BYTES
    return summary.get("optimum"), base if keep else None


def _fmt(numbers: dict) -> str:
    def one(v):
        return f"{v:.4g}" if isinstance(v, float) else "{" + _fmt(v) + "}" if isinstance(v, dict) else None

    return ", ".join(f"{k} {one(v)}" for k, v in numbers.items() if one(v) is not None)
