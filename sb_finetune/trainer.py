"""The training loop: sample with the control, score, estimate the gradient (`sb_finetune.estimators`), step. Top to
bottom."""

from __future__ import annotations

import json
import math
import os
import time
import warnings

import torch

from . import checkpoint
from .config import Config, to_yaml
from .control import (add_lora_control, base_denoiser, frozen_denoiser, load_lora_control, lora_state_dict, paired_denoiser,
                      save_lora_control, use_merged_forward)
from .data import DTYPES, load_pipeline, load_prompts
from .estimators import DIFFERENTIABLE_ONLY, Task, make_estimator
from .evaluation import KLAlarm, load_held_out, make_evaluator, write_summary
from .plots import save_curves
from .families import family_of
from .objective import is_finite
from .rewards import non_finite_message


MAX_BAD_REWARD_STEPS = 3  # a reward that is non-finite this often in a row is broken, not unlucky
# objective.checkpointing=null turns checkpointing on from this many latent elements a sample (4·32·32: SD at 256 px):
# there a window step's activations outweigh the recompute (benchmarks/side_by_side.py); tiny kits and digits stay off
AUTO_CHECKPOINT_LATENT = 4096
# objective.paired_calls=null makes the policy's and the base's predictions in one call where a call is this small
# (latent elements over its rows, CFG's copies included): there the call's fixed cost dominates, and one call of 2B
# rows costs less than two of B (the harness's tiny SD at latent 16, 4 rows = 4,096: a K = 20 step 20 % faster). Above
# it a call is compute-bound: on 2 CPU cores the digits default's 32 rows × 256 = 8,192 ran 15 % slower paired (2×
# with the trainer's 1 MiB mmap threshold, its blocks then mapped fresh). A checkpointed window pairs in the backward
# only (`rollout._InBackward`: the policy without a graph in the first pass), where the paired call holds both halves'
# activations at once
AUTO_PAIRED_CALL = 4096


class Counters:
    """Step and skipped-step counts; a checkpoint keeps them in JSON (`checkpoint.STATE_FILE`)."""

    def __init__(self) -> None:
        self.step, self.skipped = 0, 0


def _start_from(module, cfg: Config) -> None:
    """Load `control.init_from` (a folder or hub id) into the adapter just attached, or stop with what does not fit."""
    from .hub import read_adapter_folder, resolve_adapter_folder

    folder = resolve_adapter_folder(cfg.control.init_from)
    meta = read_adapter_folder(folder, require_metadata=False)
    other = meta.get("base_model") not in (None, cfg.model.pretrained)
    said = f"control.init_from '{cfg.control.init_from}' was trained on {meta.get('base_model')}; this run fine-tunes " \
           f"{cfg.model.pretrained}"
    try:
        load_lora_control(module, folder)
    except ValueError as err:
        raise ValueError(f"{said}: {err}" if other else str(err)) from None
    if other:  # it fits (e.g. the same model under another path or id): say so, go on
        warnings.warn(said)


def build_reward(cfg: Config):
    from sb_finetune.rewards import WeightedSum, load_reward

    if cfg.reward.mix:
        reward = WeightedSum({name: (w, load_reward(name, **cfg.reward.kwargs.get(name, {}))) for name, w in cfg.reward.mix.items()})
    else:
        reward = load_reward(cfg.reward.name, **cfg.reward.kwargs)
    if hasattr(reward, "check"):  # a reward server: is it there?
        reward.check()
    if not reward.differentiable and cfg.objective.estimator in DIFFERENTIABLE_ONLY:
        raise ValueError(f"reward '{reward.name}' is not differentiable: objective.estimator={cfg.objective.estimator} "
                         f"backpropagates through it; use objective.estimator=weighted, policy_gradient or base_pool")
    return reward


def auto_checkpointing(fam, size: tuple[int, int] | None) -> bool:
    """`objective.checkpointing=null`: on where a window step's activations, not the weights, decide the memory."""
    return math.prod(fam.latent_shape(1, *(size or ()))) >= AUTO_CHECKPOINT_LATENT


