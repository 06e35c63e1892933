"""The built-in default's reward: log p(y = target | x) under the shipped digit classifier (sb_finetune.digits).

With alpha = 1 the SOC optimum p_base(x) · p(y | x) / Z is exactly the class-conditional p_base(x | y): the
fine-tuned model should draw the target digit with the diversity the base model has for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Reward, register_reward
from .weights import load_into, load_state_dict


@register_reward("digit")
class Digit(Reward):
    """kwargs: target (0–9), checkpoint (a classifier .safetensors; default the shipped one), decision: c > 0 makes
    the reward the classifier's decision, c · 1[argmax = target] (a step function: not differentiable; for the
    reward-only estimators)."""

    def __init__(self, target: int = 0, checkpoint: str | None = None, decision: float = 0.0):
        super().__init__()
        from sb_finetune.digits import CLASSIFIER_FILE, SIZE, DigitClassifier

        if not 0 <= int(target) <= 9:
            raise ValueError(f"reward 'digit': target must be a digit 0–9, got {target!r}")
        self.target, self.size, self.decision = int(target), SIZE, float(decision)
        self.differentiable = self.decision == 0
        path = checkpoint or CLASSIFIER_FILE
        self.classifier = DigitClassifier().eval().requires_grad_(False)
        load_into(self.classifier, load_state_dict(path), path)

    def _prepare(self, images: Tensor) -> Tensor:
        """RGB in [0, 1], any size → the classifier's 16×16 gray in [-1, 1] (differentiable)."""
        gray = images.float().mean(dim=1, keepdim=True)
        if gray.shape[-2:] != (self.size, self.size):
            gray = F.interpolate(gray, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return gray * 2 - 1

    def logits(self, images: Tensor) -> Tensor:
        return self.classifier(self._prepare(images))

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        logits = self.logits(images)
        if self.decision:
            return self.decision * (logits.argmax(1) == self.target).float()
        return F.log_softmax(logits, dim=-1)[:, self.target]

    @torch.no_grad()
    def metrics(self, images: Tensor, weights: Tensor | None = None) -> dict[str, float]:
        """target_fraction (share the classifier assigns to the target), and the diversity of those samples —
        mean pairwise distance of classifier features — beside the same for real images of the class.

        weights: importance weights of the samples (sum 1), e.g. base samples reweighted to the tilted optimum;
        then only the weighted target_fraction (a weighted diversity is not defined here)."""
        hit = (self.logits(images).argmax(1) == self.target).float()
        if weights is not None:
            return {"target_fraction": float((weights.to(hit) * hit).sum())}
        return {"target_fraction": float(hit.mean()), "diversity": self._spread(images[hit.bool()]) if hit.sum() > 1 else 0.0,
                "diversity_real": self._spread(self._real_images().to(images.device))}

    def _real_images(self) -> Tensor:
        """The target class's real digits, RGB in [0, 1] (loaded once)."""
        if not hasattr(self, "_real"):
            from sb_finetune.digits import load_digits_tensor

            x, y = load_digits_tensor()
            self._real = ((x[y == self.target] + 1) / 2).expand(-1, 3, -1, -1)
        return self._real

    def _spread(self, images: Tensor) -> float:
        return float(torch.pdist(self.classifier.features(self._prepare(images))).mean())
