"""The minibatch noise of a sampled step's gradient, from the gradients it was summed from.

The same-batch work <g_t, d_t> is biased by the noise of g_t, because the update d_t responds to
it (docs/science.md section 2). Its size needs the noise's variance, which a step shows wherever its
gradient is a sum of independent parts: the micro-batches of gradient accumulation (one
`backward()` each) and the data-parallel ranks (each rank's own gradient before DDP averages
them). A `Spread`, armed for a sampled step only, registers a hook on every watched parameter
tensor; each backward hands it the gradient of that backward alone, before DDP's all-reduce and
before it is added to `.grad`: the hook keeps, on the step's work coordinates, the sum S1 and the
sum of squares S2 of these contributions and their number K. Nothing is modified.

At the optimizer step the gradient G the optimizer sees is u times the mean over the R replicas
of their sums S1 (u: the unscaling of a GradScaler times a clip factor; the clip factor is known,
`clip.ClipWatch`, the unscaling is one number for the step, `unscale`). With contributions of
per-value variance s^2 (in S1's units), Var(S1) = K s^2 and Var(G) = u^2 K s^2 / R. K s^2 is
estimated from this rank's micro-batches, K (S2 - S1^2 / K) / (K - 1) (K - 1 degrees of
freedom), and from its deviation from the replicas' mean, (S1 - G / u)^2 R / (R - 1) (one),
pooled by their degrees of freedom.
With neither (one rank, one backward), there is no spread: `variance` returns None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: Where a layer's work coordinates are (`Coordinates.take` bound to this step's blocks).
Take = Callable[[torch.Tensor, int], torch.Tensor]


class Spread:
    """Per-backward gradient contributions on the work coordinates, between `arm` and `disarm`."""

    def __init__(self, params: Sequence[torch.Tensor], watched: Sequence[int], replicas: int = 1) -> None:
        """`watched`: the layers whose contributions are taken (a sharded layer's are not: its
        gradient is reduce-scattered, not averaged); `replicas`: R, the data-parallel replicas
        whose gradients DDP averages into each one's `.grad`."""
        self._params = list(params)
        self._watched = list(watched)
        self.replicas = max(1, replicas)
        self._handles: list = []
        self._take: Take | None = None
        self.paused = False  # while a closure computes a gradient that is not the step's
        self._s1: dict[int, torch.Tensor] = {}
        self._s2: dict[int, torch.Tensor] = {}
        self._count: dict[int, int] = {}

    def arm(self, take: Take) -> None:
        """Hook every watched tensor for the coming step, reading its contributions with `take`."""
        self.disarm()
        self._take = take
        self._s1, self._s2, self._count = {}, {}, {}
        for i in self._watched:
            p = self._params[i]
            if p.requires_grad:
                self._handles.append(p.register_hook(self._hook(i)))

    def disarm(self) -> None:
        """Remove the hooks; what they kept stays readable until the next `arm`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def note(grad: torch.Tensor) -> None:
            if self.paused or self._take is None:
                return
            with torch.no_grad():
                x = self._take(grad.detach().reshape(-1), i).double()
                if i in self._s1:
                    self._s1[i] += x
                    self._s2[i] += x * x
                    self._count[i] += 1
                else:
                    self._s1[i], self._s2[i], self._count[i] = x.clone(), x * x, 1

        return note

    def unscale(self, grads: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """The factor from the contributions' units to the loss's gradient, one for the step (a
        GradScaler's 1/scale; 1 without one): u = sum <g, g> / sum <g, S1> over the layers of
        `grads` (layer -> the step's gradient on its work coordinates, any clip undone; 0 where that
        is not positive), None where no layer shows a contribution. Exact on one rank; over ranks a
        rank's own noise enters <g, S1>, and one layer's u, squared in the variance, blew up where a
        small layer's noise outweighed its gradient: pooled over every layer it does not (a
        stationary narrow Qwen2 on two ranks under AdamW summed its work to +0.060 where the truth
        was -0.0002; now -0.0046)."""
        shown = [i for i in grads if i in self._s1]
        if not shown:
            return None
        num = torch.stack([torch.dot(grads[i], grads[i]) for i in shown]).sum()
        den = torch.stack([torch.dot(grads[i], self._s1[i]) for i in shown]).sum()
        return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)

    def variance(self, i: int, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
        """Per value on layer i's work coordinates, the variance of the step's gradient `g` (taken
        there, in float64) from its minibatch noise, `u` the factor from the contributions' units to
        g's (`unscale` times the layer's clip factor); None where the step shows no spread."""
        k = self._count.get(i, 0)
        r = self.replicas
        if k == 0 or (k < 2 and r < 2):
            return None
        s1, s2 = self._s1[i], self._s2[i]
        pooled = torch.zeros_like(s1)
        dof = 0
        if k >= 2:
            pooled = pooled + (s2 - s1 * s1 / k) * k  # (k - 1) dof times the estimate k s^2
            dof += k - 1
        if r >= 2:
            mean = torch.where(u > 0, g / torch.where(u > 0, u, 1.0), 0.0)
            pooled = pooled + (s1 - mean) ** 2 * r / (r - 1)
            dof += 1
        return (u * u) * pooled / (dof * r)
