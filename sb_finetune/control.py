"""The control: a LoRA adapter on the denoiser (peft), and the base process as the same module with it off."""

from __future__ import annotations

import contextlib
import math
import types
from typing import Iterator

import torch

from .rollout import Denoiser, PairedDenoiser

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora_control(
    module: torch.nn.Module,
    rank: int = 4,
    lora_alpha: float | None = None,
    target_modules: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
    init: str | bool = "gaussian",
) -> list[torch.nn.Parameter]:
    """Freeze `module`, attach a LoRA adapter (the control drift), return the trainable LoRA parameters.

    init: peft's `init_lora_weights` ("gaussian", True for zero-B, ...); every peft init leaves the
    adapter's output at zero, so training starts at the base process (KL = 0).
    """
    from peft import LoraConfig

    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=lora_alpha if lora_alpha is not None else rank,
                        target_modules=list(target_modules), init_lora_weights=init)
    attach_adapter(module, config)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no LoRA parameters: none of target_modules={list(target_modules)} is in {type(module).__name__}")
    for p in params:  # the optimizer's copy stays fp32 whatever the model's dtype
        p.data = p.data.float()
    return params


def attach_adapter(module: torch.nn.Module, config) -> None:
    """diffusers' `add_adapter` where the model has it; else (UNet2DModel) peft's injection, with the config
    kept in `module.peft_config` as diffusers keeps it."""
    if hasattr(module, "add_adapter"):
        module.add_adapter(config)
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, module, adapter_name="default")
    module.peft_config = {"default": config}