def auto_paired_calls(fam, batch: int, size: tuple[int, int] | None, cfg_copies: int) -> bool:
    """`objective.paired_calls=null`: one call for policy and base where a call is small (`AUTO_PAIRED_CALL`)."""
    return math.prod(fam.latent_shape(batch * cfg_copies, *(size or ()))) <= AUTO_PAIRED_CALL


def score(reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The reward, checked: a float tensor [B] (else a ValueError naming the reward and what it returned)."""
    from sb_finetune.rewards import check_reward_output

    return check_reward_output(reward(images, prompts), reward.name, images.shape[0]).float()


def train(cfg: Config, resume: str | None = None) -> dict:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    out_dir = cfg.output.dir
    alone = _launched_alone()
    if alone:
        raise RuntimeError(alone)
    accelerator = Accelerator(
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.distributed.timeout_s))],
        cpu=_cpu_only(),
        mixed_precision=cfg.optim.mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with=None if cfg.logging.tracker == "none" else cfg.logging.tracker,
        project_config=ProjectConfiguration(project_dir=out_dir),  # checkpoints: sb_finetune.checkpoint
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"{launched} processes were launched but accelerate joined {accelerator.num_processes} "
                           f"({accelerator.distributed_type}): each would train alone. On CPUs use `accelerate launch "
                           f"--multi_gpu --num_processes {launched}`")
    set_seed(cfg.optim.seed, device_specific=True)
    if accelerator.device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal floats slow CPU math several-fold as small weights decay
        torch.set_num_threads(_cpu_threads())
        _release_freed_activations()
    reward = build_reward(cfg)  # fails fast on an unknown reward, before the model loads
    held_out = load_held_out(cfg.logging.eval_rewards, accelerator.device)  # scored at evaluations, never trained on
    prompts = load_prompts(cfg.prompts)
    if cfg.objective.estimator == "base_pool" and len(set(prompts)) > 1:  # one pool, one prompt's Z
        raise ValueError(f"objective.estimator=base_pool keeps one pool of base paths for one prompt; got "
                         f"{len(set(prompts))} prompts: use weighted or policy_gradient with optim.group_size")
    if cfg.objective.estimator not in DIFFERENTIABLE_ONLY and cfg.optim.group_size is None and len(set(prompts)) > 1:
        raise ValueError(f"objective.estimator={cfg.objective.estimator} compares samples of one prompt: with "
                         f"{len(set(prompts))} prompts set optim.group_size (samples per prompt in a batch, e.g. 8)")

    # ---- model, control, optimizer
    pipe = load_pipeline(cfg.model).to(accelerator.device)
    fam = family_of(pipe, cfg.model.family)  # encode, denoise, latents, decode, schedule: the model's own ways
    size = (cfg.model.resolution,) * 2 if cfg.model.resolution else None
    schedule = fam.sampler_schedule(cfg.sampler, size)
    if not bool(schedule.controlled.any()):
        raise ValueError(f"sampler.steps={cfg.sampler.steps}, sampler.eta={cfg.sampler.eta}: no step of this chain is "
                         f"controlled ({int((schedule.std > 0).sum())} stochastic; a deterministic step takes the base's "
                         f"mean and pays no KL), so training would change nothing: use sampler.steps >= 2 and eta > 0")
    if cfg.objective.checkpointing is None:  # auto; the resolved value is what config.yaml keeps
        cfg.objective.checkpointing = auto_checkpointing(fam, size)
    if cfg.objective.paired_calls is None:  # the batch one process's model call sees: CFG doubles it
        cfg.objective.paired_calls = auto_paired_calls(fam, cfg.optim.batch_size, size, 2 if cfg.sampler.guidance_scale > 1 else 1)
    module = fam.module
    params = add_lora_control(module, cfg.control.rank, cfg.control.lora_alpha, cfg.control.target_modules, cfg.control.init)
    if cfg.control.merged_forward is None:  # auto: on the CPU, where peft's rank-r calls cost more than the merge
        cfg.control.merged_forward = accelerator.device.type == "cpu"
    if cfg.control.merged_forward:
        use_merged_forward(module)
    if cfg.control.init_from:  # continue from a saved adapter; a resume's checkpoint, loaded later, overrides it
        _start_from(module, cfg)
    for part in pipe.components.values():  # every frozen network: VAE, text encoders (CLIP, T5, Qwen2.5-VL, …)
        if isinstance(part, torch.nn.Module) and part is not module:
            part.requires_grad_(False)
    reward.to(accelerator.device).requires_grad_(False)
    optimizer = torch.optim.AdamW(lora_plus_groups(module, params, cfg.optim), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    lr_schedule = _lr_schedule(cfg, optimizer, accelerator.num_processes)
    ddp_module, optimizer, lr_schedule = accelerator.prepare(module, optimizer, lr_schedule)
    counters = Counters()
    meta = {"base_model": cfg.model.pretrained, "family": fam.name, "sampler": {"steps": cfg.sampler.steps, "eta": cfg.sampler.eta,
            "flow_method": cfg.sampler.flow_method, "guidance_scale": cfg.sampler.guidance_scale, "timesteps": cfg.sampler.timesteps},
            "alpha": cfg.objective.alpha, "reward": reward.name}
    # checkpoints hold the LoRA in diffusers' format (+ config.yaml, an estimator's own state), not the frozen model
    estimator = make_estimator(cfg.objective)
    accelerator.register_save_state_pre_hook(_save_hook(accelerator, pipe, module, meta, counters, cfg, estimator))
    accelerator.register_load_state_pre_hook(_load_hook(module))
    history = []
    if resume:
        path = checkpoint.choose(accelerator, out_dir, resume)  # the newest every process reads whole
        try:
            accelerator.load_state(path)
        except ValueError as err:  # torch's optimizer: "loaded state dict has a different number of parameter groups"
            if "parameter groups" not in str(err):
                raise
            raise ValueError(f"--resume {path}: its optimizer has another number of parameter groups than this run's "
                             f"{len(optimizer.param_groups)} (optim.lora_plus_ratio={cfg.optim.lora_plus_ratio}: 1 is one "
                             f"group, any other value two); resume with the ratio of its config.yaml") from None
        counters.step, counters.skipped = checkpoint.read_state(path)
        history = _read_history(out_dir, counters.step)
        _restart_lr_schedule(lr_schedule, cfg, counters.step, accelerator.num_processes)
        if checkpoint.load_estimator(path, accelerator.process_index, estimator):
            print(f"process {accelerator.process_index}: {estimator.name}'s state read from {path}", flush=True)
        accelerator.print(f"resumed from {path} at step {counters.step}")
    if accelerator.is_main_process:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    if cfg.logging.tracker != "none":
        accelerator.init_trackers(cfg.logging.project)
    evaluate = make_evaluator(accelerator, cfg, fam, module, schedule, prompts, reward, held_out)
    started, start, optimum, base_paths = time.time(), {}, _saved_optimum(out_dir), None
    if counters.step == 0:
        start = evaluate(0)
        optimum, base_paths = write_summary(accelerator, cfg, fam, module, schedule, reward, prompts, "before",
                                            held_out=held_out)  # the base paths, kept: the summary after scores them
        if optimum and cfg.logging.tracker != "none":  # the reference every curve is read against
            accelerator.log({f"optimum/{k}": v for k, v in optimum.items() if isinstance(v, (int, float))}, step=0)
    alarm = KLAlarm(cfg.logging.kl_alarm, cfg.logging.kl_alarm_stop)

    # ---- the loop
    local = lambda: accelerator.no_sync(ddp_module)  # noqa: E731  (partial backwards, all-reduced with a later one)
    b = cfg.optim.batch_size
    bar = tqdm(total=cfg.optim.steps, initial=counters.step, disable=not accelerator.is_main_process, desc="train")
    bad_reward_streak = 0
    setup_mem = _peak_mem_mb(accelerator.device)  # what model and setup hold: a step's own memory is peak − this
    while counters.step < cfg.optim.steps:
        t0, lr = time.time(), optimizer.param_groups[0]["lr"]  # the rate this step uses
        all_finite = True  # one non-finite micro-step voids the whole accumulated step
        problem = None  # what the reward returned, if it was not finite
        for micro in range(cfg.optim.grad_accum):
            # each process and step has its own stream: device-specific, and exact on resume
            draw_seed = cfg.optim.seed + 7919 * (counters.step * cfg.optim.grad_accum + micro)
            g = torch.Generator(accelerator.device).manual_seed(draw_seed + 1_000_003 * accelerator.process_index)
            groups = None  # one group: the whole batch (one prompt), or prompts drawn one by one
            if cfg.optim.group_size:  # b / G prompts, G samples each
                n_groups = b // cfg.optim.group_size
                groups = torch.arange(n_groups).repeat_interleave(cfg.optim.group_size)
                idx = torch.randint(len(prompts), (n_groups,), generator=g, device=accelerator.device)[groups].tolist()
            else:
                idx = torch.randint(len(prompts), (b,), generator=g, device=accelerator.device).tolist()
            batch_prompts = [prompts[i] for i in idx]
            # draws every process must agree on (the window K, the regressed steps) ignore the rank: equal work per
            # rank, so none waits for the slowest at the all-reduce
            shared = torch.Generator().manual_seed(draw_seed)
            with accelerator.accumulate(ddp_module):
                cond = fam.encode(batch_prompts, b, cfg.sampler.guidance_scale, cfg.sampler.negative_prompt or None, size)
                policy = fam.denoiser(ddp_module, cond, DTYPES[cfg.model.dtype])
                base = base_denoiser(fam.denoiser(module, cond, DTYPES[cfg.model.dtype]), module)
                both = (paired_denoiser(fam.denoiser(ddp_module, cond.repeat(2), DTYPES[cfg.model.dtype]), module)
                        if cfg.objective.paired_calls else None)
                frozen = (frozen_denoiser(fam.denoiser(module, cond, DTYPES[cfg.model.dtype]), module)
                          if cfg.objective.path_gradient == "stl" else None)
                x0 = fam.start_noise(fam.latent_shape(b, *(size or ())), g, accelerator.device)
                task = Task(policy, base, schedule, x0, lambda x: score(reward, fam.decode(x), batch_prompts),
                            cfg.objective.alpha, g, shared, accelerator.backward, local, groups, both, frozen, module,
                            lambda m: fam.denoiser(m, cond, DTYPES[cfg.model.dtype]), lr)
                with accelerator.autocast():
                    est = estimator(task)
                    seen = non_finite_message(est.reward, reward.name, getattr(reward, "last_error", None))
                    finite, problem_here = _agree(accelerator, est.finite(), seen)
                    problem = problem or problem_here
                    all_finite = all_finite and finite
                    if finite:  # NaN/inf never reaches the weights
                        est.backward()
                        if est.late:  # numbers the backward made (the window's KL under checkpointing): check them too
                            made = est.finite()
                            finite, problem_here = _agree(accelerator, made, None if made else "the KL to the base "
                                                          "was not finite")
                            problem = problem or problem_here
                            all_finite = all_finite and finite
                if accelerator.sync_gradients:
                    grad_norm = _update(accelerator, params, optimizer, lr_schedule, cfg, all_finite, counters, problem)
                    for _ in range(cfg.optim.updates_per_batch - 1 if all_finite else 0):  # reuse the batch's paths
                        with accelerator.autocast():
                            est.backward()
                        grad_norm = _update(accelerator, params, optimizer, lr_schedule, cfg, True, counters, None)
        bad_reward_streak = bad_reward_streak + 1 if problem else 0
        if bad_reward_streak >= MAX_BAD_REWARD_STEPS:
            raise RuntimeError(f"{problem}, on {bad_reward_streak} steps in a row: stopping (the weights never saw it; "
                               f"checkpoints already saved in {out_dir} are kept)")
        counters.step += 1
        logs = {**est.log_dict(), "grad_norm": float(grad_norm), "lr": lr, "skipped": counters.skipped,
                "step_time": time.time() - t0, "peak_mem_mb": _peak_mem_mb(accelerator.device), "setup_mem_mb": setup_mem}
        if hasattr(reward, "last_terms"):
            logs.update({f"reward/{k}": v for k, v in reward.last_terms.items()})
        if optimum:  # the batch's distance to what the optimal control reaches (summary.json's estimate)
            logs["objective_gap"] = logs["objective"] - optimum["objective"]
        history.append(logs)
        if cfg.logging.tracker != "none" and counters.step % cfg.logging.every == 0:
            accelerator.log(logs, step=counters.step)
        bar.update(1)
        bar.set_postfix(reward=f"{logs['reward_mean']:.3f}", kl=f"{logs['kl']:.3f}", sec=f"{logs['step_time']:.1f}",
                        **({"gap": f"{logs['objective_gap']:.2f}"} if optimum else {}))
        if cfg.output.checkpoint_every and counters.step % cfg.output.checkpoint_every == 0:
            checkpoint.save(accelerator, out_dir, counters.step, cfg.output.keep_last)
            if accelerator.is_main_process:
                _write_history(out_dir, history)
        if cfg.logging.eval_every and counters.step % cfg.logging.eval_every == 0 and counters.step < cfg.optim.steps:
            history[-1].update(evaluate(counters.step))
            if accelerator.is_main_process:  # the curves so far, while the run goes
                save_curves(history, os.path.join(out_dir, "curves.png"), optimum, start)
        if alarm(accelerator, counters.step, logs["kl"], optimum):
            break
    bar.close()
    if history:
        history[-1].update(evaluate(counters.step))
    optimum = write_summary(accelerator, cfg, fam, module, schedule, reward, prompts, "after",
                            {"steps": counters.step, "seconds": round(time.time() - started, 1), "peak_rss_mb": _peak_rss_mb()},
                            held_out, base_paths)[0] or optimum
    if accelerator.is_main_process and history:
        save_curves(history, os.path.join(out_dir, "curves.png"), optimum, start)

    # ---- the result: adapter + metadata + model card + resolved config; every rank holds the same control
    accelerator.wait_for_everyone()
    lora = {k: v.detach().float().cpu() for k, v in lora_state_dict(module).items()}
    _check_ranks_agree(accelerator, lora)
    if accelerator.is_main_process:
        save_lora_control(pipe, module, out_dir, {**meta, "steps": counters.step, "skipped_steps": counters.skipped})
        _write_history(out_dir, history)
        if cfg.output.push_to_hub:
            from .hub import push_to_hub

            url = push_to_hub(out_dir, cfg.output.push_to_hub, allow_patterns=PUSHED_FILES)
            accelerator.print(f"pushed to {url}")
    # the group goes down on every rank at once, after the main one's last write: a rank tearing gloo down while a
    # peer still holds the connection can abort at exit ("terminate called without an active exception")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"steps": counters.step, "skipped": counters.skipped, "history": history, "lora": lora}


def _update(accelerator, params, optimizer, lr_schedule, cfg: Config, finite: bool, counters: Counters, problem) -> float:
    """One optimizer step on the gradient made, clipped; skipped (weights untouched, counted, said) where the loss or
    the gradient is not finite. Returns the gradient norm."""
    grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm or math.inf) if finite else float("nan")
    if finite and is_finite(torch.as_tensor(grad_norm)):
        optimizer.step()
        lr_schedule.step()
    else:
        counters.skipped += 1
        warnings.warn(f"step {counters.step}: {problem or 'non-finite loss or gradient'}; step skipped, weights "
                      f"untouched (total {counters.skipped})")
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


PUSHED_FILES = ["pytorch_lora_weights.safetensors", "sb_finetune.json", "README.md", "config.yaml", "history.json", "samples/*"]


def _lr_schedule(cfg: Config, optimizer, num_processes: int):
    """diffusers' schedule, counted in optimizer steps (`optim.updates_per_batch` a training step). accelerate steps a
    prepared schedule once per process on each optimizer step (a schedule per sample seen), so its lengths are given
    in those units."""
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if cfg.optim.lr_schedule == "constant" else cfg.optim.lr_schedule
    per_step = cfg.optim.updates_per_batch * num_processes
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.optim.warmup_steps * per_step,
                         num_training_steps=cfg.optim.steps * per_step)


def lora_plus_groups(module: torch.nn.Module, params: list, optim) -> list:
    """The optimizer's parameter groups: one at optim.lr, or with `optim.lora_plus_ratio` != 1 (LoRA+) the A matrices
    at optim.lr and the B matrices (zero at the start: ΔW = B·A) at lr · ratio; a resumed schedule restarts each at
    its own rate (`_restart_lr_schedule`)."""
    if optim.lora_plus_ratio == 1.0:
        return [{"params": params}]
    b_ids = {id(p) for name, p in module.named_parameters() if ".lora_B." in name}
    groups = [{"params": [p for p in params if id(p) not in b_ids]},
              {"params": [p for p in params if id(p) in b_ids], "lr": optim.lr * optim.lora_plus_ratio}]
    if not groups[1]["params"]:
        raise ValueError("optim.lora_plus_ratio: the control has no LoRA B matrices (peft's lora_B) to give the rate")
    return groups


def _restart_lr_schedule(lr_schedule, cfg: Config, step: int, num_processes: int) -> None:
    """After a resume, the rate the resumed config's schedule gives at the restored step. (The checkpoint's optimizer
    holds the rate its own run would use next: with another `optim.steps` or `optim.lr`, a cosine would take one
    step at the old schedule's rate.)"""
    inner = lr_schedule.scheduler  # accelerate's wrapper around torch's LambdaLR
    ratios = [1.0, cfg.optim.lora_plus_ratio][:len(inner.optimizer.param_groups)]  # lora_plus_groups' order: A, B
    inner.base_lrs = [cfg.optim.lr * r for r in ratios]
    inner.last_epoch = step * cfg.optim.updates_per_batch * num_processes
    for group, base_lr, factor in zip(inner.optimizer.param_groups, inner.base_lrs, inner.lr_lambdas):
        group["lr"] = base_lr * factor(inner.last_epoch)


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, MB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if os.uname().sysname == "Darwin" else 1024), 1)  # bytes on macOS, KB elsewhere


