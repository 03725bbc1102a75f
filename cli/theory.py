"""`thermoscope theory`: section 7's reference tables, and (`--simulate`) the product checked on them.

Without `--simulate` this prints the predicted Type I / Type II energies and entropies and the
transition temperature T_{I->II} of a linear model (`thermoscope.science.theory`). With it, the
same model is trained in torch with a real `Monitor` attached, and what the Monitor measured
is printed beside the prediction: the point is that the product's own readings, not a
side computation, reproduce the theory. `--json` prints one JSON object instead of tables.

The simulation (`simulate`) is the code path the tests use:

* the data and the init draw are the numpy arrays of `theory.make_data` / `theory.draw_init`,
  so the prediction and the run see the same X, y and teacher;
* full-batch training, one `Monitor(every=1)` sample per optimizer step; E_I and S_I are the
  first sample's energy and entropy (the loss and the weights at the init), E_II and S_II the
  last sample's, once training has converged;
* optimizers that reach w* reliably and fast, each standard torch: L-BFGS with a strong-Wolfe
  line search for the smooth losses (MSE, cross-entropy), and for MAE, which is non-smooth
  (a subgradient method with a fixed or decaying step creeps towards w*), gradient descent with
  Polyak's step size (f - f*) / ||g||^2, with f* = 0 known because the noiseless targets are
  exactly representable; on the sharp MAE loss it converges linearly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from thermoscope.science import theory

#: Training stops once the loss is below this fraction of its initial value (mse, mae: the
#: optimum's loss is 0) or, for ce, once a step changes it by less than this relative amount.
STOP_MSE = 1e-10
STOP_MAE = 1e-6
STOP_CE = 1e-7
#: Optimizer steps allowed before a run counts as not converged.
MAX_STEPS = 2000


@dataclass(frozen=True)
class Measurement:
    """What the Monitor read over one training run (same units as `theory.Prediction`)."""

    energy_type_i: float
    energy_type_ii: float
    delta_energy: float
    entropy_type_i: float
    entropy_type_ii: float
    delta_entropy: float
    temperature: float
    steps: int
    seconds: float
    optimizer: str
    converged: bool
    weights: np.ndarray  # the trained w (float64 copy)

    def values(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in theory.QUANTITIES}


def simulate(
    problem: theory.Problem,
    data: theory.Data | None = None,
    *,
    on_step: Callable[[int, float], None] | None = None,
    max_steps: int = MAX_STEPS,
) -> Measurement:
    """Train the linear model of `problem` with a real Monitor attached; return its readings.

    `on_step(step, loss)` is called after every optimizer step (progress display).
    """
    import torch  # the reference tables need numpy only; training needs torch
    from torch import nn

    from thermoscope.agent import Monitor

    data = data if data is not None else theory.make_data(problem)
    w0 = theory.draw_init(problem.init, problem.scale, problem.dim, theory.init_rng(problem.seed))
    x = torch.from_numpy(data.x).float()
    y = torch.from_numpy(data.y).float()
    model = nn.Linear(problem.dim, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w0).reshape(1, -1))

    def objective() -> torch.Tensor:
        out = model(x).squeeze(1)
        if problem.loss == "mse":
            return nn.functional.mse_loss(out, y)
        if problem.loss == "mae":
            return nn.functional.l1_loss(out, y)
        return nn.functional.softplus(-y * out).mean()

    if problem.loss == "mae":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        name = "gradient descent, Polyak step"
    else:
        optimizer = torch.optim.LBFGS(
            model.parameters(),
            lr=1.0,
            max_iter=10,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )
        name = "L-BFGS, strong Wolfe"

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    monitor = Monitor(model, optimizer, every=1)
    start = time.perf_counter()
    first = last = None
    previous = math.inf
    converged = False
    steps = 0
    try:
        for step in range(max_steps):
            if problem.loss == "mae":
                loss = closure()
                assert model.weight.grad is not None
                g2 = float(model.weight.grad.square().sum())
                optimizer.param_groups[0]["lr"] = float(loss.detach()) / g2 if g2 > 0 else 0.0
                optimizer.step()
            else:
                loss = optimizer.step(closure)
            monitor.step(loss)
            steps = step + 1
            reading = monitor.latest()
            if first is None:
                first = reading
            last = reading
            value = float(loss.detach())
            if on_step is not None:
                on_step(step, value)
            if problem.loss == "ce":
                converged = abs(previous - value) <= STOP_CE * abs(value)
            else:
                converged = value <= (STOP_MSE if problem.loss == "mse" else STOP_MAE) * first.energy
            if converged:
                break
            previous = value
    finally:
        monitor.close()
    seconds = time.perf_counter() - start
    assert first is not None and last is not None
    layer = last.layer_names.index("weight")
    e_i, e_ii = float(first.energy), float(last.energy)
    s_i, s_ii = float(first.layer_entropy[layer]), float(last.layer_entropy[layer])
    delta_s = s_i - s_ii
    return Measurement(
        energy_type_i=e_i,
        energy_type_ii=e_ii,
        delta_energy=e_i - e_ii,
        entropy_type_i=s_i,
        entropy_type_ii=s_ii,
        delta_entropy=delta_s,
        temperature=(e_i - e_ii) / delta_s if delta_s != 0.0 else math.nan,
        steps=steps,
        seconds=seconds,
        optimizer=name,
        converged=converged,
        weights=model.weight.detach().double().numpy().reshape(-1).copy(),
    )


# -- the command ------------------------------------------------------------------------------------

#: Rows of the table: (key, label with unit).
ROWS = (
    ("energy_type_i", "E_I (loss)"),
    ("energy_type_ii", "E_II (loss)"),
    ("delta_energy", "Delta E (loss)"),
    ("entropy_type_i", "S_I (nats)"),
    ("entropy_type_i_exact", "S_I exact (nats)"),
    ("entropy_type_ii", "S_II (nats)"),
    ("delta_entropy", "Delta S (nats)"),
    ("temperature", "T_{I->II} (loss/nat)"),
    ("temperature_asymptotic", "T asymptotic"),
)


def relative_errors(measured: dict[str, float], predicted: dict[str, float]) -> dict[str, float]:
    """(measured - predicted) / |predicted| for the quantities both have; NaN where undefined."""
    out = {}
    for key, m in measured.items():
        p = predicted.get(key, math.nan)
        out[key] = (m - p) / abs(p) if math.isfinite(p) and p != 0.0 else math.nan
    return out


def _finite_or_none(values: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN or Infinity: undefined values are null."""
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def report(
    problem: theory.Problem, prediction: theory.Prediction, measurement: Measurement | None
) -> dict[str, object]:
    """The `--json` object: predicted, measured and relative_error (the last two null unless simulated)."""
    predicted = prediction.values()
    out: dict[str, object] = {
        "problem": {
            "loss": problem.loss,
            "init": problem.init,
            "scale": problem.scale,
            "target_scale": problem.target_scale,
            "dim": problem.dim,
            "samples": problem.samples,
            "seed": problem.seed,
        },
        "units": {"energy": "loss", "entropy": "nats (total over the d weights)", "temperature": "loss/nat"},
        "predicted": _finite_or_none(predicted),
        "measured": None,
        "relative_error": None,
        "basis": prediction.basis,
        "simulation": None,
    }
    if measurement is not None:
        measured = measurement.values()
        out["measured"] = _finite_or_none(measured)
        out["relative_error"] = _finite_or_none(relative_errors(measured, predicted))
        w_star = prediction.w_star
        out["simulation"] = {
            "optimizer": measurement.optimizer,
            "steps": measurement.steps,
            "seconds": round(measurement.seconds, 3),
            "converged": measurement.converged,
            "weight_error": float(np.linalg.norm(measurement.weights - w_star) / np.linalg.norm(w_star)),
        }
    return out


