"""`Monitor`: the one object a training loop holds.

    monitor = Monitor(model, optimizer, collector="127.0.0.1:50051", job="my-run", every=10)
    for batch in data:
        loss = loss_fn(model(batch.x), batch.y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(loss)
    monitor.close()

Every `every`-th optimizer step is sampled: the sampler's hooks are armed just before it
and removed right after it, so the other steps run with no hook at all, and `step(loss)`
on them is a counter increment (no device-to-host sync). With a collector, sampled steps
go to the monitor's sink: streamed from a background thread (`sender.Sender`), or, without a
collector (`collector=None`), kept in-process and derived at `latest()` (`local.Local`).

After construction nothing the monitor does raises into the training loop: a collector that is
down, slow or refusing, and a spool that cannot be written, are logged once and counted
(`dropped`, `undurable`, `spool_error`). In a process forked from a streaming monitor's (a
DataLoader worker), the monitor is inert: its hooks are removed, `step` only counts, `close`
returns True, and it never touches gRPC (the parent's channel and threads are unusable there).

The monitor follows the live model: before each sampled step it checks, by identity, that the
model's parameters are those its layer table measures (a walk over `model.parameters()`, on
sampled steps only, when the step ends). When they are not (a module replaced,
`model.lm_head = nn.Linear(...)`), the step's sample is dropped (it read the old tensors), the
monitor logs once and builds the table anew, and its samples from then on are a new run of the
job, `<run>@<step>` (every rank that replaces it at the same step names the same run), since a
stream's table is fixed by its hello. An optimizer rebuilt mid-run is adopted by the sampler
(`Sampler._adopt`).
"""

from __future__ import annotations

import logging
import operator
import os
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from thermoscope.science.derive import Reading
from thermoscope.science.findings import Finding
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire import codec
from thermoscope.wire.contract import VERSION

from . import discovery, placement
from .energy import LossCapture
from .identity import launcher_run
from .local import Local
from .sampler import Sampler
from .security import Security
from .sender import Sender
from .settings import Delivery, Identity, Sampling, group
from .sink import Sink
from .sites import find_sites, plain_name

log = logging.getLogger("thermoscope.agent")


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP/DataParallel and torch.compile's OptimizedModule, so that layer
    and site names carry no `module.` or `_orig_mod.` prefix (the parameters are the same)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded once anything is compiled
    compiled = () if eval_frame is None else (eval_frame.OptimizedModule,)
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel, *compiled)):
        model = model._orig_mod if isinstance(model, compiled) else model.module
    return model


