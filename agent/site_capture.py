"""The activation sites of a model on a sampled step: their shifted moments, calls and probes.

Forward pre-hooks and hooks on the site modules take the shifted power sums (c, sum (z - c), sum
(z - c)^2, c a reference near the mean: `tensors.shifted_sums`) of the pre-activations z and of
the activations a (pre-hooks see z before an in-place activation overwrites it); a step's calls
of one site are merged into its mean and M2 in float64 (`merged_moments`, Chan's merge).
Activation functions a forward calls (`FUNCTIONS`) are caught by a torch function mode entered
inside the model's forward, named by the running module (`_FunctionalSites`), and add theirs the
same way: each one found on the first sampled step becomes a site, and the table is settled after
it (`settle`). Compiled code runs eagerly on a sampled step (dynamo's force_eager stance), so no
hook makes it recompile. On one sample in SHAPE_EVERY each site (on its first sample, every one)
runs its engine-type scale probe.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from thermoscope.science.stats import SiteInfo

from .pending import SITE_COLUMNS
from .sites import FUNCTIONS, describe, describe_call, plain_name, scale_probe
from .tensors import shifted_sums

log = logging.getLogger("thermoscope.agent")


class SiteCapture:
    """The sites of one model (see the module docstring); `sites` is its table, which grows on
    the first sampled step only."""

    def __init__(self, model: nn.Module, sites: Sequence[tuple[str, nn.Module]], shape_every: int) -> None:
        self.sites = [SiteInfo(name=n, kind=type(m).__name__, function=describe(m)) for n, m in sites]
        self._modules = [m for _, m in sites]
        # the probe calls forward() again: only on stateless modules (no running statistics)
        self._probed = [next(m.buffers(), None) is None for m in self._modules]
        self._model = model
        self._shape_every = shape_every
        self._functions: dict[str, int] = {}  # a functional site's name -> its site index
        self._running: list[str | None] = []  # the modules whose forward runs (None: a module site)
        self._mode = _FunctionalSites(self)
        self._eager: object | None = None  # torch.compile's force_eager stance while armed
        self._unlisted_logged = False
        self._number = 0  # the coming sample's number in the run (`arm`)
        self.settled = False  # the table can grow no more (after the first sampled step)
        self.reset()

    def arm(self, number: int) -> list:
        """The hooks of the coming step, the run's sample `number` (it chooses the probes)."""
        self._number = number
        handles = []
        for i, module in enumerate(self._modules):
            handles.append(module.register_forward_pre_hook(self._site_in_hook(i)))
            handles.append(module.register_forward_hook(self._site_out_hook(i), always_call=True))
        if not self.settled or self._functions:
            handles.extend(self._track(self._model))
        self._eager = _force_eager()
        return handles

    def disarm(self) -> None:
        """After the step (its hooks are removed by the caller): leave the compile stance."""
        self._running.clear()
        if self._eager is not None:
            self._eager.__exit__(None, None, None)  # type: ignore[attr-defined]
            self._eager = None

    def reset(self) -> None:
        """Forget the step's sums (after `columns` read them)."""
        n_sites = len(self.sites)
        self._site_in: list[torch.Tensor | None] = [None] * n_sites  # z sums of the call
        self._site_sums: list[list[torch.Tensor]] = [[] for _ in range(n_sites)]  # one row per call
        self._site_calls: list[list[int]] = [[] for _ in range(n_sites)]  # the values of each call
        self.count = np.zeros(n_sites, dtype=np.int64)  # values each site made on the step
        self._probe: list[torch.Tensor | None] = [None] * n_sites

    def settle(self) -> None:
        """The first sampled step is over: the table is final."""
        self.settled = True

    def columns(self, device: torch.device) -> list[torch.Tensor]:
        """The step's SITE_COLUMNS rows (mean z, M2 z, mean a, M2 a, probe spread; -1: not
        probed), one value per site, on `device`."""
        empty = torch.zeros(SITE_COLUMNS - 1, dtype=torch.float64, device=device)
        unprobed = torch.full((), -1.0, dtype=torch.float64, device=device)
        rows = [
            torch.cat(
                [
                    merged_moments(torch.stack(calls).to(device), counts) if calls else empty,
                    (unprobed if probe is None else probe.to(device)).reshape(1),
                ]
            )
            for calls, counts, probe in zip(self._site_sums, self._site_calls, self._probe, strict=True)
        ]
        return list(torch.stack(rows).T)

    def _due(self, site: int) -> bool:
        """Site i is probed on one sample in SHAPE_EVERY by the sample's number, spread as the
        layers' histograms (a site's probe is this rank's own reading: on its first sample, all)."""
        return not self.settled or site % self._shape_every == self._number % self._shape_every

    def _track(self, model: nn.Module) -> list:
        """Hooks that keep the stack of running modules, for `_FunctionalSites` to name the module
        that calls an activation function; the model's own enter and leave the mode (always_call:
        also when its forward raises), so that nothing outside the model's forward is caught."""
        sites = {id(m) for m in self._modules}
        handles = []
        for name, module in model.named_modules():
            if id(module) in sites:
                continue
            root = module is model
            handles.append(module.register_forward_pre_hook(self._enter(plain_name(name), root)))
            handles.append(module.register_forward_hook(self._leave(root), always_call=True))
        return handles

    def _enter(self, name: str, root: bool):
        def hook(module: nn.Module, args: tuple) -> None:
            if root and not self._running:
                self._mode.__enter__()
            self._running.append(name)

        return hook

    def _leave(self, root: bool):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._running:
                self._running.pop()
            if root and not self._running:
                self._mode.__exit__(None, None, None)

        return hook

    def _site_in_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._running.append(None)  # the functions it calls are its own, not sites
            if args and isinstance(args[0], torch.Tensor):
                with torch.no_grad():
                    z = args[0].detach()
                    self._site_in[i] = shifted_sums(z)
                    if self._probe[i] is None and self._probed[i] and self._due(i):
                        self._probe[i] = scale_probe(module.forward, z)

        return hook

    def _site_out_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._running:
                self._running.pop()
            z_sums, self._site_in[i] = self._site_in[i], None
            if z_sums is not None:
                self._add_call(i, z_sums, output)

        return hook

    def _functional(self, owner: str, name: str, func: Callable, args: tuple, kwargs: dict) -> object:
        """Call an activation function for the module `owner`, adding the power sums of its input
        and output to the site `owner:name` (made on the first sampled step; after it, a site
        not in the table is left unmeasured and said once)."""
        site = f"{owner}:{name}"
        i = self._functions.get(site)
        if i is None and self.settled:
            if not self._unlisted_logged:
                self._unlisted_logged = True
                log.warning(
                    "thermoscope: %s first ran after the site table was declared; it is not measured",
                    site,
                )
            return func(*args, **kwargs)
        if i is None:
            i = self._functions[site] = len(self.sites)
            self.sites.append(
                SiteInfo(name=site, kind=f"{name}()", function=describe_call(name, args, kwargs))
            )
            self._probed.append(True)
            self._site_in.append(None)
            self._site_sums.append([])
            self._site_calls.append([])
            self.count = np.append(self.count, 0)
            self._probe.append(None)
        with torch.no_grad():
            z = args[0].detach()
            z_sums = shifted_sums(z)  # before the call: an in-place function overwrites z
            if self._probe[i] is None and self._due(i):
                rest = {k: v for k, v in kwargs.items() if k != "out"}
                self._probe[i] = scale_probe(lambda t: func(t, *args[1:], **rest), z)
        output = func(*args, **kwargs)
        self._add_call(i, z_sums, output)
        return output

    @torch.no_grad()
    def _add_call(self, i: int, z_sums: torch.Tensor, output: object) -> None:
        """One call of site i: its input's shifted sums and its output's, and the values it made."""
        if isinstance(output, torch.Tensor) and output.numel():
            self._site_sums[i].append(torch.cat([z_sums, shifted_sums(output.detach())]))
            self._site_calls[i].append(output.numel())
            self.count[i] += output.numel()


