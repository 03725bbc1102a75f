"""How an optimizer's update responds to its gradient: the diagonal of J = d(Delta theta)/dg.

The noise bias of the same-batch work is E<xi, Delta theta> = sum_i J_ii Var(g_i) to leading
order (docs/science.md section 2), so the sampler needs J where the optimizer is known. Read after
the optimizer's step, from its hyperparameters and state, per value on the work coordinates:

* SGD: buf = mu buf + (1 - dampening) g, Delta theta = -lr buf (Nesterov: -lr (g + mu buf)), so
  J = -lr (1 - dampening), or -lr (1 + mu (1 - dampening)) with Nesterov (-lr without momentum);
* Adam and AdamW: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, Delta theta = -lr m^ / (sqrt(v^) + eps)
  with m^ = m / (1 - b1^t), v^ = v / (1 - b2^t), so
  J = -lr / (sqrt(v^) + eps) * ((1 - b1) / (1 - b1^t) - m^ (1 - b2) g / ((1 - b2^t) r (r + eps))),
  r = sqrt(v^)
  (the second term is Adam's normalization reacting to g: it makes J vanish on Adam's first step,
  a sign step). Weight decay does not depend on g; AMSGrad's running maximum is read as v.

Any other optimizer (or `maximize`): None, and the sampler leaves the same-batch work uncorrected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: A layer's values on the work coordinates (flat float64).
Take = Callable[[torch.Tensor], torch.Tensor]


def _number(x: float | torch.Tensor) -> float:
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def response(
    optimizer: torch.optim.Optimizer, group: dict, p: torch.Tensor, g: torch.Tensor, take: Take
) -> torch.Tensor | float | None:
    """J's diagonal for parameter `p` of `group` on the work coordinates (a scalar where it is one
    value for the whole tensor), after the step that used gradient `g` (on the coordinates)."""
    if group.get("maximize", False):
        return None
    lr = _number(group["lr"])
    if type(optimizer) is torch.optim.SGD:
        mu, damp = _number(group.get("momentum", 0.0)), _number(group.get("dampening", 0.0))
        if mu == 0:
            return -lr
        return -lr * (1 + mu * (1 - damp)) if group.get("nesterov", False) else -lr * (1 - damp)
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        state = optimizer.state.get(p)
        if not state or "exp_avg_sq" not in state:
            return None
        b1, b2 = (_number(b) for b in group["betas"])
        eps = _number(group["eps"])
        t = _number(state["step"])
        c1, c2 = 1 - b1**t, 1 - b2**t
        v = state.get("max_exp_avg_sq", state["exp_avg_sq"]) if group.get("amsgrad") else state["exp_avg_sq"]
        root = (take(v.detach().reshape(-1)) / c2).sqrt()
        m = take(state["exp_avg"].detach().reshape(-1)) / c1
        safe = torch.where(root > 0, root, 1.0)
        norm = torch.where(root > 0, m * (1 - b2) * g / (c2 * safe * (root + eps)), 0.0)
        return -lr / (root + eps) * ((1 - b1) / c1 - norm)
    return None
