"""Where a model applies its nonlinearities: its activation sites, and the probe that types them.

A site is a module that is a `torch.nn` activation, or behaves as one (`acts_as_activation`:
judged on a probe tensor, so that any library's own class counts), or a function from
`FUNCTIONS` that a forward calls (`F.gelu(x)`, `torch.tanh(x)`, `x.relu()`: the sampler catches
those on sampled steps). The engine-type probe (`scale_probe`) applies a site's own function to
scaled-down copies of its input (docs/science.md section 5); `describe` and `describe_call` say
which function, with its parameters, a site applies.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

#: Module classes that are activation sites by default.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
)

#: Functions that are activation sites where a forward calls them (caught on sampled steps by a
#: torch function mode: `torch.tanh(x)`, `F.gelu(x)`, `x.relu()`, ...), by the name that ends
#: the site's name. In-place variants share their function's name.
FUNCTIONS: dict[Callable, str] = {
    func: name
    for name, funcs in {
        "relu": (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_),
        "relu6": (F.relu6,),
        "leaky_relu": (F.leaky_relu,),
        "elu": (F.elu,),
        "selu": (F.selu, torch.selu),
        "celu": (F.celu,),
        "gelu": (F.gelu,),
        "silu": (F.silu,),
        "mish": (F.mish,),
        "hardtanh": (F.hardtanh,),
        "hardswish": (F.hardswish,),
        "hardsigmoid": (F.hardsigmoid,),
        "softplus": (F.softplus,),
        "softsign": (F.softsign,),
        "logsigmoid": (F.logsigmoid,),
        "tanh": (torch.tanh, torch.tanh_, torch.Tensor.tanh, torch.Tensor.tanh_),
        "sigmoid": (torch.sigmoid, torch.sigmoid_, torch.Tensor.sigmoid, torch.Tensor.sigmoid_),
        "glu": (F.glu,),  # measured on its gate half (`glu_gate`)
        "where": (torch.where,),  # a site only where elementwise (`where_site`)
    }.items()
    for func in funcs
}
#: The multiplications a product site `x * phi(x)` is caught in.
PRODUCTS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
#: Comparisons with a number and scalings by one: what `Derived` keeps for `where_site`.
_COMPARE = {
    f: op
    for op, funcs in {
        torch.gt: (torch.gt, torch.Tensor.gt, torch.Tensor.__gt__),
        torch.ge: (torch.ge, torch.Tensor.ge, torch.Tensor.__ge__),
        torch.lt: (torch.lt, torch.Tensor.lt, torch.Tensor.__lt__),
        torch.le: (torch.le, torch.Tensor.le, torch.Tensor.__le__),
        torch.mul: tuple(PRODUCTS),
    }.items()
    for f in funcs
}
#: The input `acts_as_activation` tries a module on.
PROBE_SHAPE = (2, 4, 8)

#: The engine-type probe: values of z it uses, the scales it applies. Scales below 1 only: the
#: type belongs to the function at its operating point (docs/science.md section 5), so the probe
#: stays inside the range the inputs occupy (each c z lies between 0 and z). With a scale of 2,
#: ReLU6 at inputs of 3 to 6 (a ReLU there) read B: a tiny MobileNetV2's ReLU6s read B at 9 of
#: 35 sites, none of whose probed inputs passed 6 (tests/test_site_readings.py).
PROBE_VALUES = 4096
PROBE_SCALES = (0.5, 0.25)


def find_sites(model: nn.Module, extra: Iterable[nn.Module] = ()) -> list[tuple[str, nn.Module]]:
    """Activation modules of `model`, plus user-marked ones, in module order.

    A module is one when it is a `torch.nn` activation (ACTIVATIONS), or when it behaves as one
    (`acts_as_activation`: a library's own class, e.g. transformers' NewGELUActivation). Names are
    the module paths with torch.compile's `_orig_mod` left out (`plain_name`).

    `nn.Identity` counts when it stands as an activation: inside an `nn.Sequential`, or under an
    attribute named like one (`act`, `activation`, ...). Its efficiency is 0 and it leaves the
    network's efficiency unchanged, as a linear map should.
    """
    marked = {id(m) for m in extra}
    parents = {id(child) for m in model.modules() if isinstance(m, nn.Sequential) for child in m.children()}
    sites = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_identity_activation = isinstance(module, nn.Identity) and (
            id(module) in parents or leaf.startswith("act")
        )
        if (
            isinstance(module, ACTIVATIONS)
            or is_identity_activation
            or id(module) in marked
            or acts_as_activation(module)
        ):
            sites.append((plain_name(name), module))
    return sites


def plain_name(name: str) -> str:
    """A module or parameter path without torch.compile's wrapper (`_orig_mod`) in it."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def describe(module: nn.Module) -> str:
    """The function a module site applies, with its parameters as the module states them
    (`extra_repr`, `inplace` left out: it changes no value): "ReLU6()", "GELU(approximate='tanh')"."""
    options = ", ".join(
        part for part in module.extra_repr().split(", ") if part and not part.startswith("inplace")
    )
    return f"{type(module).__name__}({options})"


