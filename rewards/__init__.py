"""Rewards: one protocol, a registry third parties plug into, and built-ins.

Protocol: `reward(images, prompts) -> Tensor[B]`, images a float tensor [B, 3, H, W] in [0, 1] (any H, W),
prompts a list of B strings. A reward says whether gradients flow through it (`differentiable`).
"""

from .registry import (Reward, RewardBuildError, WeightedSum, check_reward_output, list_rewards, load_reward,
                       non_finite_message, register_reward)
from . import simple  # noqa: F401  (registers the weight-free built-ins)
from . import clip, digit, jpeg, pickscore  # noqa: F401  (register the model-based built-ins; heavy imports happen on construction)

__all__ = ["Reward", "RewardBuildError", "WeightedSum", "check_reward_output", "list_rewards", "load_reward", "non_finite_message", "register_reward"]