def _replicas(model: nn.Module) -> int:
    """The data-parallel replicas whose gradients DDP averages (1 for a model it does not wrap)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return torch.distributed.get_world_size(model.process_group)
    return 1


def _check_order(model: object, optimizer: object) -> None:
    """TypeError, one line, for `Monitor(optimizer, model)`: swapped, they once failed deep inside
    with `'SGD' object has no attribute 'named_parameters'`."""
    if isinstance(model, nn.Module):
        return
    if isinstance(model, torch.optim.Optimizer) and isinstance(optimizer, nn.Module):
        raise TypeError(
            f"thermoscope: Monitor(model, optimizer) takes the model first: got the {type(model).__name__} "
            f"optimizer, then the {type(optimizer).__name__} model (swap them)"
        )
    raise TypeError(f"thermoscope: Monitor's model must be a torch.nn.Module, got {type(model).__name__}")


class Monitor:
    """Measures entropy, work, temperature and efficiency of `model` while it trains."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        *,
        collector: str | Callable[[], str | None] | None = None,
        identity: Identity | None = None,
        sampling: Sampling | None = None,
        delivery: Delivery | None = None,
        security: Security | None = None,
        work_closure: Callable[[], torch.Tensor] | None = None,
        **keywords: Any,
    ) -> None:
        """
        Args:
            optimizer: whose steps are measured; None measures every optimizer that steps
                this model's parameters (through torch's global optimizer hooks).
            collector: "host:port" of a collector (or several, comma-separated: the job's is
                picked by a hash of its id, `thermoscope.wire.contract.shard`), or a function
                that finds one (`discovery.find_collector`); None derives everything in-process.
                A URL, or an address without its port, is a ValueError here (`discovery.checked`);
                an address that answers but is not a collector (its /metrics port) is logged once.
            identity: who this process is: job, run, rank, world size, local rank, node, and
                its place in a tensor-parallel group (`settings.Identity`; default: one process,
                the job named by $THERMOSCOPE_JOB or host and pid).
            sampling: what is measured: every, step, window, sites, bins, subset
                (`settings.Sampling`; default: one step in 10).
            delivery: how samples travel: max_queue, spool, spool_bytes (`settings.Delivery`).
                A spool is a directory where this process keeps the frames the collector has
                not made durable, replayed after a reconnect, so that a collector killed and
                restarted loses none; what it still holds at `close` stays there for the next
                Monitor given this directory (or `thermoscope replay`), which replays it first.
            security: how to prove ourselves to the collector (`security.Security`); default:
                from $THERMOSCOPE_TOKEN (or $THERMOSCOPE_TOKEN_FILE), $THERMOSCOPE_TLS_CA,
                $THERMOSCOPE_TLS_CERT, $THERMOSCOPE_TLS_KEY.
            keywords: each field of the groups above by itself, as earlier releases took them
                (`job=`, `every=`, `spool=`, ...), and `token=`, `tls_root_cert=`,
                `tls_client_cert=`, `tls_client_key=` (PEM paths or bytes) for `security`.
            work_closure: opt-in, the exact work on one rank without accumulation: a function
                returning the model's loss on a batch independent of the coming update (not the
                one it trains on), run at theta_t before each sampled step (one more forward and
                backward per sample, through `torch.autograd.grad`: `.grad` is untouched). Without
                it, the work's noise correction reads the spread of the step's micro-batches or
                data-parallel ranks, where there is one (docs/science.md section 2).
        """
        _check_order(model, optimizer)
        if isinstance(collector, str):
            collector = discovery.checked(collector)
        identity, sampling, delivery, security = group(keywords, identity, sampling, delivery, security)
        replicas = _replicas(model)
        model = _unwrap(model)
        self._model = model
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer = [optimizer]
        self.job = (
            identity.job or os.environ.get("THERMOSCOPE_JOB") or f"{socket.gethostname()}-{os.getpid()}"
        )
        world_size = identity.world_size
        self.run = launcher_run(world_size, initialized=False) if identity.run is None else identity.run
        self._first_run = self.run  # a new layer table streams as `<run>@<step>` (`_retable`)
        self.rank, self.world_size = identity.rank, world_size
        self.local_rank, self.node = identity.local_rank, identity.node
        self.every = sampling.every
        self.enabled = True
        self._closed = False  # a config coming after `close` enables nothing
        self._sampling, self._tensor_parallel = sampling, identity.tensor_parallel
        self._replicas, self._work_closure = replicas, work_closure
        self._watched = list(model.parameters())  # what the layer table measures (`_model_changed`)
        self._sampler = self._new_sampler(None if optimizer is None else list(optimizer))
        self._declaring = True  # until the first sampled step of a table settles its sites
        self._model_name = type(model).__name__
        self._step = sampling.step
        self._losses = LossCapture()
        self._loss_given = False  # once the loop hands a loss to `step`, no loss is captured
        self._warned_order = False  # `step` called out of order was said once
        self._announced = self._hello()  # completed in place once the site table is settled
        self._settled = threading.Event()  # ... and then set: the sender's stream opens with it
        self._sink: Sink = Local(
            self._sampler.layers, self._sampler.sites, sampling.window, delivery.max_queue
        )
        if collector is not None:
            self._sink = Sender(
                collector,
                self._announced,
                max_queue=delivery.max_queue,
                on_config=self._configure,
                security=security,
                interval=discovery.interval(),
                spool=delivery.spool,
                spool_bytes=delivery.spool_bytes,
                ready=self._settled,
            )
            ref = weakref.WeakMethod(self._after_fork_in_child)
            os.register_at_fork(after_in_child=lambda: (m := ref()) is not None and m())
        if self._step % self.every == 0 and not self.dormant:
            self._arm()

    @property
    def sink(self) -> Sink:
        """Where sampled steps go: `local.Local` (no collector) or `sender.Sender` (streaming)."""
        return self._sink

    @property
    def layers(self):
        return self._sampler.layers

    @property
    def sites(self):
        return self._sampler.sites

    @property
    def dropped(self) -> int:
        """Sampled steps that never reached the collector (queue overflow or a broken stream)."""
        return self._sink.dropped

    @property
    def delivered(self) -> int:
        """Sampled steps the collector has accepted (once flushed: sampled = delivered + dropped)."""
        return self._sink.delivered

    @property
    def undurable(self) -> int:
        """Delivered steps the collector has not said are durable (its database holds them): lost
        if it stops now. After `close`, those it never made durable (its commits failed)."""
        return self._sink.undurable

    @property
    def spooled(self) -> int:
        """After `close`: sampled steps the collector did not take, kept in the spool for the next
        Monitor with the same spool (or `thermoscope replay`) to deliver."""
        return self._sink.spooled

    @property
    def replayed(self) -> int:
        """Frames of dead processes' spools (found in this monitor's spool directory) that this
        monitor replayed and the collector made durable."""
        return self._sink.replayed

    @property
    def spool_error(self) -> str | None:
        """Why the spool was given up (it could not be made or written), or None."""
        return self._sink.spool_error

    @property
    def connected(self) -> bool:
        return self._sink.connected

    @property
    def sampled(self) -> int:
        """Sampled steps taken so far (after `close`: sampled = delivered + dropped + spooled)."""
        return self._sink.submitted

    @property
    def last_error(self) -> str | None:
        """Why the last attempt to reach the collector failed (None: streaming, or in-process)."""
        return self._sink.last_error

    @property
    def sampling(self) -> bool:
        """True while the coming optimizer step is sampled (armed at the end of the step before):
        a trainer integration that sums the loss over micro-batches does so only then."""
        return self._sampler.armed

    @property
    def dormant(self) -> bool:
        """True while a monitor that looks for its collector was told there is none: it samples
        nothing. Until its first lookup answers, and from the moment one finds a collector, it
        samples, and what it samples waits (bounded) for the link."""
        return self._sink.dormant

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Mark the end of one optimizer step; `loss` is its training loss (the energy E_t).

        Call after `optimizer.step()`. On unsampled steps this only counts. Without a loss, a
        sampled step's energy is the sum of the scalars `backward()` was called on since the
        previous optimizer step (`energy.LossCapture`); a loss given here always wins. A loss that
        is not one value (`step(model(x))`) raises ValueError. A sampled step whose `step` came
        before `backward()` or `optimizer.step()` is dropped, with a warning (once); one that a
        `GradScaler` skipped (inf/NaN) is not a step, and is dropped too.
        """
        if isinstance(loss, torch.Tensor) and loss.numel() != 1:
            raise ValueError(
                f"Monitor.step(loss) takes the step's scalar loss, got a tensor of shape {tuple(loss.shape)}"
            )
        if loss is not None:
            self._loss_given = True
        if self._sampler.armed and self._model_changed():
            self._losses.disarm()
            self._retable()  # this step's sample read tensors the model no longer has: not sent
        elif self._sampler.armed:
            self._take(loss)
        elif self._sampler.following:  # the step after a sample gave its gradient to that sample's work
            self._sampler.unfollow()
        self._step += 1
        if self.enabled and self._step % self.every == 0 and not self.dormant:
            self._arm()

    def _take(self, loss: torch.Tensor | float | None) -> None:
        """The sampled step's end: its sample to the sink, unless the loop's order or a skipped step
        makes it no step's."""
        misordered = self._losses.misordered(loss)
        skipped = self._losses.skipped and misordered is None
        captured = self._losses.take()
        if misordered is not None or skipped:
            self._sampler.discard()
            if misordered is not None and not self._warned_order:
                self._warned_order = True
                log.warning(
                    "thermoscope: Monitor.step() was called %s; call it after optimizer.step(): "
                    "this sampled step is dropped (and every one like it, without another warning)",
                    misordered,
                )
            return
        pending = self._sampler.collect(self._step, captured if loss is None else loss)
        if self._declaring:
            self._declare()
        elif len(self._sampler.sites) != len(self._announced.hello.sites):
            self._announced = self._hello()  # (a new message: the sink's old one may stay in use)
            self._sink.grow(self._announced)
        self._sampler.disarm()
        self._sink.submit(pending)

    def latest(self) -> Reading | None:
        """The newest derived reading (in-process mode; None before the first sample)."""
        return self._sink.latest()

    def findings(self) -> list[Finding]:
        """The findings that hold now (in-process mode, docs/findings.md: a dead or saturated
        site, a frozen layer, ...); with a collector, it finds them: `/metrics`, `thermoscope events`."""
        return self._sink.findings()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (bounded) until the collector has accepted every sampled step (accepted: applied;
        whether it is durable yet, the collector says with its acks, and `close` waits for)."""
        return self._sink.flush(timeout)

    def close(self, timeout: float = 5.0) -> bool:
        """Remove the hooks, flush and stop streaming. True if every sampled step reached the
        collector and was made durable there (applied, for a collector without a database);
        otherwise `dropped`, `undurable` and `spooled` say what was not. Never raises."""
        self._sampler.disarm()
        self._sampler.unfollow()
        self._losses.disarm()
        self.enabled, self._closed = False, True
        return self._sink.shutdown(timeout)

    def _after_fork_in_child(self) -> None:
        """In a forked child (its sender is inert: `Sender._after_fork_in_child`): measure nothing."""
        self._sampler.disarm()
        self._sampler.unfollow()
        self._losses.disarm()
        self.enabled = False

    def _new_sampler(self, optimizers: list[torch.optim.Optimizer] | None) -> Sampler:
        """A sampler over the model's parameters now (its first sampled step adds the functional
        sites to the table)."""
        model, sampling = self._model, self._sampling
        return Sampler(
            model,
            [(plain_name(name), p) for name, p in model.named_parameters() if p.numel() > 0],
            find_sites(model, sampling.sites),
            optimizers,
            bins=sampling.bins,
            subset=sampling.subset,
            tensor_parallel=self._tensor_parallel,  # type: ignore[arg-type]
            replicas=self._replicas,
        )

    def _model_changed(self) -> bool:
        """Whether the model's parameters are not the tensors the layer table measures (a module
        or a parameter replaced): one walk over them, on sampled steps only."""
        live = list(self._model.parameters())
        return len(live) != len(self._watched) or not all(map(operator.is_, live, self._watched))

    def _retable(self) -> None:
        """Build the layer table anew over the model's live parameters, as a new run (see the module
        docstring), and say so once; the sample armed over the old table is dropped."""
        old = self._sampler
        old.disarm()
        old.unfollow()  # (the old table's last update has no work: its tensors may be gone)
        self._watched = list(self._model.parameters())
        self._sampler = self._new_sampler(old.optimizers)
        self.run, self._declaring = f"{self._first_run}@{self._step}", True
        before = {layer.name: p for layer, p in zip(old.layers, old.params, strict=True)}
        now = {layer.name: p for layer, p in zip(self._sampler.layers, self._sampler.params, strict=True)}
        replaced = [name for name, p in now.items() if name in before and before[name] is not p]
        log.warning(
            "thermoscope: the model's parameters changed before step %d (%d replaced%s, %d added, %d "
            "removed): its layer table is built anew and measured as run %r",
            self._step,
            len(replaced),
            f": {', '.join(replaced[:3])}{', ...' if len(replaced) > 3 else ''}" if replaced else "",
            len(now.keys() - before.keys()),
            len(before.keys() - now.keys()),
            self.run,
        )

    def _arm(self) -> None:
        """Arm the sampler for the coming step (with the opt-in closure of the exact work), and the
        loss capture: for the energy while no loss is handed over, for the loop's order always."""
        # the run's sample number: the same on every rank
        self._sampler.arm(self._step // self.every, self._work_closure)
        self._losses.arm(values=not self._loss_given)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _declare(self) -> None:
        """Once the site table is settled (the first sampled step found the functional sites):
        the hello and the in-process thermometer take it, and a model with no site says so once.
        The hello is completed in place before the sender opens a stream with it: before the first
        `submit` starts the sender's thread, or, for a looked-up collector, before `_settled`
        lets the waiting thread go on. A later table (`_retable`) goes to the sink with a
        hello of its own, before the first step measured over it."""
        self._declaring = False
        if self._settled.is_set():
            self._announced = self._hello()  # (a new message: the sink's old one may stay in use)
            self._sink.retable(self._announced, self._sampler.layers, self._sampler.sites)
            return
        if len(self._sampler.sites) != len(self._announced.hello.sites):
            self._announced.CopyFrom(self._hello())
        self._settled.set()
        if not self._sampler.sites:
            log.warning(
                "thermoscope: no activation site found in %s: no efficiency or engine type "
                "(mark modules with Monitor(sites=...))",
                self._model_name,
            )

    def _configure(self, config: pb.Config) -> None:
        """Apply the collector's settings (called on the sender thread; plain assignments)."""
        if config.every > 0:
            self.every = config.every
        self.enabled = not config.paused and not self._closed

    def _hello(self) -> pb.AgentMessage:
        return codec.hello(
            job_id=self.job,
            run_id=self.run,
            rank=self.rank,
            world_size=self.world_size,
            local_rank=self.local_rank,
            node=self.node,
            host=socket.gethostname(),
            pod=placement.pod(),
            gpu=placement.gpu(self._model.parameters()),
            agent_version=VERSION,
            every=self.every,
            layers=self._sampler.layers,
            sites=self._sampler.sites,
            bins=self._sampler.bins,
        )
