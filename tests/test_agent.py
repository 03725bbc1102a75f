"""The agent in-process: its statistics against direct computations on the model."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor

from helpers.processes import free_port
from helpers.reference import efficiency64, entropy64, layer_entropy64, work64
from helpers.training import train_steps


def checked_step(monitor: Monitor, model: nn.Module, opt: torch.optim.Optimizer, loss_of: Callable):
    """Two sampled steps; returns the second reading and float64 truths: the entropy per tensor at
    the second step, and the work of the first update with the second step's gradient (w+)."""
    loss_of().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    opt.zero_grad()
    monitor.step()
    loss = loss_of()
    loss.backward()
    at = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    monitor.step(loss)
    reading = monitor.latest()
    monitor.close()
    return reading, [layer_entropy64(a) for a in at], work64(grads, at, before)


def mlp(inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 300), nn.ReLU(inplace=inplace), nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 1)
    )


def train(
    model: nn.Module, opt: torch.optim.Optimizer, monitor: Monitor, steps: int, record_at: int, work_at: int
):
    """Train on a fixed task; return float64 truths of step `record_at`, and the work w+ of the
    update at step `work_at` (with step work_at + 1's gradient)."""
    gen = torch.Generator().manual_seed(1)
    truth, saved = {}, {}
    for step in range(steps):
        x = torch.randn(64, 16, generator=gen)
        y = x[:, :1] * 2
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == work_at:
            saved["before"] = [p.detach().clone() for p in model.parameters()]
        if step == work_at + 1:
            grads = [p.grad.detach().clone() for p in model.parameters()]
            truth["work"] = work64(grads, saved["after"], saved["before"])
        if step == record_at:
            before = [p.detach().clone() for p in model.parameters()]
            grads = [p.grad.detach().clone() for p in model.parameters()]
            with torch.no_grad():
                z = model[0](x)
                a = model[1](z.clone())
            opt.step()
            truth |= {
                "entropy": [layer_entropy64(b) for b in before],
                "job_entropy": sum(entropy64(b) for b in before),
                "loss": loss.item(),
                "relu_eta": efficiency64(z, a),
            }
        else:
            opt.step()
        if step == work_at:
            saved["after"] = [p.detach().clone() for p in model.parameters()]
        monitor.step(loss)
    return truth


@pytest.mark.parametrize("inplace", [False, True])
def test_in_process_readings_match_a_direct_float64_computation(inplace: bool) -> None:
    model = mlp(inplace)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    # a subset above the 300 x 300 layer's size: every layer's work is exact (not subsampled)
    monitor = Monitor(model, opt, every=5, subset=1 << 17)
    # the sample at step 25 carries the work of the sampled update at step 20
    truth = train(model, opt, monitor, steps=26, record_at=25, work_at=20)
    r = monitor.latest()
    assert r is not None and r.step == 25
    assert r.energy == pytest.approx(truth["loss"], rel=1e-6)
    assert r.layer_entropy == pytest.approx(truth["entropy"], rel=1e-6, nan_ok=True)  # the 1-value bias: NaN
    assert r.layer_work == pytest.approx(truth["work"], rel=1e-4, abs=1e-12)
    # in-place ReLU: the pre-hook saw z before the ReLU overwrote it
    assert r.site_efficiency[0] == pytest.approx(truth["relu_eta"], rel=1e-6)
    assert r.entropy == pytest.approx(truth["job_entropy"], rel=1e-6)


