"""Config: nested dataclasses are the schema; YAML files are experiments; `dotted.key=value` overrides.

Unknown keys and wrong types fail with a `ConfigError` naming the key, before any model is loaded.
`configs/base.yaml` documents every field. The YAML files of `configs/` ship inside the package (`sb_finetune.configs`),
so `--config digits` works from any folder and from an install; `resolve_config` says where each value came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, get_type_hints


class ConfigError(ValueError):
    """A config problem, said in one line that names the key."""


@dataclass
class ModelConfig:
    pretrained: str = "tiny:sd"  # hub id, local diffusers folder, or tiny:<sd|sdxl|sd3|ddpm> from the kit
    family: str = "auto"  # auto | sd | sdxl | sd3 | flux | qwenimage | unet2d
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
    init_from: Optional[str] = None  # start from a saved adapter (folder or hub id) of the same rank, modules and scale
    merged_forward: Optional[bool] = None  # each LoRA layer as one call with W + s·BA (control.use_merged_forward); None = on the CPU


@dataclass
class SamplerConfig:
    steps: int = 20
    timesteps: Optional[list[int]] = None  # VP models: the grid's `steps` timesteps, descending (None: the scheduler's)
    eta: float = 1.0  # noise level: 1 = memoryless (the SOC optimum is the tilted base); < 1 biases it
    flow_method: str = "posterior"  # flow models: posterior | euler_maruyama
    guidance_scale: float = 1.0  # classifier-free guidance; > 1 doubles the batch of every model call
    negative_prompt: str = ""


@dataclass
class ObjectiveConfig:
    alpha: float = 1.0  # KL weight: optimum ∝ p_base · exp(reward / alpha)
    estimator: str = "pathwise"  # pathwise | adjoint (Adjoint Matching) | weighted | policy_gradient | base_pool (any reward)
    adjoint_steps: Optional[int] = None  # adjoint: K controlled steps regressed per trajectory; None = all
    grad_steps: Optional[int] = None  # weighted, policy_gradient, base_pool: K controlled steps with a gradient per batch; None = all
    weighted_target: str = "path"  # weighted: regress on the sampled transitions (path) or forward-noised endpoints (forward)
    clip_ratio: Optional[float] = None  # policy_gradient: PPO's ε on reused batches (optim.updates_per_batch > 1)
    pool_size: int = 2048  # base_pool: base paths each process draws once and resamples by exp(R/alpha)
    pool_hold: int = 2  # base_pool: the last n controlled steps regress on the base's own prediction (no control there)
    pool_target: str = "forward"  # base_pool: the tilted pool's denoiser (forward) | only the tilt, less the untilted pool's (contrast)
    min_ess: float = 0.5  # weighted: tempering keeps each group's effective sample size >= min_ess · G (0 = off)
    window_min: int = 1  # gradient window K ~ uniform[window_min, window_max] controlled steps
    window_max: Optional[int] = None  # None = all steps (every step can be inside); window_min == window_max = fixed K
    unbiased_window: bool = False  # scale each window step's parameter gradient by 1/P(inside the window): the full chain's
    #                                gradient in expectation, where the plain window weighs step j by that chance
    kl_grad: str = "window"  # window | all: also the KL terms before the window (local backward)
    path_gradient: str = "kl"  # pathwise: kl | stl (sticking the landing: per-path gradient 0 at the optimum; +1 call a step)
    kl_log_steps: Optional[int] = 2  # kl_grad=window: steps before the window whose KL is logged (stratified, unbiased); None = all
    checkpointing: Optional[bool] = None  # activation checkpointing per model call in the window; None = auto (large latents)
    paired_calls: Optional[bool] = None  # policy and base in one model call of twice the batch; None = auto (small calls)


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
    lora_plus_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): the rate of the LoRA B matrices over the A matrices' (optim.lr)
    batch_size: int = 2  # per device
    group_size: Optional[int] = None  # samples per prompt in a batch (weighted/policy_gradient compare within it); None: the batch is one group (one prompt)
    grad_accum: int = 1
    updates_per_batch: int = 1  # adjoint, weighted, policy_gradient: optimizer steps on each batch of paths (> 1: reuse it)
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
    eval_rewards: list[str] = field(default_factory=list)  # held-out rewards scored at evaluations and in the summary
    kl_alarm: Optional[float] = None  # nats: warn once when the path KL (mean of the last 10 steps) exceeds it
    kl_alarm_stop: bool = False  # and stop there (the adapter of that step is saved)


@dataclass
class OutputConfig:
    dir: str = "outputs/run"
    checkpoint_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    push_to_hub: Optional[str] = None  # a hub repo id: upload the final adapter folder there


@dataclass
class DistributedConfig:
    timeout_s: int = 1800  # a collective waits this long for a dead or stuck process, then this one stops with an error


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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


_CHOICES = {
    "model.family": ("auto", "sd", "sdxl", "sd3", "flux", "qwenimage", "unet2d"),  # sb_finetune.families.FAMILIES
    "model.dtype": ("float32", "float16", "bfloat16"),
    "sampler.flow_method": ("posterior", "euler_maruyama"),
    "objective.estimator": ("pathwise", "adjoint", "weighted", "policy_gradient", "base_pool"),
    "objective.kl_grad": ("window", "all"),
    "objective.path_gradient": ("kl", "stl"),
    "objective.weighted_target": ("path", "forward"),
    "objective.pool_target": ("forward", "contrast"),
    "optim.mixed_precision": ("no", "fp16", "bf16"),
    "optim.lr_schedule": ("constant", "cosine", "linear"),
    "logging.tracker": ("tensorboard", "wandb", "none"),
}


BUILTIN = "sb_finetune.configs"  # the YAML files of configs/, installed with the package
COMMAND_LINE, DEFAULT = "command line", "default"


@dataclass
class Resolved:
    """A config with where each field's value came from."""

    config: Config
    sources: dict[str, str]  # "section.field" → "default", the YAML file's path, or "command line"
    notes: list[str]  # what the resolution decided that the user did not say (printed by train.py)
    path: str | None = None  # the YAML file, resolved


