"""Config: nested dataclasses are the schema; YAML files are experiments; `dotted.key=value` overrides.

Unknown keys and wrong types fail with a `ConfigError` naming the key, before any model is loaded.
`configs/base.yaml` documents every field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A config problem, said in one line that names the key."""


@dataclass
class ModelConfig:
    pretrained: str = "tiny:sd"  # hub id, local diffusers folder, or tiny:<sd|sdxl|sd3|ddpm> from the kit
    family: str = "auto"  # auto | sd | sdxl | sd3 | unet2d
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. fp16 weight files on the hub
    dtype: str = "float32"  # frozen weights: float32 | float16 | bfloat16
    resolution: Optional[int] = None  # image side in pixels; None = the model's default


@dataclass
class ControlConfig:
    rank: int = 4
    lora_alpha: Optional[float] = None  # None = rank (scale 1)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    init: str = "gaussian"  # peft init_lora_weights; every choice starts at zero control


@dataclass
class SamplerConfig:
    steps: int = 20
    eta: float = 1.0  # noise level: 1 = memoryless (the SOC optimum is the tilted base); < 1 biases it
    flow_method: str = "posterior"  # flow models: posterior | euler_maruyama
    guidance_scale: float = 1.0  # classifier-free guidance; > 1 doubles the batch of every model call
    negative_prompt: str = ""


@dataclass
class ObjectiveConfig:
    alpha: float = 1.0  # KL weight: optimum ∝ p_base · exp(reward / alpha)
    estimator: str = "pathwise"  # pathwise | adjoint (Adjoint Matching): how the gradient of the objective is estimated
    adjoint_steps: Optional[int] = None  # adjoint: K controlled steps regressed per trajectory; None = all
    window_min: int = 1  # gradient window K ~ uniform[window_min, window_max] controlled steps
    window_max: Optional[int] = None  # None = all steps (unbiased); window_min == window_max = fixed K
    kl_grad: str = "window"  # window | all: also the KL terms before the window (local backward)
    checkpointing: bool = False  # per-step activation checkpointing inside the window


@dataclass
class RewardConfig:
    name: str = "brightness"  # registered name, "pkg.module:factory", or an entry point
    mix: dict[str, float] = field(default_factory=dict)  # {name: weight}; replaces `name` when set
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the reward factory (each, for a mix)


@dataclass
class PromptsConfig:
    list: list[str] = field(default_factory=lambda: ["a photo of a cat"])
    file: Optional[str] = None  # .txt (one a line), .json (list), or .csv/.jsonl with `column`
    dataset: Optional[str] = None  # a `datasets` id or path
    split: str = "train"
    column: str = "prompt"


@dataclass
class OptimConfig:
    steps: int = 100
    lr: float = 3e-4
    lr_schedule: str = "constant"  # constant | cosine | linear (to 0 at optim.steps), after optim.warmup_steps
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 2  # per device
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 = no clipping
    mixed_precision: str = "no"  # no | fp16 | bf16 (the LoRA weights and optimizer stay fp32)
    seed: int = 0


@dataclass
class LoggingConfig:
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    project: str = "sb-finetune"
    every: int = 1
    eval_every: int = 0  # image grid of eval prompts × seeds at step 0, every n steps and at the end; 0 = off
    eval_prompts: list[str] = field(default_factory=list)  # [] = the first 4 training prompts
    eval_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # one grid column per seed
    summary_samples: int = 0  # > 0: before and after training, that many samples → summary.json, grids, curves.png


@dataclass
class OutputConfig:
    dir: str = "outputs/run"
    checkpoint_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    push_to_hub: Optional[str] = None  # a hub repo id: upload the final adapter folder there


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


_CHOICES = {
    "model.family": ("auto", "sd", "sdxl", "sd3", "unet2d"),
    "model.dtype": ("float32", "float16", "bfloat16"),
    "sampler.flow_method": ("posterior", "euler_maruyama"),
    "objective.estimator": ("pathwise", "adjoint"),
    "objective.kl_grad": ("window", "all"),
    "optim.mixed_precision": ("no", "fp16", "bf16"),
    "optim.lr_schedule": ("constant", "cosine", "linear"),
    "logging.tracker": ("tensorboard", "wandb", "none"),
}


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema ← YAML file ← `key=value` overrides, validated. Raises ConfigError naming the problem."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    conf = OmegaConf.structured(Config)
    try:
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file not found: {path}")
            conf = OmegaConf.merge(conf, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
            conf = OmegaConf.merge(conf, OmegaConf.from_dotlist([item]))
        cfg: Config = OmegaConf.to_object(conf)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {_first_line(err)}") from None
    _validate(cfg)
    return cfg


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def _validate(cfg: Config) -> None:
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {choices}")
    positive = {"sampler.steps": cfg.sampler.steps, "optim.steps": cfg.optim.steps, "optim.batch_size": cfg.optim.batch_size,
                "optim.grad_accum": cfg.optim.grad_accum, "control.rank": cfg.control.rank}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}': must be >= 1, got {value}")
    if cfg.optim.warmup_steps < 0:
        raise ConfigError(f"config key 'optim.warmup_steps': must be >= 0, got {cfg.optim.warmup_steps}")
    if cfg.objective.alpha <= 0:
        raise ConfigError(f"config key 'objective.alpha': the KL weight must be > 0, got {cfg.objective.alpha}")
    if cfg.sampler.eta < 0:
        raise ConfigError(f"config key 'sampler.eta': must be >= 0, got {cfg.sampler.eta}")
    o = cfg.objective
    if o.adjoint_steps is not None and o.adjoint_steps < 1:
        raise ConfigError(f"config key 'objective.adjoint_steps': must be >= 1 (or null for all), got {o.adjoint_steps}")
    if o.window_min < 0 or (o.window_max is not None and o.window_max < o.window_min):
        raise ConfigError(f"config keys 'objective.window_min/max': need 0 <= min <= max, got {o.window_min}, {o.window_max}")
    # knobs of one estimator set for another would be ignored without a word: say so instead
    if o.estimator != "adjoint" and o.adjoint_steps is not None:
        raise ConfigError(f"config key 'objective.adjoint_steps': only for objective.estimator=adjoint (got {o.estimator!r})")
    ignored = [k for k in ("window_min", "window_max", "kl_grad") if getattr(o, k) != getattr(ObjectiveConfig(), k)]
    if o.estimator == "adjoint" and ignored:
        raise ConfigError(f"config keys {', '.join(f'objective.{k}' for k in ignored)}: only for the pathwise estimator; "
                          f"objective.estimator=adjoint regresses on objective.adjoint_steps steps drawn across the chain")
    if cfg.prompts.file is not None and not os.path.isfile(cfg.prompts.file):
        raise ConfigError(f"config key 'prompts.file': no such file: {cfg.prompts.file}")


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