def test_work_sums_to_the_first_order_energy_change() -> None:
    """sum_l w_l = E_{t+1} - E_t to first order, on a fixed batch with a small step."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    monitor = Monitor(model, opt, every=1)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(3))
    y = x[:, :1] * 2
    losses = []
    for _ in range(2):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
    monitor.latest()
    first = monitor.sink.thermometer  # the reading at step 1 holds step 1's work; step 0's is in the window
    work0 = first._work[1] - first._work[0]  # cumulative work from sample 0 to sample 1
    assert work0.sum() == pytest.approx(losses[1] - losses[0], rel=2e-2)


def test_unsampled_steps_run_without_any_hook() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    monitor = Monitor(model, opt, every=4)
    relu = model[1]
    hooked, following = [], []
    for _ in range(8):
        hooked.append(bool(relu._forward_pre_hooks))
        following.append(bool(opt._optimizer_step_pre_hooks))
        loss = model(torch.randn(8, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
    assert hooked == [True, False, False, False, True, False, False, False]
    # the step after a sample has one optimizer pre-hook: its gradient measures that sample's work
    assert following == [True, True, False, False, True, True, False, False]
    monitor.close()
    assert not relu._forward_pre_hooks and not opt._optimizer_step_pre_hooks


def test_without_an_optimizer_argument_global_optimizer_hooks_measure_work() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = Monitor(model, every=1)
    train_steps(monitor, model, opt, 3, batch=32)
    r = monitor.latest()
    monitor.close()
    assert (r.layer_work < 0).all()  # plain SGD on a fixed objective: every layer's work lowers the loss


def test_a_module_called_twice_in_a_step_pools_both_calls() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU()

        def forward(self, x):
            return self.fc2(self.act(self.fc2(self.act(self.fc1(x)))))

    model = Twice()
    monitor = Monitor(model, every=1)
    x = torch.randn(100, 8)
    monitor._sampler.arm()
    model(x)
    sample = monitor._sampler.collect(0, None).to_sample()
    assert [s.name for s in monitor.sites] == ["act"]
    assert sample.sites.count[0] == 2 * 100 * 8
    z1 = model.fc1(x)
    z2 = model.fc2(torch.relu(z1))
    z = torch.cat([z1, z2]).detach().double()
    # float32 accumulation: the mean to ~1e-6 of the spread, M2 to ~1e-6 relative
    assert sample.sites.in_mean[0] == pytest.approx(float(z.mean()), abs=1e-6 * float(z.std()))
    assert sample.sites.in_m2[0] == pytest.approx(float(((z - z.mean()) ** 2).sum()), rel=1e-5)
    monitor.close()


def test_identity_counts_as_a_site_only_where_it_stands_as_an_activation() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 4))
            self.norm = nn.Identity()  # a placeholder, not an activation
            self.act = nn.Identity()

        def forward(self, x):
            return self.act(self.norm(self.body(x)))

    monitor = Monitor(Net(), every=1)
    monitor.close()
    assert [s.name for s in monitor.sites] == ["body.1", "act"]


def test_many_small_tensors_are_measured_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(10, 10) for _ in range(30)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, opt, every=1)
    r, entropy, work = checked_step(monitor, model, opt, lambda: model(torch.randn(4, 10)).square().mean())
    assert r.layer_entropy == pytest.approx(entropy, rel=1e-9, nan_ok=True)
    assert r.layer_work == pytest.approx(work, rel=1e-5)


@pytest.mark.slow
def test_without_a_collector_training_completes_and_drops_are_counted() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    monitor = Monitor(model, opt, collector=f"127.0.0.1:{free_port()}", every=1, max_queue=4)
    start = time.monotonic()
    train_steps(monitor, model, opt, 50, batch=8)
    assert time.monotonic() - start < 30  # bounded: no step waited for the absent collector
    assert monitor.close(timeout=0.5) is False
    assert monitor.dropped >= 46
    assert monitor.delivered == 0 and not monitor.connected


def test_both_sinks_answer_the_monitors_sink_protocol() -> None:
    """The monitor holds one sink and never asks which: in-process and streaming answer alike."""
    from thermoscope.agent.sink import Sink

    local = Monitor(mlp(), every=1)
    streaming = Monitor(mlp(), collector=f"127.0.0.1:{free_port()}", every=1, max_queue=2)
    try:
        assert type(local.sink).__name__ == "Local" and type(streaming.sink).__name__ == "Sender"
        for monitor in (local, streaming):
            assert isinstance(monitor.sink, Sink)
            monitor.step(torch.tensor(1.0))
            assert monitor.sampled == monitor.sink.submitted == 1
        assert local.latest() is not None and streaming.latest() is None
    finally:
        assert local.close() is True
        streaming.close(timeout=0.2)


def test_a_forked_child_starts_with_an_empty_idle_sender() -> None:
    model = mlp()
    monitor = Monitor(model, collector=f"127.0.0.1:{free_port()}", every=1, max_queue=8)
    monitor.step(torch.tensor(1.0))  # the sender thread starts and holds one frame
    pid = os.fork()
    if pid == 0:  # child: like a DataLoader worker
        sender = monitor.sink
        os._exit(0 if sender._thread is None and not sender._queue and sender.dropped == 0 else 1)
    _, status = os.waitpid(pid, 0)
    monitor.close(timeout=0.2)
    assert os.waitstatus_to_exitcode(status) == 0


def test_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every"):
        Monitor(mlp(), every=0)


def test_float_loss_and_no_loss_are_accepted() -> None:
    model = mlp()
    monitor = Monitor(model, every=1)
    monitor.step(0.5)
    monitor.step(None)
    r = monitor.latest()
    monitor.close()
    assert r.step == 1 and r.energy_from_work and np.isfinite(r.energy)
    # every layer has its entropy but the 1-value bias (no spread: at the floor, NaN)
    assert np.isfinite(r.layer_entropy).tolist() == [True] * 5 + [False]


def test_without_a_visible_loss_the_energy_is_the_cumulative_work_since_the_first_sample() -> None:
    """No loss handed over and none backpropagated (a backward on a non-scalar: the fallback)."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # small steps: w+ reads first order
    monitor = Monitor(model, opt, every=3)
    readings = []
    x = torch.randn(32, 16)  # one batch: the work's sign is the descent's, not minibatch noise
    for step in range(12):
        out = model(x)
        out.backward(2 * out.detach() / out.numel())  # the gradient of out.pow(2).mean(), by hand
        opt.step()
        opt.zero_grad()
        monitor.step()
        if step % 3 == 0:
            readings.append(monitor.latest())
    monitor.close()
    assert all(r.energy_from_work for r in readings)
    assert readings[0].energy == 0.0 and (readings[0].layer_work == 0).all()  # no update before it
    # each sample carries the previous sampled update's work, which stands for the 3 steps between them
    expected = np.cumsum([3 * r.layer_work.sum() for r in readings[1:]])
    assert np.allclose([r.energy for r in readings[1:]], expected, rtol=1e-12, atol=0)
    assert readings[-1].energy < 0  # gradient descent does negative work: the energy falls