def _peak_mem_mb(device: torch.device) -> float | None:
    """Peak memory so far, MB: the accelerator's allocated tensors on a GPU, the process's resident set on the CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return _peak_rss_mb()


def _release_freed_activations() -> None:
    """glibc's malloc raises its mmap threshold to the size of every large block freed, after which a training step's
    activations come from heap arenas that keep them when freed: the resident set then grows with each step of the
    gradient window, checkpointed or not (latent 64, K = 20: 2.0 GB over the process instead of 0.25 GB). A fixed
    threshold of 1 MiB maps blocks from that size on and unmaps them when freed; smaller ones, where a step of a small
    model lives, stay on the fast heap. Fixing that threshold also fixes the heap's trim threshold at its 128 KiB
    default, so the heap's top was given back to the system and faulted in again many times a step (on digits with the
    policy's first pass without a graph: 3× the system time, 131 M page faults against 37 M, 18 % slower): it is set
    to 256 MiB, with a top pad of 64 MiB. Nothing on other C libraries."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (malloc.h)
            libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
            libc.mallopt(-2, 64 << 20)  # M_TOP_PAD
    except OSError:
        pass


def _cpu_threads() -> int:
    """Threads per process on the CPU: SB_FINETUNE_CPU_THREADS if set, else the physical cores shared among this
    machine's processes. (`accelerate launch` without `--cpu` sets OMP_NUM_THREADS=1, which leaves all but one
    core idle: 1.6× slower on 2 cores.)"""
    if os.environ.get("SB_FINETUNE_CPU_THREADS"):
        return max(1, int(os.environ["SB_FINETUNE_CPU_THREADS"]))
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _cpu_only() -> bool:
    """Run on the CPU: asked for (`accelerate launch --cpu`), or no accelerator present. On a machine without
    GPUs, accelerate makes `--multi_gpu --num_processes 2` a gloo process group only when told it is on the CPU;
    otherwise each process silently trains alone."""
    from accelerate.utils import parse_flag_from_env

    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accelerator