def use_merged_forward(module: torch.nn.Module, on: bool = True) -> int:
    """Make each LoRA Linear/Conv layer of `module` compute y = layer(x; W + s·BA), one GEMM or convolution with the
    merged weight, instead of peft's W x + s·B(A x): the same values and gradients (to float rounding), fewer and
    larger calls. On 2 CPU cores it takes 6–16 % off a digits training step (benchmarks/README.md, "The merged
    LoRA forward"): peft's convolution to r channels and back is slow there. The weights stay as they are (the adapter
    file is unchanged) and each call falls back to peft's own forward wherever the merge would not be the same
    layer: the adapter disabled or merged, several adapters active, DoRA, dropout, a LoRA bias, half-precision weights
    or inputs, autocast (its bf16 copy of W + s·BA would round the small s·BA away), a convolution with groups,
    dilation or a padding mode other than zeros, or a hook on the layer's parts (`frozen_denoiser`'s, a user's).
    `paired_denoiser`'s mask it applies itself: the paired copies' rows split, W + s·BA on the policy's, W on the
    base's (~2–3 % off a paired call's forward and backward on the tiny SD kit, `merged_forward.py --paired`). Returns
    the number of layers switched. Not for a compute-bound accelerator: with a gradient, the merged weight's backward
    adds one weight-sized GEMM a layer that peft's rank-r path does not make. on=False gives every layer peft's own
    forward back."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import _ConvNd as LoraConv

    switched = 0
    for layer in _tuner_layers(getattr(module, "module", module)):
        layer.__dict__.pop("forward", None)  # the class's: peft's
        base = layer.get_base_layer()
        linear = isinstance(layer, LoraLinear) and type(base) is torch.nn.Linear and not layer.fan_in_fan_out
        conv = (isinstance(layer, LoraConv) and type(base) in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
                and base.groups == 1 and base.padding_mode == "zeros" and set(base.dilation) == {1})
        if on and (linear or conv) and base.weight.dtype == torch.float32:
            layer.forward = types.MethodType(_merged_forward, layer)
            switched += 1
    return switched


def _merged_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`use_merged_forward`'s forward of one peft LoRA layer: base(x; W + s·BA), else peft's own."""
    base = layer.get_base_layer()
    delta = None if args or kwargs else _merged_delta(layer, base, x)
    if delta is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    weight = base.weight + delta
    call = ((lambda v, w: torch.nn.functional.linear(v, w, base.bias)) if isinstance(base, torch.nn.Linear)
            else (lambda v, w: base._conv_forward(v, w, base.bias)))
    b = _paired_rows(layer.lora_B[layer.active_adapters[0]])
    if b is None:
        return call(x, weight)
    # `paired_denoiser`'s call: rows in copies of b, the adapter's on the even copies, the base's W alone on the odd
    _check_paired_rows(x.shape[0], b, type(layer).__name__)
    copies = x.unflatten(0, (x.shape[0] // (2 * b), 2, b))
    policy, plain = (call(copies[:, i].flatten(0, 1), w).unflatten(0, (-1, b)) for i, w in ((0, weight), (1, base.weight)))
    return torch.stack([policy, plain], 1).flatten(0, 2)


def _merged_delta(layer, base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """s·BA in the base weight's shape for the one active adapter, or None where the merge would not be peft's layer
    (`paired_denoiser`'s mask on B is no obstacle: the merged forward applies it itself)."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    a, b = layer.lora_A[name], layer.lora_B[name]
    if (x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type) or b.bias is not None
            or any(m._forward_hooks or m._forward_pre_hooks for m in (base, a)) or b._forward_pre_hooks
            or (b._forward_hooks and _paired_rows(b) is None)):
        return None
    if isinstance(base, torch.nn.Linear):
        return (b.weight @ a.weight) * layer.scaling[name]
    if (a.weight.shape[2:] != base.weight.shape[2:] or a.stride != base.stride or a.padding != base.padding
            or set(a.dilation) != {1} or set(b.weight.shape[2:]) != {1} or set(b.stride) != {1}):
        return None
    return (b.weight.flatten(1) @ a.weight.flatten(1)).view_as(base.weight) * layer.scaling[name]


def has_adapter(module: torch.nn.Module) -> bool:
    return bool(_tuner_layers(getattr(module, "module", module)))


def control_is_zero(module: torch.nn.Module) -> bool:
    """True where every active LoRA update of `module` is exactly zero (its B or its A all zeros, as every peft init
    leaves a new adapter): the policy's predictions are then the base's, bit for bit. False for anything else, and for
    layers it cannot read (DoRA, embeddings, a merged adapter): the caller then treats the control as nonzero."""
    layers = _tuner_layers(getattr(module, "module", module))
    for layer in layers:
        if getattr(layer, "merged", False) or any(getattr(layer, "use_dora", {}).values()) \
                or getattr(layer, "lora_embedding_A", None):
            return False
        lora_a, lora_b = getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {})
        for name in layer.active_adapters:
            if name not in lora_a or name not in lora_b:
                return False
            if not (bool((lora_a[name].weight == 0).all()) or bool((lora_b[name].weight == 0).all())):
                return False
    return bool(layers)


def _tuner_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def adapter_disabled(module: torch.nn.Module):
    """The base process: the same module, adapter off (its frozen weights; no second copy). On exit each
    layer returns to the state it had (a user's `disable_lora()` stays in force)."""
    return _layers_disabled(_tuner_layers(getattr(module, "module", module)))


@contextlib.contextmanager
def _layers_disabled(layers: list) -> Iterator[None]:
    was_disabled = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, disabled in zip(layers, was_disabled):
            m.enable_adapters(not disabled)


def base_denoiser(policy: Denoiser, module: torch.nn.Module) -> Denoiser:
    """The base prediction: `policy`'s own call with `module`'s adapter disabled. The adapter's layers are
    found once here, not on every call (a module walk per sampling step)."""
    layers = _tuner_layers(getattr(module, "module", module))

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with _layers_disabled(layers):
            return policy(x, t)

    return predict


def paired_denoiser(denoiser: Denoiser, module: torch.nn.Module) -> PairedDenoiser | None:
    """The policy's and the base's predictions at one state in ONE call of `module`: `denoiser` is the family's, bound
    to the conditioning twice over (`Conditioning.repeat(2)`) on the module the policy calls (DDP-wrapped in training);
    it sees [x; x], and the adapter's output is masked off on the second copy (every LoRA layer's B output times a
    per-row 0/1; a layer under `use_merged_forward` splits the rows instead, W + s·BA on the first copy, W on the
    second), so that copy is the base's prediction exactly and carries no gradient to the adapter. One batch of 2B
    instead of two of B: the same arithmetic, less time on models whose calls are not compute-bound.

    Rows are matched by position, so each LoRA layer must see the batch first, in whole copies of it (classifier-free
    guidance's [uncond; cond] is two copies): true of diffusers' UNets and transformers, whose projections and convs
    see [B, ...]. None where masking B's output would not give the base: an adapter merged into the weights, DoRA, or
    layers without a `lora_B` module (embeddings) — the caller then makes two calls."""
    layers = _tuner_layers(getattr(module, "module", module))
    outputs = []
    for layer in layers:
        lora_b = getattr(layer, "lora_B", None)
        if not lora_b or getattr(layer, "merged", False) or any(getattr(layer, "use_dora", {}).values()):
            return None
        outputs.extend(lora_b.values())

    def predict(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _second_copy_masked(outputs, x.shape[0]):
            policy, base = denoiser(torch.cat([x, x]), t).chunk(2)
        return policy, base

    return predict


def frozen_denoiser(denoiser: Denoiser, module: torch.nn.Module) -> Denoiser:
    """The policy's prediction with the adapter's weights held fixed: the same value, a gradient that reaches the
    input x but not the adapter (∂μ_θ/∂x at θ frozen). The pathwise estimator's sticking-the-landing term needs it
    (`objective.path_gradient=stl`): log q_θ(x_{k+1} | x_k) differentiated in the path only. Every LoRA layer's A and
    B recompute their (small) output from detached weights. Raises where a layer is not a Linear or Conv."""
    layers = _tuner_layers(getattr(module, "module", module))
    parts = [m for layer in layers for d in (getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {})) for m in d.values()]
    if not parts or any(getattr(layer, "lora_embedding_A", None) or any(getattr(layer, "use_dora", {}).values())
                        for layer in layers):
        raise ValueError("the sticking-the-landing gradient needs a LoRA adapter of Linear/Conv layers (no DoRA, no "
                         "embedding layers): use objective.path_gradient=kl")

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with _weights_detached(parts):
            return denoiser(x, t)

    return predict


def _weights_detached(parts: list[torch.nn.Module]):
    """Inside: each Linear/Conv in `parts` returns its output computed from its weights detached."""

    def hook(mod, args, out):
        w = mod.weight.detach()
        b = None if mod.bias is None else mod.bias.detach()
        if isinstance(mod, torch.nn.Linear):
            return torch.nn.functional.linear(args[0], w, b)
        if isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            return mod._conv_forward(args[0], w, b)
        raise TypeError(f"frozen_denoiser: a LoRA part of type {type(mod).__name__} (Linear or Conv expected)")

    return _forward_hooks(parts, hook)


def _second_copy_masked(outputs: list[torch.nn.Module], b: int):
    """Inside: each module in `outputs` zeroes its output on the rows of every second copy of a batch of `b`
    (rows i with ⌊i / b⌋ odd)."""

    def hook(mod, args, out):
        rows = out.shape[0]
        _check_paired_rows(rows, b, type(mod).__name__)
        keep = (torch.arange(rows, device=out.device) // b) % 2 == 0
        return out * keep.view(rows, *([1] * (out.dim() - 1))).to(out.dtype)

    hook.paired_rows = b  # the merged forward (`_merged_forward`) reads it and splits the rows itself
    return _forward_hooks(outputs, hook)


def _paired_rows(lora_b: torch.nn.Module) -> int | None:
    """b where `lora_b`'s one forward hook is `_second_copy_masked`'s for a paired batch of b; else None."""
    hooks = list(lora_b._forward_hooks.values())
    return getattr(hooks[0], "paired_rows", None) if len(hooks) == 1 else None


def _check_paired_rows(rows: int, b: int, layer: str) -> None:
    if rows % (2 * b):
        raise RuntimeError(f"a LoRA layer saw {rows} rows where whole copies of the paired batch ({2 * b} rows) "
                           f"were expected: {layer} does not see the batch first")


@contextlib.contextmanager
def _forward_hooks(modules: list[torch.nn.Module], hook) -> Iterator[None]:
    """Inside: `hook` is a forward hook of every module in `modules` (its return value replaces the output)."""
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def lora_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' key names (no `module.` prefixes), as `load_lora_weights` reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    module = getattr(module, "module", module)  # unwrap DDP
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))


ADAPTER_FILE = "pytorch_lora_weights.safetensors"
META_FILE = "sb_finetune.json"


def save_lora_control(pipe, module: torch.nn.Module, out_dir: str, metadata: dict) -> None:
    """Write the adapter in diffusers' LoRA format (+ peft config metadata, so lora_alpha survives),
    and `sb_finetune.json` with what a loader needs (base model, family, sampler, alpha, reward, version)."""
    import json
    import os

    from . import __version__
    from .families import family_of

    module = getattr(module, "module", module)
    os.makedirs(out_dir, exist_ok=True)
    family = family_of(pipe, metadata.get("family", "auto"))
    family.save_adapter(out_dir, lora_state_dict(module), module.peft_config["default"].to_dict())
    meta = {**metadata, "sb_finetune_version": __version__}
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    from .hub import write_model_card

    write_model_card(out_dir, meta)


def load_lora_control(module: torch.nn.Module, folder: str) -> None:
    """Load the weights of a saved adapter (`save_lora_control`'s file, diffusers' LoRA format) into `module`'s attached
    adapter. It must fit exactly, module for module and shape for shape; otherwise a ValueError names the folder and
    the first differences (a rank, a module the file lacks or has in excess), and the module is left as it was."""
    import os

    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    module = getattr(module, "module", module)
    path = os.path.join(folder, ADAPTER_FILE)
    saved = load_file(path)
    state = convert_unet_state_dict_to_peft({k.split(".", 1)[1]: v for k, v in saved.items()})  # drop "unet."/"transformer."
    own = get_peft_model_state_dict(module)
    extra, missing = sorted(set(state) - set(own)), sorted(set(own) - set(state))
    shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} here" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    config, theirs = module.peft_config["default"], saved_lora_config(path)
    if theirs.get("r") and theirs.get("lora_alpha") is not None:
        scale, own_scale = theirs["lora_alpha"] / theirs["r"], config.lora_alpha / config.r
        if not math.isclose(scale, own_scale, rel_tol=1e-6):
            shapes.append(f"scale lora_alpha / r: {scale:g} in the file, {own_scale:g} here (control.lora_alpha)")
    if extra or missing or shapes:
        said = [f"modules the file has and this adapter lacks: {extra[:3]}" if extra else "",
                f"modules this adapter has and the file lacks: {missing[:3]}" if missing else "",
                f"shapes or scale differ: {shapes[:2]}" if shapes else ""]
        raise ValueError(f"the adapter in '{folder}' does not fit this model's: " + "; ".join(x for x in said if x) +
                         " (an adapter loads only into one of the same rank, target modules and scale: control.rank, "
                         "control.target_modules, control.lora_alpha)")
    set_peft_model_state_dict(module, state, adapter_name="default")


def saved_lora_config(path: str) -> dict:
    """The peft config a LoRA file carries in its safetensors header (ours: {"unet": {...}}; diffusers' stock writer:
    {"unet.r": ..., "unet.lora_alpha": ...}), as one flat dict; {} when it carries none."""
    import json

    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    meta = json.loads(raw)
    nested = next((v for v in meta.values() if isinstance(v, dict) and "r" in v), None)
    return nested or {k.split(".")[-1]: v for k, v in meta.items()}


def jsonable(d: dict) -> dict:
    import json

    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
