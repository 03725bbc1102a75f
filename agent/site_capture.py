"""The activation sites of a model on a sampled step: their shifted moments, calls and probes.

Forward pre-hooks and hooks on the site modules take the shifted power sums (c, sum (z - c), sum
(z - c)^2, c a reference near the mean: `tensors.shifted_sums`) of the pre-activations z and of
the activations a (pre-hooks see z before an in-place activation overwrites it); a step's calls
of one site are merged into its mean and M2 in float64 (`merged_moments`, Chan's merge).
Activation functions a forward calls (`FUNCTIONS`, and the elementwise `torch.where` of
`sites.where_site`) are caught by a torch function mode entered inside the model's forward
(`_FunctionalSites`).

Each application of a function is its own site, named by the running module and its order among
that module's applications of the function in one forward of the model (`block:silu`,
`block:silu#2`, ...: a loop calling F.silu per block has one site per iteration). An application
to one expert's signal in a fused MoE loop is that expert's site, module or function
(`experts.act_fn[3]`: `sites.Experts`). An application whose output multiplies its own input
(`h * torch.sigmoid(h)`) is the product's site: its output is counted once the module that made
it returns, so that the product can still claim it (`_Application`). `F.glu` is the sigmoid of
its gate half (`sites.glu_gate`).

The site table grows as sites are first applied, on any sampled step (an MoE expert first given
tokens later, a branch first taken later); a site module never called is not in it: the first
sampled step's table leaves out the modules that step did not call (`_prune`). A recompute under
activation checkpointing (module hooks that fire again inside backward) counts nothing: each
application counts once. Compiled code runs eagerly on a sampled step (dynamo's force_eager
stance), so no hook makes it recompile. On one sample in SHAPE_EVERY each site (on its first
sample, every one) runs its engine-type scale probe.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from thermoscope.science.stats import SiteInfo

from .pending import SITE_COLUMNS
from .sites import (
    FUNCTIONS,
    Derived,
    Experts,
    describe,
    describe_call,
    glu_gate,
    is_product,
    plain_name,
    scale_probe,
    where_site,
)
from .tensors import shifted_sums

log = logging.getLogger("thermoscope.agent")


class SiteCapture:
    """The sites of one model (see the module docstring); `sites` is its table: before the first
    sampled step, the site modules; from then on, the sites applied so far, in the order they
    joined (it only grows: an earlier sample's sites are a prefix of it)."""

    def __init__(self, model: nn.Module, sites: Sequence[tuple[str, nn.Module]], shape_every: int) -> None:
        self.sites = [SiteInfo(name=n, kind=type(m).__name__, function=describe(m)) for n, m in sites]
        self._modules = [m for _, m in sites]
        self._names = [n for n, _ in sites]
        self._module_site: list[int | None] = list(range(len(sites)))  # a module's index in the table
        self._expert_sites: dict[tuple[int, int], int] = {}  # (module, expert) -> its index in the table
        self._calling: dict[int, int] = {}  # a site module running now -> the site its call adds to
        # the probe calls forward() again: only on stateless modules (no running statistics)
        self._stateless = [next(m.buffers(), None) is None for m in self._modules]
        self._probed = list(self._stateless)  # per site of the table
        self._joined: set[int] = set()  # the sites that joined the table on this step (all probed)
        self._model = model
        self._shape_every = shape_every
        self._functions: dict[str, int] = {}  # a functional site's name -> its site index
        self._running: list[str | None] = []  # the modules whose forward runs (None: a module site)
        self._order: dict[str, int] = {}  # `owner:function` -> its applications in this forward
        self._open: list[_Application] = []  # applications whose output a product may still claim
        self._derived = Derived()  # this forward's comparisons and scalings, for `where_site`
        self._experts = Experts()  # which expert's signal each tensor of a fused MoE's forward is
        self._mode = _FunctionalSites(self)
        self._eager: object | None = None  # torch.compile's force_eager stance while armed
        self._number = 0  # the coming sample's number in the run (`arm`)
        self.settled = False  # the first sampled step is over (its table pruned: `_prune`)
        self.reset()

    def arm(self, number: int) -> list:
        """The hooks of the coming step, the run's sample `number` (it chooses the probes)."""
        self._number = number
        handles = []
        for i, module in enumerate(self._modules):
            handles.append(module.register_forward_pre_hook(self._site_in_hook(i)))
            handles.append(module.register_forward_hook(self._site_out_hook(i), always_call=True))
        handles.extend(self._track(self._model))  # a functional site may first run on any step
        self._eager = _force_eager()
        return handles

    def disarm(self) -> None:
        """After the step (its hooks are removed by the caller): leave the compile stance."""
        self._running.clear()
        self._close_applications()
        self._derived.clear()
        self._experts.leave(0)
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
        self._joined.clear()

    def settle(self) -> None:
        """The first sampled step is over: from now on a site joins the table when first applied."""
        self.settled = True

    def columns(self, device: torch.device) -> list[torch.Tensor]:
        """The step's SITE_COLUMNS rows (mean z, M2 z, mean a, M2 a, probe spread; -1: not
        probed), one value per site, on `device`."""
        if not self.settled:
            self._prune()
        if not self.sites:  # (none was applied)
            return []
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

    def _prune(self) -> None:
        """Leave the site modules the first sampled step did not call out of the table: a module
        never called (Mamba's `mixer.act` on its CPU path) is no site (its efficiency would read
        NaN forever); one called later joins then (`_module_index`)."""
        keep = [i for i, n in enumerate(self.count) if n > 0]
        if len(keep) == len(self.sites):
            return
        where = {old: new for new, old in enumerate(keep)}
        self.sites[:] = [self.sites[i] for i in keep]  # (in place: the sampler's and sink's table)
        self._probed = [self._probed[i] for i in keep]
        self._site_sums = [self._site_sums[i] for i in keep]
        self._site_calls = [self._site_calls[i] for i in keep]
        self._probe = [self._probe[i] for i in keep]
        self._site_in = [None] * len(keep)
        self.count = self.count[keep]
        self._module_site = [None if i is None else where.get(i) for i in self._module_site]
        self._expert_sites = {k: where[i] for k, i in self._expert_sites.items()}
        self._functions = {name: where[i] for name, i in self._functions.items()}
        self._joined = {where[i] for i in self._joined if i in where}

    def _due(self, site: int) -> bool:
        """Site i is probed on one sample in SHAPE_EVERY by the sample's number, spread as the
        layers' histograms (a site's probe is this rank's own reading: on its first sample, all)."""
        if not self.settled or site in self._joined:
            return True
        return site % self._shape_every == self._number % self._shape_every

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
                self._order.clear()
                self._mode.__enter__()
            self._running.append(name)

        return hook

    def _leave(self, root: bool):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._running:
                self._running.pop()
            self._close_applications()
            self._experts.leave(len(self._running) + 1)
            if root and not self._running:
                self._derived.clear()
                self._mode.__exit__(None, None, None)

        return hook

    def _site_in_hook(self, c: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._running.append(None)  # the functions it calls are its own, not sites
            if args and isinstance(args[0], torch.Tensor) and not _recompute():
                i = self._calling[c] = self._module_index(c, self._experts.of(args[0]))
                with torch.no_grad():
                    z = args[0].detach()
                    self._site_in[i] = shifted_sums(z)
                    if self._probe[i] is None and self._probed[i] and self._due(i):
                        self._probe[i] = scale_probe(module.forward, z)

        return hook

    def _site_out_hook(self, c: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._running:
                self._running.pop()
            i = self._calling.pop(c, None)
            if i is None:
                return
            z_sums, self._site_in[i] = self._site_in[i], None
            if z_sums is not None:
                self._add_call(i, z_sums, output)

        return hook

    def _functional(self, owner: str, name: str, func: Callable, args: tuple, kwargs: dict) -> object:
        """Apply an activation function for the module `owner`: this forward's next application
        of `name` there (`block:silu`, then `block:silu#2`, ...), a site made on the first sampled
        step (after it, a site not in the table is left unmeasured and said once). `F.glu` is
        measured on its gate (`glu_gate`), `torch.where` as the function it is of its input
        (`where_site`)."""
        phi: Callable[[torch.Tensor], torch.Tensor] | None = None
        z = args[0]
        if name == "glu":
            z, phi = glu_gate(*args, **kwargs)
        elif name == "where":
            found = where_site(self._derived, *args, **kwargs)
            if found is None:
                return func(*args, **kwargs)
            z, phi = found
        key = f"{owner}:{name}"
        expert = self._experts.of(args[0])
        if expert is not None:
            site = f"{key}[{expert}]"
        else:
            order = self._order[key] = self._order.get(key, 0) + 1
            site = key if order == 1 else f"{key}#{order}"
        i = self._functions.get(site)
        if i is None:
            i = self._functions[site] = self._join(
                SiteInfo(name=site, kind=f"{name}()", function=describe_call(name, args, kwargs)), probed=True
            )
        if phi is None:
            rest = {k: v for k, v in kwargs.items() if k != "out"}
            phi = lambda t: func(t, *args[1:], **rest)  # noqa: E731
        with torch.no_grad():
            z = z.detach()
            z_sums = shifted_sums(z)  # before the call: an in-place function overwrites z
            probed = self._probe[i] is None and self._due(i)
            if probed:
                self._probe[i] = scale_probe(phi, z)
        output = func(*args, **kwargs)
        if name == "glu":
            self._add_call(i, z_sums, phi(z))
        else:
            self._open.append(_Application(i, name, len(self._running), args[0], z_sums, output, phi, probed))
        return output

    def _module_index(self, c: int, expert: int | None) -> int:
        """The table index of site module c, applied to `expert`'s signal (None: no expert's),
        which joins the table if this is its first such call."""
        kind = type(self._modules[c]).__name__
        if expert is not None:
            i = self._expert_sites.get((c, expert))
            if i is None:
                site = SiteInfo(
                    name=f"{self._names[c]}[{expert}]", kind=kind, function=describe(self._modules[c])
                )
                i = self._expert_sites[(c, expert)] = self._join(site, self._stateless[c])
            return i
        i = self._module_site[c]
        if i is None:
            i = self._module_site[c] = self._join(
                SiteInfo(name=self._names[c], kind=kind, function=describe(self._modules[c])),
                self._stateless[c],
            )
        return i

    def _join(self, site: SiteInfo, probed: bool) -> int:
        """Add a site first applied on this step to the table (after the first sampled step, it
        is announced with the next sample: see `Monitor`)."""
        i = len(self.sites)
        if self.settled:
            log.info(
                "thermoscope: site %s first applied on sample %d: it joins the table", site.name, self._number
            )
        self.sites.append(site)
        self._probed.append(probed)
        self._site_in.append(None)
        self._site_sums.append([])
        self._site_calls.append([])
        self.count = np.append(self.count, 0)
        self._probe.append(None)
        self._joined.add(i)
        return i

    def _claim(self, func: Callable, args: tuple, kwargs: dict, products: bool) -> object | None:
        """An op on the output of open applications: `x * phi(x)` (where `products`: outside a
        module site) makes the product that site's output (a hand-written swish is a swish, not a
        sigmoid) and returns it; any other use counts the output as it is before the op, which
        may change it in place. None: no product."""
        used = {id(t) for t in _tensors(args)}
        claimed = None
        for app in [a for a in self._open if id(a.output) in used]:
            self._open.remove(app)
            if claimed is None and products and is_product(func, args, app.input, app.output):
                claimed = app
            else:
                self._add_call(app.site, app.z_sums, app.output)
        if claimed is None:
            return None
        output = func(*args, **kwargs)
        i, phi = claimed.site, claimed.phi
        if not self.settled:  # named for what it applies while the table is not declared
            site = self.sites[i]
            name = site.name.replace(f":{claimed.name}", f":x*{claimed.name}", 1)
            self.sites[i] = SiteInfo(name=name, kind=f"x*{site.kind}", function=f"x*{site.function}")
        if claimed.probed:
            with torch.no_grad():
                self._probe[i] = scale_probe(lambda t: t * phi(t), claimed.input.detach())
        self._add_call(i, claimed.z_sums, output)
        return output

    def _close_applications(self) -> None:
        """Count the output of each application the returning module made (no product claimed it)."""
        depth = len(self._running)
        while self._open and self._open[-1].depth > depth:
            app = self._open.pop()
            self._add_call(app.site, app.z_sums, app.output)

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
        capture = self._capture
        running = capture._running
        inside = bool(running) and running[-1] is not None  # (not inside a module site's forward)
        product = capture._claim(func, args, kwargs, inside) if capture._open else None
        if not inside or not args:
            return func(*args, **kwargs) if product is None else product
        name = FUNCTIONS.get(func)
        if product is not None:
            output = product
        elif name is not None and isinstance(args[0], torch.Tensor):
            output = capture._functional(running[-1], name, func, args, kwargs)
        else:
            output = func(*args, **kwargs)
            capture._derived.note(func, args, output)
        capture._experts.note(func, args, output, len(running))
        return output


@dataclass
class _Application:
    """One application of a functional site whose output is not counted yet: a product with its
    input (`x * phi(x)`) may still make it that product's, until the module at `depth` returns."""

    site: int
    name: str  # the function's (`FUNCTIONS`)
    depth: int  # len(running) when it was applied
    input: torch.Tensor
    z_sums: torch.Tensor
    output: object
    phi: Callable[[torch.Tensor], torch.Tensor]
    probed: bool  # its site's probe was taken on this application (of phi: of the product's, if one)


def _tensors(args: tuple) -> list[torch.Tensor]:
    """The tensors among an op's arguments, and in its lists and tuples (`torch.cat`'s)."""
    found = []
    for a in args:
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(t for t in a if isinstance(t, torch.Tensor))
    return found


def _recompute() -> bool:
    """True inside a backward pass: a checkpointed forward being recomputed (its application
    counted already, in the forward)."""
    return torch._C._current_graph_task_id() != -1


def _force_eager() -> object | None:
    """Make compiled code run eagerly until the returned stance is exited, so that a compiled
    model's sampled step runs the site hooks without dynamo guarding on them: no recompile, and
    no hook a compiled graph would skip. None where dynamo was never imported (nothing is
    compiled; importing it would cost a second)."""
    if "torch._dynamo" not in sys.modules:
        return None
    return torch.compiler.set_stance("force_eager")