def _fmt(value: float | None, spec: str = ".6g") -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def show(result: dict, console: Console) -> None:
    """Print `report`'s object as a table: predicted, and measured with its relative error."""
    problem = result["problem"]
    predicted, measured, error = result["predicted"], result["measured"], result["relative_error"]
    title = (
        "linear model, {loss} loss, {init} init: s = {scale:g}, b = {target_scale:g}, "
        "d = {dim}, N = {samples}".format(**problem)
    )
    table = Table(title=title)
    table.add_column("quantity", no_wrap=True)
    table.add_column("predicted", justify="right", no_wrap=True)
    if measured is not None:
        table.add_column("measured", justify="right", no_wrap=True)
        table.add_column("rel. error", justify="right", no_wrap=True)
    table.add_column("basis")
    basis = result["basis"]
    for key, label in ROWS:
        if predicted.get(key) is None and key == "temperature_asymptotic":
            continue
        row = [label, _fmt(predicted.get(key))]
        if measured is not None:
            row += [_fmt(measured.get(key)), _fmt(error.get(key), "+.2%")]
        row.append(basis.get(key, ""))
        table.add_row(*row)
    console.print(table)
    console.print(
        "E: loss at the init (expected over init draws) and at the trained w*. S: gaussian estimator, "
        "as the Monitor measures it (d/2 ln(2 pi e s^2) for every init of variance s^2); S_I exact = "
        "d h(p0), what a histogram estimator converges to. T_{I->II} = Delta E / Delta S; asymptotic "
        "(mse): 2 (b^2 + s^2) / ln(s^2 / b^2)."
    )
    sim = result["simulation"]
    if sim is not None:
        state = "converged" if sim["converged"] else "NOT converged"
        console.print(
            f"measured by a Monitor on {sim['steps']} steps of {sim['optimizer']} ({sim['seconds']:.2f} s, "
            f"{state}); ||w - w*|| / ||w*|| = {sim['weight_error']:.2e}"
        )


def run(args: argparse.Namespace) -> int:
    """`thermoscope theory`: raises theory.ProblemError for arguments that define no problem."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    problem = theory.Problem(
        loss=args.loss,
        init=args.init,
        scale=args.scale,
        target_scale=args.target_scale,
        dim=args.dim,
        samples=args.samples,
        seed=args.seed,
    )
    # progress goes to stderr, so that stdout holds only the table or the one JSON object; and
    # only to a terminal (a pipe or a log gets no spinner frames)
    err = Console(stderr=True)
    live = err.is_terminal
    with err.status("computing the reference tables") if live else contextlib.nullcontext():
        data = theory.make_data(problem)
        prediction = theory.predict(problem, data)
    measurement = None
    if args.simulate:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True, disable=not live) as progress:
            task = progress.add_task("training with a Monitor", total=None)

            def on_step(step: int, loss: float) -> None:
                description = f"training with a Monitor: step {step + 1}, loss {loss:.4g}"
                progress.update(task, description=description)

            measurement = simulate(problem, data, on_step=on_step)
    if measurement is not None and not measurement.converged:
        err.print(
            f"[yellow]warning:[/] training did not converge in {measurement.steps} steps, so the measured "
            "Type II state is not w*; with --samples close to --dim the data are ill-conditioned"
        )
    result = report(problem, prediction, measurement)
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        show(result, Console())
    return 0