def _launched_alone() -> str | None:
    """Why this process trains alone although more were asked for, or None. `accelerate launch --cpu
    --num_processes N` (N > 1) starts ONE process: it sets MASTER_ADDR/PORT for MPI to start the rest, and without
    mpirun nothing does (no WORLD_SIZE, no MPI rank variables)."""
    from accelerate.utils import get_int_from_env, parse_flag_from_env

    world = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    if parse_flag_from_env("ACCELERATE_USE_CPU") and "MASTER_ADDR" in os.environ and world == 1:
        return ("`accelerate launch --cpu --num_processes N` started one process (it leaves the others to mpirun): "
                "this run would train alone. On CPUs use `accelerate launch --multi_gpu --num_processes N train.py ...` "
                "(gloo); for one process, `accelerate launch --cpu train.py ...` without --num_processes")
    return None


def _save_hook(accelerator, pipe, module, meta: dict, counters: Counters, cfg: Config, estimator):
    def hook(models_, weights, output_dir):
        if accelerator.is_main_process:
            save_lora_control(pipe, module, output_dir, {**meta, "steps": counters.step, "skipped_steps": counters.skipped})
            with open(os.path.join(output_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
            checkpoint.write_state(output_dir, counters.step, counters.skipped)
        os.makedirs(output_dir, exist_ok=True)
        checkpoint.save_estimator(output_dir, accelerator.process_index, estimator)  # each process its own
        weights.clear()  # the adapter file above is the model state; accelerate keeps optimizer, RNG, counters

    return hook


def _load_hook(module):
    def hook(models_, input_dir):
        load_lora_control(module, input_dir)
        models_.clear()  # loaded above; accelerate must not look for a full model file

    return hook


def _check_ranks_agree(accelerator, lora: dict) -> None:
    """Gradients are all-reduced, so every rank must end with the same control; say so loudly if not."""
    if accelerator.num_processes == 1:
        return
    local = torch.stack([torch.tensor([float(v.double().sum()), float(v.double().abs().sum())]) for v in lora.values()]).sum(0)
    every = accelerator.gather(local.to(accelerator.device)[None]).cpu()
    if not torch.allclose(every, every[0].expand_as(every), rtol=0, atol=1e-6):
        raise RuntimeError(f"the LoRA weights differ across the {accelerator.num_processes} processes (checksums {every.tolist()}): "
                           f"gradients were not synchronised")


def _agree(accelerator, finite: bool, problem: str | None) -> tuple[bool, str | None]:
    """(finite on every process, a problem one of them saw). Under DDP all ranks must take the same branch: a
    backward skipped on one rank alone leaves the others' all-reduce unpaired (a hang, or an abort in gloo when it
    pairs with the next collective), and a rank stopping alone on a broken reward leaves the rest waiting."""
    if accelerator.num_processes == 1:
        return finite, problem
    from accelerate.utils import gather_object

    if bool(accelerator.gather(torch.tensor([float(finite)], device=accelerator.device)).min() == 1.0):
        return True, None
    seen = [(rank, p) for rank, p in enumerate(gather_object([problem])) if p]  # rare: only on a bad step
    if problem is None and seen:
        problem = f"on process {seen[0][0]}: {seen[0][1]}"
    return False, problem


def _write_history(out_dir: str, history: list[dict]) -> None:
    path = os.path.join(out_dir, "history.json")
    with open(path + ".partial", "w") as f:  # a kill while writing leaves the previous history whole
        json.dump(history, f)
    os.replace(path + ".partial", path)


def _saved_optimum(out_dir: str) -> dict | None:
    """summary.json's optimum from the run being resumed, if it wrote one."""
    path = os.path.join(out_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("optimum")


def _read_history(out_dir: str, step: int) -> list[dict]:
    path = os.path.join(out_dir, "history.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)[:step]
