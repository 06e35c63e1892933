"""Pathwise: reparameterised backprop of alpha · Σ_k KL_k − R through the last K controlled steps (the window).

K is drawn per batch (`draw_window`: fixed, or uniform in [K_min, K_max]) from the shared stream, so every process
does the same work. Inside the window the gradient flows through the states into both the policy and the base
prediction; steps before it run without a graph (with `kl_grad="all"` their KL terms get a local backward each; with
"window" their KL serves only the log, so the base scores `kl_log_steps` of them, stratified and reweighted: an unbiased
estimate of the path KL and objective, and `kl_steps` in the log says how many steps it rests on).
E[grad] = Σ_j p_j g_j with p_j = P(step j inside the window): j/n for K ~ U[1, n] (DESIGN.md, "Random window"), so
the early steps weigh less than in the full chain's gradient. `unbiased_window` scales each window step's parameter
gradient by 1/p_j (`rollout.window_inclusion`; the gradient passed back along the states unchanged): E[grad] = Σ_j g_j,
the full chain's, at the random window's cost, with more variance from the rarely drawn early steps.
With checkpointing the window calls its base in the backward only (`rollout(base_in_backward=True)`): one model call
less a step, the same gradient; the window's KL is then made by `backward()` (`Estimate.late`: checked after it). Given
the adapter's weights (from `Task.module`), the first pass calls the policy without a graph and the backward makes its
calls (`rollout._InBackward`): with paired calls (`Task.both`) the policy's recompute and the base's call as one.

path_gradient: what the window's KL part differentiates. "kl": Σ_k KL_k (the Gaussian KL of each step, through the
states and the predictions). "stl" (sticking the landing, Roeder et al. 2017): Σ_k log q_θ̄(x_{k+1}|x_k) − log
p_base(x_{k+1}|x_k) with the policy's weights θ̄ held fixed (`rollout.path_term`; one more model call a window step):
the same expected gradient, whose every path's gradient vanishes at the optimum (alpha·log-ratio − R is constant
there), so its noise shrinks as the control nears the optimum instead of staying at the KL's (on digits: half the KL's
mid-run, level with it where training stalls; benchmarks/README.md, "Why the digits default overpays KL").
"""

from __future__ import annotations

from ..objective import soc_loss
from ..rollout import WindowSpec, draw_window, rollout, window_inclusion
from . import Estimate, Task


PATH_GRADIENTS = ("kl", "stl")


class Pathwise:
    name = "pathwise"

    def __init__(self, window: WindowSpec = None, checkpoint: bool = False, kl_grad: str = "window",
                 kl_log_steps: int | None = None, path_gradient: str = "kl", unbiased_window: bool = False):
        if path_gradient not in PATH_GRADIENTS:
            raise ValueError(f"objective.path_gradient {path_gradient!r}: one of {PATH_GRADIENTS}")
        self.window, self.checkpoint, self.kl_grad, self.kl_log_steps = window, checkpoint, kl_grad, kl_log_steps
        self.path_gradient, self.unbiased_window = path_gradient, unbiased_window

    def __call__(self, task: Task) -> Estimate:
        k_window = draw_window(self.window, len(task.controlled), task.shared)
        frozen = None
        if self.path_gradient == "stl":
            if task.frozen is None:
                raise ValueError("objective.path_gradient=stl needs the policy with its weights held fixed (Task.frozen: "
                                 "control.frozen_denoiser)")
            frozen = task.frozen
        kl_backward = None
        if self.kl_grad == "all":  # the steps before the window: one local backward each, reduced with the window's
            kl_backward = lambda kl: task.backward(task.alpha * kl.mean())  # noqa: E731
        out = rollout(task.policy, task.base, task.schedule, task.x0, window=k_window, generator=task.generator,
                      checkpoint=self.checkpoint, kl_backward=kl_backward, local=task.local, kl_sample=self.kl_log_steps,
                      both=task.both, frozen=frozen, base_in_backward=True, params=self._weights(task),
                      inclusion=window_inclusion(self.window, len(task.controlled)) if self.unbiased_window else None)
        r = task.reward(out.x)
        parts = soc_loss(r, out.kl if frozen is None else out.path_terms, task.alpha, out.window)

        def backward():
            task.backward(parts.loss)
            if out.pending:  # the window's KL came with the backward: the loss's value is the batch's objective now
                return (task.alpha * out.kl.detach().sum(1) - r.detach().float()).mean()
            return parts.loss.detach()

        return Estimate(r.detach(), out.kl.detach(), out.log_ratio, task.alpha, out.window, backward, checks=(parts.loss,),
                        extra={"kl_steps": float(out.kl_steps)}, late=out.pending > 0)

    @staticmethod
    def _weights(task: Task) -> tuple:
        """The adapter's weights, for a checkpointed window's `rollout._InBackward` (`rollout(params=...)`); () without
        a module, where torch's checkpoint recomputes the policy."""
        return () if task.module is None else tuple(p for p in task.module.parameters() if p.requires_grad)