def test_bfloat16_models_are_measured_in_float32_or_wider() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1)).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = Monitor(model, opt, every=1)
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    r, entropy, work = checked_step(monitor, model, opt, lambda: model(x).float().square().mean())
    assert r.layer_entropy == pytest.approx(entropy, rel=1e-5, nan_ok=True)
    assert r.layer_work == pytest.approx(work, rel=1e-3)
    assert list(r.site_engine) == ["B"]


def test_ddp_layer_names_carry_no_module_prefix() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        monitor = Monitor(ddp, every=1)
        monitor.close()
        assert [layer.name for layer in monitor.layers] == ["0.weight", "0.bias"]
        assert [site.name for site in monitor.sites] == ["1"]
    finally:
        dist.destroy_process_group()


def test_a_nan_weight_never_breaks_the_training_step() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = Monitor(model, opt, every=1)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    loss = model(torch.randn(8, 16)).square().mean()
    loss.backward()
    opt.step()  # the hooks run here
    monitor.step(loss)
    sample = monitor.sink.pending[-1].to_sample()
    monitor.close()
    assert sample.layers.histogram[0, 0] >= 1  # the NaN is counted outside the edges
    assert np.isnan(sample.layers.mean[0])  # and the moments say so (the wire refuses such frames)


def test_settings_grouped_by_purpose_and_the_flat_keywords_make_the_same_monitor(tmp_path) -> None:
    from thermoscope.agent.settings import Delivery, Identity, Sampling

    grouped = Monitor(
        mlp(),
        identity=Identity(job="j", run="r", rank=1, world_size=2, node="n0"),
        sampling=Sampling(every=3, step=6, bins=64),
        delivery=Delivery(max_queue=8, spool=tmp_path),
    )
    flat = Monitor(
        mlp(), job="j", run="r", rank=1, world_size=2, node="n0", every=3, step=6, bins=64, max_queue=8
    )
    for monitor in (grouped, flat):
        assert (monitor.job, monitor.run, monitor.rank, monitor.world_size, monitor.node) == (
            "j",
            "r",
            1,
            2,
            "n0",
        )
        assert monitor.every == 3 and monitor.sampling  # step 6 is sampled: 6 % 3 == 0
        assert monitor._announced.hello.histogram_bins == 64
        monitor.close()


def test_a_setting_given_twice_or_unknown_is_refused_by_name() -> None:
    from thermoscope.agent.security import Security
    from thermoscope.agent.settings import Identity

    with pytest.raises(TypeError, match="'evry'"):
        Monitor(mlp(), evry=3)
    with pytest.raises(TypeError, match="job= and identity="):
        Monitor(mlp(), identity=Identity(job="a"), job="b")
    with pytest.raises(TypeError, match="token= and security="):
        Monitor(mlp(), security=Security(), token="t")