def merged_moments(calls: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(mean z, M2 z, mean a, M2 a) of one site on a step, in float64, from its calls' rows of
    shifted sums (c, sum (x - c), sum (x - c)^2 for z, then for a) and their value counts.

    Each call's mean is c + s1/n and its M2 s2 - s1^2/n (no cancellation: c is near the
    mean); the calls merge by Chan's sum form, exact and order-free as the collector's merge."""
    rows = calls.double()
    n = torch.tensor(counts, dtype=torch.float64, device=rows.device)
    total = n.sum()
    merged = []
    for c, s1, s2 in (rows[:, 0:3].T, rows[:, 3:6].T):
        mean = c + s1 / n
        m2 = torch.clamp(s2 - s1 * s1 / n, min=0.0)
        overall = (n * mean).sum() / total
        merged += [overall, m2.sum() + (n * (mean - overall).square()).sum()]
    return torch.stack(merged)


class _FunctionalSites(TorchFunctionMode):
    """Hands the activation functions (`FUNCTIONS`) a model's forward calls to the capture, named
    by the innermost running module; entered only inside the model's forward on a sampled step.
    (torch leaves the mode while `__torch_function__` runs: the capture's own ops are not caught.)"""

    def __init__(self, capture: SiteCapture) -> None:
        super().__init__()
        self._capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        running = self._capture._running
        name = FUNCTIONS.get(func)
        if name is None or not running or running[-1] is None or not args:
            return func(*args, **kwargs)
        if not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        return self._capture._functional(running[-1], name, func, args, kwargs)


def _force_eager() -> object | None:
    """Make compiled code run eagerly until the returned stance is exited, so that a compiled
    model's sampled step runs the site hooks without dynamo guarding on them: no recompile, and
    no hook a compiled graph would skip. None where dynamo was never imported (nothing is
    compiled; importing it would cost a second)."""
    if "torch._dynamo" not in sys.modules:
        return None
    return torch.compiler.set_stance("force_eager")