def builtin_configs() -> list[str]:
    """Names of the configs that ship with the package (`--config digits`)."""
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files(BUILTIN).iterdir() if p.name.endswith(".yaml"))


def config_path(spec: str) -> str:
    """The YAML file `--config` names: a path as given; else a built-in config by name (`digits`, `smoke.yaml`,
    `configs/smoke.yaml`: the repository's spelling, so its commands work from an install too)."""
    if os.path.isfile(spec):
        return spec
    head, name = os.path.split(spec)
    name = name.removesuffix(".yaml")
    if head in ("", "configs"):
        from importlib.resources import files

        packaged = files(BUILTIN) / f"{name}.yaml"
        if packaged.is_file():
            return str(packaged)
    raise ConfigError(f"config file not found: {spec} (built-in configs, by name: {', '.join(builtin_configs())})")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema ← YAML file (a path or a built-in name) ← `key=value` overrides, validated. Raises ConfigError naming
    the problem."""
    return resolve_config(path, overrides).config


def schema_keys() -> list[str]:
    """Every "section.field" of the schema, in order."""
    default = Config()
    return [f"{s.name}.{f.name}" for s in fields(default) for f in fields(getattr(default, s.name))]


def _keys_under(dotted: str, keys: list[str]) -> list[str]:
    """The schema fields a YAML or command-line key sets: itself, the fields inside a section, or the field a deeper
    key (reward.kwargs.target) lies in."""
    return [k for k in keys if k == dotted or k.startswith(dotted + ".") or dotted.startswith(k + ".")]


def _flat(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict) and tree:
        return [key for k, v in tree.items() for key in _flat(v, f"{prefix}{k}.")]
    return [prefix[:-1]]


def resolve_config(spec: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Resolved:
    """Schema ← YAML file ← `key=value` overrides, validated, with each field's source. Raises ConfigError naming the
    problem. A command-line value replaces (`reward.kwargs={}` clears); arguments a YAML file gave one reward are
    dropped when the command line switches to another (and the notes say so)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    keys = schema_keys()
    sources = dict.fromkeys(keys, DEFAULT)
    conf = OmegaConf.structured(Config)
    path = config_path(spec) if spec is not None else None
    try:
        if path is not None:
            data = OmegaConf.load(path)
            _check_file_values(data, path)
            conf = OmegaConf.merge(conf, data)
            for key in _flat(OmegaConf.to_container(data)):
                sources.update(dict.fromkeys(_keys_under(key, keys), path))
            beside = os.path.join(os.path.dirname(os.path.abspath(path)), conf.prompts.file or "")
            if sources["prompts.file"] == path and conf.prompts.file and not os.path.isabs(conf.prompts.file) \
                    and os.path.isfile(beside):
                conf.prompts.file = beside  # a YAML's relative path is relative to the YAML (else to the folder run in)
        file_reward = (conf.reward.name, dict(conf.reward.mix))
        file_estimator = conf.objective.estimator
        given_kwargs: set[str] = set()  # reward.kwargs.NAME set on the command line
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
            key, text = (part.strip() for part in item.split("=", 1))
            value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
            if isinstance(value, bool) and key in _TEXT_FIELDS:  # YAML's no/off/yes/on: the word, not a boolean
                value = text
            # a value given replaces (reward.kwargs={} clears); a whole section merges into the schema's
            OmegaConf.update(conf, key, value, merge="." not in key)
            section = "." not in key and OmegaConf.is_dict(value)  # reward={name: x}: the fields it names
            for given in [f"{key}.{sub}" for sub in _flat(OmegaConf.to_container(value))] if section else [key]:
                if given.startswith("reward.kwargs."):
                    given_kwargs.add(given.split(".")[2])
                for k in _keys_under(given, keys):  # inside a dict field (reward.kwargs.target) the rest keeps its source
                    kept = given.startswith(k + ".") and sources[k] not in (DEFAULT, COMMAND_LINE)
                    sources[k] = f"{sources[k].removesuffix(' + ' + COMMAND_LINE)} + {COMMAND_LINE}" if kept else COMMAND_LINE
        notes = _drop_other_rewards_kwargs(conf, sources, file_reward, given_kwargs)
        notes += _drop_file_grid(conf, sources)
        notes += _file_rate_for_another_estimator(conf, sources, file_estimator)
        cfg: Config = OmegaConf.to_object(conf)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {first_line(err)}") from None
    _validate(cfg)
    return Resolved(cfg, sources, notes, path)


