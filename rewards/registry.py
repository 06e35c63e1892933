"""The reward registry: a name, an import path "pkg.module:factory", or an entry point in `sb_finetune.rewards`."""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from typing import Any, Callable

import torch
from torch import Tensor

from sb_finetune.config import first_line

ENTRY_POINT_GROUP = "sb_finetune.rewards"
_REGISTRY: dict[str, Callable[..., "Reward"]] = {}


class Reward(torch.nn.Module):
    """Base class: subclass and implement `forward(images, prompts) -> [B]`; set `differentiable`."""

    differentiable: bool = True
    name: str = "reward"


class _FunctionReward(Reward):
    def __init__(self, fn: Callable[[Tensor, list[str]], Tensor], name: str, differentiable: bool):
        super().__init__()
        self.fn, self.name, self.differentiable = fn, name, differentiable

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.fn(images, prompts)


def register_reward(name: str, differentiable: bool | None = None):
    """Decorator: register a Reward subclass, a factory returning one, or a plain `fn(images, prompts)`."""

    def wrap(obj):
        _REGISTRY[name] = _as_factory(obj, name, differentiable)
        return obj

    return wrap


def _as_factory(obj, name: str, differentiable: bool | None) -> Callable[..., Reward]:
    """A class or a zero-argument factory is called (with the kwargs); a plain `fn(images, prompts)` is wrapped."""

    def factory(**kwargs):
        made = obj(**kwargs) if kwargs or isinstance(obj, type) or _is_factory(obj) else obj
        if isinstance(made, torch.nn.Module):
            if getattr(made, "name", "reward") == "reward":
                made.name = name
            return made
        return _FunctionReward(made, name, True if differentiable is None else differentiable)

    return factory


def _is_factory(obj) -> bool:
    import inspect

    try:
        params = [p for p in inspect.signature(obj).parameters.values() if p.default is inspect.Parameter.empty
                  and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) == 0


def list_rewards() -> list[str]:
    names = set(_REGISTRY)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


class RewardBuildError(ValueError):
    """A reward's factory refused its arguments or failed while building: one line that names the reward."""


def _build(make: Callable[[], Reward], spec: str, kwargs: dict[str, Any]) -> Reward:
    """`make()`, with any failure said as one line naming the reward (and the argument, where one was wrong)."""
    try:
        return make()
    except RewardBuildError:
        raise
    except TypeError as err:
        said = str(err)
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", said)
        missing = re.search(r"missing \d+ required (?:\w+[ -])?arguments?: (.+)$", said)
        if unexpected:
            raise RewardBuildError(f"reward '{spec}' does not take '{unexpected.group(1)}' "
                                   f"(reward.kwargs: {kwargs})") from None
        if missing:
            raise RewardBuildError(f"reward '{spec}' needs {missing.group(1)}: set reward.kwargs.NAME=VALUE") from None
        raise RewardBuildError(f"reward '{spec}' could not be built with reward.kwargs {kwargs}: {first_line(err)}") from None
    except Exception as err:  # the constructor's own failure (a missing file, a download, a bad value)
        said = first_line(err)
        if f"reward '{spec}'" in said:  # already one line naming the reward (the built-ins' own errors)
            raise
        if isinstance(err, FileNotFoundError):  # stays one: callers tell a missing file from a wrong argument
            raise FileNotFoundError(f"reward '{spec}': {said}") from None
        raise RewardBuildError(f"reward '{spec}' failed to build: {type(err).__name__}: {said}") from None


def load_reward(spec: str, **kwargs: Any) -> Reward:
    """A reward by registered name, "package.module:factory" import path, entry-point name, or the URL of a reward
    server (http://host:port/score: `sb_finetune.rewards.server`). Any failure to build it is a `RewardBuildError`:
    one line naming the reward."""
    if spec in _REGISTRY:
        return _build(lambda: _REGISTRY[spec](**kwargs), spec, kwargs)
    if spec.startswith(("http://", "https://")):
        from .http import HTTPReward

        return _build(lambda: HTTPReward(spec, **kwargs), spec, kwargs)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward '{spec}': cannot import it ({err})") from None
        return _build(lambda: _as_factory(obj, spec, None)(**kwargs), spec, kwargs)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            return _build(lambda: _as_factory(ep.load(), spec, None)(**kwargs), spec, kwargs)
    raise ValueError(f"unknown reward '{spec}': registered are {list_rewards()}; or give 'package.module:factory'")


class WeightedSum(Reward):
    """Σ_i w_i R_i; `last_terms` keeps each term's batch mean for logging."""

    def __init__(self, terms: dict[str, tuple[float, Reward]]):
        super().__init__()
        self.weights = {k: w for k, (w, _) in terms.items()}
        self.terms = torch.nn.ModuleDict({k.replace(".", "_"): r for k, (_, r) in terms.items()})
        self.keys = list(terms)
        self.differentiable = all(r.differentiable for _, r in terms.values())
        self.name = "+".join(f"{w:g}*{k}" for k, (w, _) in terms.items())
        self.last_terms: dict[str, float] = {}

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        total = 0.0
        for key in self.keys:
            r = check_reward_output(self.terms[key.replace(".", "_")](images, prompts), key, images.shape[0])
            self.last_terms[key] = float(r.detach().mean())
            total = total + self.weights[key] * r
        return total


def check_reward_output(value: Any, name: str, batch: int) -> Tensor:
    """The reward returned a finite float tensor [B]; else a ValueError naming the reward and what it returned."""
    if not isinstance(value, Tensor):
        raise ValueError(f"reward '{name}' returned {type(value).__name__}, expected a float tensor of shape [{batch}]")
    if tuple(value.shape) != (batch,):
        raise ValueError(f"reward '{name}' returned shape {tuple(value.shape)}, expected [{batch}] (one value per image)")
    if not value.is_floating_point():
        raise ValueError(f"reward '{name}' returned dtype {value.dtype}, expected a float tensor")
    return value


def non_finite_message(value: Tensor, name: str, reason: str | None = None) -> str | None:
    """None if every reward value is finite; else a sentence naming the reward and what it returned (or `reason`,
    the reward's own account of it, e.g. a reward server that did not answer)."""
    bad = ~torch.isfinite(value.detach())
    if not bool(bad.any()):
        return None
    if reason:
        return reason
    shown = ", ".join(f"{v:g}" for v in value.detach().flatten()[:4].tolist())
    return f"reward '{name}' returned non-finite values for {int(bad.sum())} of {value.numel()} images ([{shown}{', …' if value.numel() > 4 else ''}])"