def describe_call(name: str, args: tuple, kwargs: dict) -> str:
    """The function a functional site calls, with its non-tensor arguments: "gelu(approximate='tanh')",
    "leaky_relu(0.2)" (`inplace` and `out` left out)."""
    options = [repr(a) for a in args[1:] if not isinstance(a, torch.Tensor)]
    options += [
        f"{k}={v!r}"
        for k, v in kwargs.items()
        if k not in ("inplace", "out") and not isinstance(v, torch.Tensor)
    ]
    return f"{name}({', '.join(options)})"


def acts_as_activation(module: nn.Module) -> bool:
    """Whether a module behaves as an elementwise nonlinearity, judged on a small probe.

    Recognized by behaviour, not by class name, so that any library's activation class counts: a
    leaf module with no parameters and no buffers whose output on a probe tensor keeps its shape,
    is the same on a second call (Dropout in training mode is not), moves only where its input
    moved and is the same function at every position (Softmax and normalizations are not), and
    is not affine (Identity, Dropout in eval mode and scalings are not). Its own `forward` is
    called, so no user hook runs, and the random state is restored afterwards.
    """
    if any(True for _ in module.children()) or any(True for _ in module.parameters()):
        return False
    if any(True for _ in module.buffers()):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_SHAPE, generator=gen) * 2
    perm = torch.randperm(x.numel(), generator=gen)
    bumped = x.clone()
    bumped.view(-1)[0] += 1.0
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            y = module.forward(x.clone())
            if not (isinstance(y, torch.Tensor) and y.shape == x.shape and y.is_floating_point()):
                return False
            again = module.forward(x.clone())
            shuffled = module.forward(x.reshape(-1)[perm].reshape(x.shape))
            moved = module.forward(bumped) != y
    except Exception:  # a module that does not take one tensor is not an activation
        return False
    if not (torch.isfinite(y).all() and torch.equal(again, y)):
        return False
    if moved.view(-1)[1:].any() or not torch.allclose(shuffled.reshape(-1), y.reshape(-1)[perm]):
        return False
    return _nonaffine(x.reshape(-1).double(), y.reshape(-1).double())


def _nonaffine(x: torch.Tensor, y: torch.Tensor) -> bool:
    """True when y is not alpha x + beta (a constant is affine too)."""
    xc, yc = x - x.mean(), y - y.mean()
    spread = float(yc.square().sum())
    if spread == 0.0:
        return False
    residual = yc - xc * (xc @ yc) / (xc @ xc)
    return float(residual.square().sum()) > 1e-6 * spread