# YAML 1.1 (OmegaConf's reader) reads these words, unquoted, as booleans
_BOOLEAN_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


_SECTIONS = get_type_hints(Config)  # section name → its dataclass
# the "section.field" keys that hold text (str or Optional[str]): there a YAML boolean word is the word
_TEXT_FIELDS = {f"{section}.{name}" for section, kind in _SECTIONS.items()
                for name, hint in get_type_hints(kind).items() if hint in (str, Optional[str])}


def _check_file_values(data, path: str) -> None:
    """What a YAML file's reader makes of a value before the schema sees it. The file and each section must be
    mappings (a list or `model: 5` would reach the schema's merge, whose error names no key, or crash it). An
    unquoted `mixed_precision: no` reaches us as False: put back the word a choice field takes, or stop with the key
    and the quoting that keeps the word (the command line keeps the word as typed instead)."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_dict(data):
        raise ConfigError(f"{path}: a config file is a mapping of sections (model:, optim:, ...), got a "
                          f"{type(OmegaConf.to_container(data)).__name__}")
    for section in data:
        if section in _SECTIONS and not OmegaConf.is_dict(data[section]):
            raise ConfigError(f"config key '{section}' in {path}: a section of fields (a mapping), got "
                              f"{OmegaConf.to_container(data)[section]!r}")
    for key in _flat(OmegaConf.to_container(data)):
        if key not in _TEXT_FIELDS:
            continue
        section, name = key.split(".")
        value = data[section][name]
        if not isinstance(value, bool):
            continue
        words = [w for w in _CHOICES.get(key, ()) if w in _BOOLEAN_WORDS[value]]
        if len(words) != 1:
            raise ConfigError(f"config key '{key}' in {path}: YAML reads an unquoted no/yes/off/on/false/true as a "
                              f"boolean ({value}); quote the word, e.g. {name}: \"{_BOOLEAN_WORDS[value][0]}\"")
        data[section][name] = words[0]


def _drop_other_rewards_kwargs(conf, sources: dict[str, str], file_reward: tuple[str, dict], given: set[str]) -> list[str]:
    """Keyword arguments a YAML file gave its reward do not follow the command line to another reward (those the
    command line gave, `reward.kwargs.NAME=…`, stay)."""
    switched = (sources["reward.name"] == COMMAND_LINE and conf.reward.name != file_reward[0]) or \
               (sources["reward.mix"] == COMMAND_LINE and dict(conf.reward.mix) != file_reward[1])
    dropped = {k: v for k, v in conf.reward.kwargs.items() if k not in given}
    if not switched or not dropped or sources["reward.kwargs"] in (DEFAULT, COMMAND_LINE):
        return []
    was = sources["reward.kwargs"].removesuffix(f" + {COMMAND_LINE}")
    for k in dropped:
        del conf.reward.kwargs[k]
    sources["reward.kwargs"] = COMMAND_LINE if given else f"{DEFAULT} (those of {was} were for another reward)"
    now = f"the mix {dict(conf.reward.mix)}" if conf.reward.mix else f"'{conf.reward.name}'"
    return [f"reward.kwargs {dropped} from {was} were for reward '{file_reward[0]}', not passed to {now} "
            f"(set reward.kwargs.NAME=VALUE on the command line for it)"]


def _file_rate_for_another_estimator(conf, sources: dict[str, str], file_estimator: str) -> list[str]:
    """A YAML file's rate was chosen for the estimator that file runs (digits: 1e-2 is pathwise's; the others were
    measured at 3e-3 or less): it stays, but a command line that switches the estimator and not the rate hears so."""
    was = sources["optim.lr"]
    if sources["objective.estimator"] != COMMAND_LINE or conf.objective.estimator == file_estimator or \
            was == DEFAULT or was.endswith(COMMAND_LINE):
        return []
    return [f"optim.lr={conf.optim.lr:g} from {was} was chosen for objective.estimator='{file_estimator}', and "
            f"'{conf.objective.estimator}' trains with it: set optim.lr for it on the command line (README: Fine-tune)"]


def _drop_file_grid(conf, sources: dict[str, str]) -> list[str]:
    """A grid a YAML file gave (`sampler.timesteps`) does not follow the command line to another step count."""
    grid, steps = conf.sampler.timesteps, conf.sampler.steps
    grid = None if grid is None else list(grid)
    if grid is None or len(grid) == steps or sources["sampler.steps"] != COMMAND_LINE or \
            sources["sampler.timesteps"] in (DEFAULT, COMMAND_LINE):
        return []
    was = sources["sampler.timesteps"]
    conf.sampler.timesteps = None
    sources["sampler.timesteps"] = f"{DEFAULT} (the {len(grid)} of {was} were for sampler.steps={len(grid)})"
    return [f"sampler.timesteps from {was} has {len(grid)} steps, not sampler.steps={steps}: the scheduler's own grid is "
            f"used (set sampler.timesteps=[...] on the command line for a grid of your own)"]


def describe(resolved: Resolved) -> str:
    """The resolved config as YAML that `--config` reads back, each field commented with where its value came from."""
    import yaml

    cfg, width = resolved.config, max(len(k) for k in schema_keys()) + 24
    lines = [f"# resolved config: {resolved.path or 'the schema defaults'}"
             f"{' + command-line overrides' if COMMAND_LINE in resolved.sources.values() else ''}"]
    lines += [f"# note: {n}" for n in resolved.notes]
    section = None
    for key in schema_keys():
        name, leaf = key.split(".")
        if name != section:
            lines.append(f"{name}:")
            section = name
        value = getattr(getattr(cfg, name), leaf)
        text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True).strip()
        text = text.removesuffix("...").strip()
        lines.append(f"  {leaf}: {text}".ljust(width) + f"  # {resolved.sources[key]}")
    return "\n".join(lines)


def first_line(err: Exception) -> str:
    """An error's first line (its one-line account: our messages, and the user-facing part of others')."""
    return (str(err).strip().splitlines() or [""])[0]


def _validate(cfg: Config) -> None:
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {choices}")
    positive = {"sampler.steps": cfg.sampler.steps, "optim.steps": cfg.optim.steps, "optim.batch_size": cfg.optim.batch_size,
                "optim.grad_accum": cfg.optim.grad_accum, "control.rank": cfg.control.rank,
                "output.keep_last": cfg.output.keep_last, "distributed.timeout_s": cfg.distributed.timeout_s}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}': must be >= 1, got {value}")
    if cfg.optim.lora_plus_ratio <= 0:
        raise ConfigError(f"config key 'optim.lora_plus_ratio': the B matrices' rate over the A matrices' must be > 0, "
                          f"got {cfg.optim.lora_plus_ratio}")
    if cfg.optim.warmup_steps < 0:
        raise ConfigError(f"config key 'optim.warmup_steps': must be >= 0, got {cfg.optim.warmup_steps}")
    if cfg.objective.alpha <= 0:
        raise ConfigError(f"config key 'objective.alpha': the KL weight must be > 0, got {cfg.objective.alpha}")
    ts = cfg.sampler.timesteps
    if ts is not None and (len(ts) != cfg.sampler.steps or any(a <= b for a, b in zip(ts, ts[1:])) or min(ts) < 0):
        raise ConfigError(f"config key 'sampler.timesteps': {cfg.sampler.steps} (sampler.steps) distinct timesteps >= 0 in "
                          f"descending order, or null; got {len(ts)}: {ts}")
    if cfg.sampler.eta < 0:
        raise ConfigError(f"config key 'sampler.eta': must be >= 0, got {cfg.sampler.eta}")
    o = cfg.objective
    if o.adjoint_steps is not None and o.adjoint_steps < 1:
        raise ConfigError(f"config key 'objective.adjoint_steps': must be >= 1 (or null for all), got {o.adjoint_steps}")
    if o.window_min < 0 or (o.window_max is not None and o.window_max < o.window_min):
        raise ConfigError(f"config keys 'objective.window_min/max': need 0 <= min <= max, got {o.window_min}, {o.window_max}")
    if o.window_max is not None and o.window_max < 1:
        raise ConfigError(f"config key 'objective.window_max': {o.window_max} leaves the gradient window without a "
                          f"controlled step, so the reward never reaches the weights; use >= 1 (or null for the whole chain)")
    # knobs of one estimator set for another would be ignored without a word: say so instead
    if o.estimator != "adjoint" and o.adjoint_steps is not None:
        raise ConfigError(f"config key 'objective.adjoint_steps': only for objective.estimator=adjoint (got {o.estimator!r})")
    if o.estimator not in ("weighted", "policy_gradient", "base_pool") and o.grad_steps is not None:
        raise ConfigError(f"config key 'objective.grad_steps': only for objective.estimator=weighted, policy_gradient or base_pool "
                          f"(got {o.estimator!r})")
    if o.grad_steps is not None and o.grad_steps < 1:
        raise ConfigError(f"config key 'objective.grad_steps': must be >= 1 (or null for all), got {o.grad_steps}")
    if not 0 <= o.min_ess < 1:
        raise ConfigError(f"config key 'objective.min_ess': a fraction of the group in [0, 1), got {o.min_ess}")
    if o.estimator != "policy_gradient" and o.clip_ratio is not None:
        raise ConfigError(f"config key 'objective.clip_ratio': only for objective.estimator=policy_gradient (got {o.estimator!r})")
    if o.clip_ratio is not None and not 0 < o.clip_ratio < 1:
        raise ConfigError(f"config key 'objective.clip_ratio': PPO's ε in (0, 1), got {o.clip_ratio}")
    u = cfg.optim.updates_per_batch
    if u < 1 or (u > 1 and o.estimator == "pathwise"):
        raise ConfigError(f"config key 'optim.updates_per_batch': >= 1, and > 1 only for objective.estimator=adjoint, "
                          f"weighted or policy_gradient (pathwise's paths carry the graph of one update), got {u}")
    if u > 1 and cfg.optim.grad_accum > 1:
        raise ConfigError("config keys 'optim.updates_per_batch' and 'optim.grad_accum': reuse a batch or accumulate "
                          "batches, not both")
    for key in ("min_ess", "weighted_target"):
        if o.estimator != "weighted" and getattr(o, key) != getattr(ObjectiveConfig(), key):
            raise ConfigError(f"config key 'objective.{key}': only for objective.estimator=weighted (got {o.estimator!r})")
    for key in ("pool_size", "pool_hold", "pool_target"):
        if o.estimator != "base_pool" and getattr(o, key) != getattr(ObjectiveConfig(), key):
            raise ConfigError(f"config key 'objective.{key}': only for objective.estimator=base_pool (got {o.estimator!r})")
    if o.pool_size < 1:
        raise ConfigError(f"config key 'objective.pool_size': at least 1 path, got {o.pool_size}")
    if o.estimator == "base_pool" and not 0 <= o.pool_hold < cfg.sampler.steps:
        raise ConfigError(f"config key 'objective.pool_hold': 0 to sampler.steps - 1 = {cfg.sampler.steps - 1} steps held "
                          f"to the base, got {o.pool_hold}")
    if o.unbiased_window and o.kl_grad == "all":
        raise ConfigError("config keys 'objective.unbiased_window' and 'objective.kl_grad=all': the first reweights the "
                          "window's whole gradient, the second gives the steps before the window their KL's gradient "
                          "already; set one of them")
    if o.kl_log_steps is not None and o.kl_log_steps < 1:
        raise ConfigError(f"config key 'objective.kl_log_steps': must be >= 1 (or null for every step), got {o.kl_log_steps}")
    ignored = [k for k in ("window_min", "window_max", "unbiased_window", "kl_grad", "kl_log_steps", "path_gradient")
               if getattr(o, k) != getattr(ObjectiveConfig(), k)]
    if o.estimator != "pathwise" and ignored:
        raise ConfigError(f"config keys {', '.join(f'objective.{k}' for k in ignored)}: only for the pathwise estimator; "
                          f"objective.estimator={o.estimator} draws its own steps across the chain")
    g = cfg.optim.group_size
    if g is not None and (g < 1 or cfg.optim.batch_size % g):
        raise ConfigError(f"config key 'optim.group_size': must be >= 1 and divide optim.batch_size ({cfg.optim.batch_size}), got {g}")
    if cfg.logging.kl_alarm is not None and cfg.logging.kl_alarm <= 0:
        raise ConfigError(f"config key 'logging.kl_alarm': a bound in nats > 0 (or null), got {cfg.logging.kl_alarm}")
    if cfg.prompts.file is not None and not os.path.isfile(cfg.prompts.file):
        raise ConfigError(f"config key 'prompts.file': no such file: {cfg.prompts.file}")


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
