"""What an estimator spends: model calls (forward and backward, in samples) and reward queries, counted by wrapping
the denoisers and the reward a `Task` is built from. For benchmarks: `python benchmarks/tilted_gmm.py` prints them."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Costs:
    forward: dict[str, int] = field(default_factory=dict)  # samples through each model, forward
    backward: dict[str, int] = field(default_factory=dict)  # samples back through it (a VJP or a parameter gradient)

    def count(self, name: str, fn):
        """`fn` (a denoiser `(x, t) -> prediction` or a reward `x -> [B]`) with its calls counted under `name`."""

        def counted(*args):
            out = fn(*args)
            n = args[0].shape[0]
            self.forward[name] = self.forward.get(name, 0) + n
            if isinstance(out, Tensor) and out.requires_grad:
                out.register_hook(lambda grad: self._backward(name, n))
            return out

        return counted

    def _backward(self, name: str, n: int) -> None:
        self.backward[name] = self.backward.get(name, 0) + n

    def per(self, samples: int) -> dict[str, float]:
        """Calls per sampled path: {'policy_fwd': …, 'policy_bwd': …, 'base_fwd': …, 'reward_fwd': …, …}."""
        out = {f"{k}_fwd": v / samples for k, v in self.forward.items()}
        out.update({f"{k}_bwd": v / samples for k, v in self.backward.items()})
        return out