def scale_probe(phi: Callable[[torch.Tensor], object], z: torch.Tensor) -> torch.Tensor:
    """max over c in PROBE_SCALES of |eta(c z) - eta(z)| on a strided subsample of z, with the
    site's own activation phi (its module's forward, or the function a forward called:
    docs/science.md section 5); -1 where it cannot be measured (no spread, or phi does not take a
    single tensor).

    phi is applied in float64 where it takes it (else in z's dtype: a PReLU's float32 weight), so
    that the probe reads the function, not its rounding: a float32 sigmoid at inputs of RMS 1e-6
    returns values 3e-8 apart around 0.5, and its eta moved by 0.01 with the scale (type B) where
    the function is linear (type A)."""
    flat = z.reshape(-1)
    sub = flat[:: max(1, flat.numel() // PROBE_VALUES)][:PROBE_VALUES]
    for values in (sub.double(), sub):
        try:
            eta = torch.stack([_efficiency(phi, values * c) for c in (1.0, *PROBE_SCALES)])
        except (TypeError, RuntimeError, AttributeError):
            continue
        return torch.nan_to_num((eta[1:] - eta[0]).abs().max(), nan=-1.0)
    return torch.full((), -1.0, dtype=torch.float64, device=z.device)


#: The probe reads a function only where its output spreads over at least this many of its ulps:
#: rounding then moves eta by under 1e-8 (ulp^2/12 over the output's variance), a tenth of
#: ENGINE_TOLERANCE. A float64 sigmoid at inputs of RMS 3e-13 spreads over ~700 ulps around 0.5.
PROBE_ULPS = 4096


def _efficiency(phi: Callable[[torch.Tensor], object], z: torch.Tensor) -> torch.Tensor:
    """1 - Var(phi(z)) / Var(z), in float64; NaN where phi(z) does not spread over PROBE_ULPS of
    its own ulps (what would be read is rounding; a constant output, 0 ulps, reads its eta of 1)."""
    a = phi(z)
    wide = a.double()  # type: ignore[union-attr]
    var_out = wide.var(correction=0)
    ulp = torch.finfo(a.dtype).eps * wide.abs().max()  # type: ignore[union-attr]
    unresolved = (var_out > 0) & (var_out < (PROBE_ULPS * ulp) ** 2)
    return torch.where(unresolved, torch.nan, 1 - var_out / z.double().var(correction=0))


class Derived:
    """The tensors one forward made from another by an elementwise comparison with a number or a
    scaling by one (`h > 0`, `0.01 * h`), each with its source and the function of it, so that
    a `torch.where` of them is read as the elementwise function of its source it is
    (`where_site`). Kept on sampled steps only, for one forward (`clear`), by weak references:
    nothing is kept alive for it."""

    def __init__(self) -> None:
        # id(tensor) -> (the tensor, to tell a reused id; its source; the function of it)
        self._of: dict[int, tuple[weakref.ref, weakref.ref, Callable[[torch.Tensor], torch.Tensor]]] = {}

    def note(self, func: Callable, args: tuple, output: object) -> None:
        """Keep `output` if `func(args)` is a comparison or a scaling of a tensor by a number."""
        op = _COMPARE.get(func)
        if op is None or len(args) != 2 or not isinstance(output, torch.Tensor):
            return
        x, c = args if isinstance(args[0], torch.Tensor) else args[::-1]
        if not isinstance(x, torch.Tensor) or not isinstance(c, (int, float)):
            return
        source, inner = self.of(x)
        self._of[id(output)] = (weakref.ref(output), weakref.ref(source), lambda t: op(inner(t), c))

    def of(self, t: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The source `t` was made from, and the function of it (itself and the identity if none)."""
        kept = self._of.get(id(t))
        source = None if kept is None or kept[0]() is not t else kept[1]()
        if source is None:
            return t, lambda s: s
        return source, kept[2]  # type: ignore[index]

    def clear(self) -> None:
        self._of.clear()


class Experts:
    """Which slice of a stacked parameter each tensor of one module's forward was made from: a
    fused MoE (transformers' `MixtralExperts`: `gate_up_proj[e]`, one activation module applied
    once per expert given tokens) applies its activation to expert e's signal, a site of its own
    (`act_fn[e]`), named by the expert, not by the order experts happened to run in. A tensor
    made by any op from a tagged one is tagged too, until the module that indexed the parameter
    returns (`leave`)."""

    def __init__(self) -> None:
        self._of: dict[int, tuple[weakref.ref, int, int]] = {}  # id(tensor) -> (the tensor, expert, depth)

    def note(self, func: Callable, args: tuple, output: object, depth: int) -> None:
        """Tag `output` if `func(args)` indexes a stacked parameter by one integer, or if one of
        its tensor arguments is tagged (made at `depth`: the running modules' stack height)."""
        if not self._of and func is not torch.Tensor.__getitem__:
            return
        expert = None
        if func is torch.Tensor.__getitem__ and isinstance(args[0], nn.Parameter) and args[0].dim() >= 3:
            index = args[1] if len(args) > 1 else None
            if isinstance(index, int) or (
                isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point()
            ):
                expert = int(index)
        else:
            expert = next((e for a in args if (e := self.of(a)) is not None), None)
        if expert is None:
            return
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(out, torch.Tensor):
                self._of[id(out)] = (weakref.ref(out), expert, depth)

    def of(self, t: object) -> int | None:
        """The expert `t` was made for (None: none)."""
        kept = self._of.get(id(t))
        return None if kept is None or kept[0]() is not t else kept[1]

    def leave(self, depth: int) -> None:
        """The module at `depth` returned: what its forward made is no expert's signal any more."""
        if self._of:
            self._of = {k: v for k, v in self._of.items() if v[2] < depth}


def where_site(
    derived: Derived, condition: object = None, a: object = None, b: object = None, **kwargs: object
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
    """A `torch.where(cond, a, b)` that is an elementwise function of one tensor z (cond a
    comparison of z with a number, a and b each z, a scaling of it or a number: a leaky ReLU
    written `torch.where(h > 0, h, 0.01 * h)`): z and that function. None for any other where."""
    if kwargs or not all(isinstance(v, (torch.Tensor, int, float)) for v in (condition, a, b)):
        return None
    if not isinstance(condition, torch.Tensor) or condition.dtype != torch.bool:
        return None
    parts = [derived.of(v) if isinstance(v, torch.Tensor) else (None, v) for v in (condition, a, b)]
    sources = {id(source) for source, _ in parts if source is not None}
    if len(sources) != 1 or parts[0][0] is condition:  # one source, and cond made from it
        return None
    z = next(source for source, _ in parts if source is not None)
    if not z.is_floating_point():
        return None
    fns = [fn if source is not None else (lambda t, v=fn: v) for source, fn in parts]
    return z, lambda t: torch.where(fns[0](t), fns[1](t), fns[2](t))


def glu_gate(
    input: torch.Tensor, dim: int = -1
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The site of a GLU, `a * sigmoid(b)` of its input's halves: the sigmoid of its gate half b.
    Its only elementwise nonlinearity is that sigmoid; the product with a is a bilinear gate of two
    different signals (as a gated MLP's `act(gate) * up`, whose site is `act` alone), which no
    single-input efficiency 1 - Var(a)/Var(z) describes."""
    return input.chunk(2, dim)[1], torch.sigmoid


def is_product(func: Callable, args: tuple, input: torch.Tensor, output: object) -> bool:
    """Whether `func(args)` multiplies `output` by `input`, the tensor it was applied to."""
    if func not in PRODUCTS or len(args) != 2:
        return False
    x, y = args
    return (x is input and y is output) or (x is output and y is input)
