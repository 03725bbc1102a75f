"""The integrations, with the real libraries: torchrun (and so `accelerate launch`), the Hugging Face
Trainer and the Lightning Trainer, each streaming to a real collector. The trainings they run are the
examples of docs/integrations.md (docs/examples/), and the page shows those files as they are."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from thermoscope.agent import identity
from thermoscope.collector.service import Collector

from helpers.processes import free_port

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "docs" / "examples"
PAGE = ROOT / "docs" / "integrations.md"


def example(name: str) -> ModuleType:
    """docs/examples/<name>.py, imported as a user's script is run (its `main` not yet called)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_page_shows_each_example_as_the_tests_run_it() -> None:
    page = PAGE.read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    for path in sorted(EXAMPLES.glob("*.py")):
        assert path.read_text() in blocks, f"{path.name} is not on {PAGE.name} as it is"


# -- torchrun and accelerate launch: who a rank is ----------------------------------------------


@pytest.fixture
def launcher_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A process with none of the launchers' variables (the tests set the ones they mean)."""
    for name in (
        "THERMOSCOPE_JOB", "THERMOSCOPE_RUN", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID",
        "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_named_rendezvous_names_the_job_and_the_run(launcher_env: pytest.MonkeyPatch) -> None:
    launcher_env.setenv("TORCHELASTIC_RUN_ID", "nightly-42")  # torchrun --rdzv-id, or --standalone's
    launcher_env.setenv("MASTER_ADDR", "10.0.0.5")
    launcher_env.setenv("MASTER_PORT", "29500")
    launcher_env.setenv("RANK", "3")
    launcher_env.setenv("WORLD_SIZE", "4")
    launcher_env.setenv("LOCAL_RANK", "1")
    assert identity.launcher_identity() == {
        "job": "nightly-42", "run": "nightly-42", "rank": 3, "world_size": 4, "local_rank": 1,
    }  # fmt: skip


def test_torchruns_unnamed_rendezvous_names_the_job_by_its_address(launcher_env: pytest.MonkeyPatch) -> None:
    launcher_env.setenv("TORCHELASTIC_RUN_ID", "none")  # plain torchrun and accelerate launch
    launcher_env.setenv("MASTER_PORT", "29500")
    launcher_env.setenv("MASTER_ADDR", "10.0.0.5")
    assert identity.launcher_job() == "10.0.0.5:29500"
    launcher_env.setenv("MASTER_ADDR", "127.0.0.1")  # one machine: its loopback is not another's
    assert identity.launcher_job() == f"{socket.gethostname()}:29500"
    launcher_env.setenv("THERMOSCOPE_JOB", "mine")  # a name given wins
    assert identity.launcher_job() == "mine"


def test_the_run_of_an_unnamed_launch_is_never_the_placeholder(launcher_env: pytest.MonkeyPatch) -> None:
    launcher_env.setenv("TORCHELASTIC_RUN_ID", "none")
    one, other = identity.launcher_run(1, False), identity.launcher_run(1, False)
    assert one != other and "none" not in (one, other)  # one process: a fresh id each launch
    launcher_env.setenv("SLURM_JOB_ID", "7781")
    assert identity.launcher_run(2, False) == "7781"


def test_a_plain_process_keeps_the_monitors_defaults(launcher_env: pytest.MonkeyPatch) -> None:
    found = identity.launcher_identity()
    assert set(found) == {"run"} and len(found["run"]) == 12


#: The command docs/examples/torchrun_watch.py's docstring shows, and the port it names.
COMMAND = next(
    line.strip()
    for line in (EXAMPLES / "torchrun_watch.py").read_text().splitlines()
    if "torchrun --" in line
)
DOCUMENTED_PORT = "29500"


def torchrun(collector: Collector, port: int) -> None:
    """The documented command, run as shown from the checkout (torchrun as this Python's module;
    the collector's address and a free port in place of the documented ones)."""
    env = {**os.environ, "THERMOSCOPE_COLLECTOR": collector.grpc_target}
    for name in ("THERMOSCOPE_JOB", "THERMOSCOPE_RUN", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        env.pop(name, None)
    launcher, *args = shlex.split(COMMAND)
    assert launcher == "torchrun" and DOCUMENTED_PORT in args
    args = [str(port) if a == DOCUMENTED_PORT else a for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_ranks_stream_one_job_and_each_launch_is_a_run_of_its_own(collector: Collector) -> None:
    port = free_port()
    job_id = f"{socket.gethostname()}:{port}"
    runs = []
    for _ in range(2):  # the same command twice: the same job, two runs
        torchrun(collector, port)
        (state,) = collector.snapshot().values()
        assert collector.snapshot().keys() == {job_id}
        ranks = state["ranks"]
        assert set(ranks) == {0, 1} and all(r["finished"] and r["world_size"] == 2 for r in ranks.values())
        # `watch` looks the collector up on its own thread; what it sampled meanwhile waits for it
        assert [r["frames"] for r in ranks.values()] == [20, 20]  # steps 0, 10, ..., 190 of each rank
        (run,) = {r["run_id"] for r in ranks.values()}
        runs.append(run)
        assert state["last_step"] == 190  # the last sampled step, merged from both ranks
    assert runs[0] != runs[1] and "" not in runs and "none" not in runs
    assert state["frames_late"] == 0  # the second launch's steps were not taken for replays


# -- each example, run as its docstring says ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_trainer", "lightning_trainer"])
def test_each_trainer_example_run_as_its_docstring_says_delivers_every_sampled_step(
    collector: Collector, launcher_env: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    """`THERMOSCOPE_COLLECTOR=host:port python docs/examples/<name>.py`, verbatim: its 20 steps
    are sampled at 0, 5, 10 and 15, and each of them reaches the collector (before, the Lightning
    example's never did and the HF example's 2 of 4: the agent skipped steps until its link was
    up, and its `close()` said nothing)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py")],
        cwd=tmp_path,  # (the HF Trainer writes its output directory here)
        env={**os.environ, "THERMOSCOPE_COLLECTOR": collector.grpc_target},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (state,) = collector.snapshot().values()
    (rank,) = state["ranks"].values()
    assert rank["finished"] and rank["frames"] == 4
    assert state["frames_received"] == 4 and state["last_step"] == 15


# -- the Hugging Face Trainer -------------------------------------------------------------------


@pytest.mark.slow
def test_the_hf_callback_streams_the_trainers_logged_loss_and_closes_at_train_end(
    collector: Collector, launcher_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    trainer = example("hf_trainer").main(20, str(tmp_path), collector=collector.grpc_target)
    (callback,) = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "ThermoscopeCallback"]
    monitor = callback.monitor
    assert monitor is not None and not monitor.enabled  # closed at train end
    state = collector.snapshot()["tiny-gpt2"]  # the job is the arguments' run_name
    (rank,) = state["ranks"].values()
    assert rank["finished"] and rank["world_size"] == 1 and rank["frames"] == 4  # steps 0, 5, 10, 15
    assert state["last_step"] == 15 and monitor.delivered == 4 and monitor.dropped == 0
    # the energy is the loss the Trainer logged for that optimizer step: the sum of its two
    # micro-batches' losses, each divided by 2 before its backward (gradient accumulation)
    logged = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    assert state["energy"] == pytest.approx(logged[16], rel=1e-6)  # step 16 counts from 1
    reading = collector.jobs["tiny-gpt2"].reading
    assert reading is not None and not reading.energy_from_work
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"} <= set(reading.layer_names)


# -- the Lightning Trainer ----------------------------------------------------------------------


def plain_loop(steps: int, accumulate: int = 2, every: int = 5):
    """The Lightning example's training as a plain loop with a `Monitor`: the same module, data,
    gradient accumulation (each loss divided by `accumulate` before its backward) and loss handed
    over (the mean of the step's batches')."""
    import torch

    from thermoscope.agent import Monitor

    lightning_example = example("lightning_trainer")
    torch.manual_seed(0)
    module = lightning_example.Regression()
    optimizer = module.configure_optimizers()
    monitor = Monitor(module, optimizer, every=every)
    losses = []
    for i, batch in enumerate(lightning_example.data()):
        if i == accumulate * steps:
            break
        loss = module.training_step(batch, i)
        (loss / accumulate).backward()
        losses.append(loss.detach())
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(sum(losses[-accumulate:]) / accumulate)
    return monitor


def assert_same_readings(got, expected) -> None:
    """Two monitors' latest readings agree: energy, entropies, work, temperatures, efficiency."""
    import numpy as np

    assert got is not None and expected is not None and got.step == expected.step
    names = ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")
    assert got.layer_names == expected.layer_names == names
    assert got.site_names == expected.site_names == ("net.1",)
    assert not got.energy_from_work
    assert got.energy == pytest.approx(expected.energy, rel=1e-9)
    np.testing.assert_allclose(got.layer_entropy, expected.layer_entropy, rtol=1e-9)
    # the work reads the step's own gradient: the closure ran before the sampler's step hook
    np.testing.assert_allclose(got.layer_work, expected.layer_work, rtol=1e-7)
    np.testing.assert_allclose(got.layer_temperature, expected.layer_temperature, rtol=1e-6)
    assert got.efficiency == pytest.approx(expected.efficiency, rel=1e-6, nan_ok=True)


def the_callback(trainer):
    (callback,) = [c for c in trainer.callbacks if type(c).__name__ == "ThermoscopeCallback"]
    return callback


def test_the_lightning_callback_measures_what_a_monitor_measures_in_the_same_plain_loop() -> None:
    monitor = the_callback(example("lightning_trainer").main(20, collector=None)).monitor
    assert monitor is not None and not monitor.enabled  # closed at train end
    got = monitor.latest()
    assert got is not None and got.step == 15
    assert_same_readings(got, plain_loop(20).latest())


def test_the_lightning_callback_follows_manual_optimization() -> None:
    import lightning

    from thermoscope.integrations.lightning import ThermoscopeCallback

    lightning_example = example("lightning_trainer")

    class Manual(lightning_example.Regression):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            return loss

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = Manual()
    callback = ThermoscopeCallback(every=5, collector=None)
    trainer = lightning.Trainer(
        max_steps=20, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, lightning_example.data())
    assert callback.monitor is not None
    assert_same_readings(callback.monitor.latest(), plain_loop(20, accumulate=1).latest())


@pytest.mark.slow
def test_the_lightning_callback_streams_its_rank_and_closes_at_train_end(
    collector: Collector, launcher_env: pytest.MonkeyPatch
) -> None:
    monitor = the_callback(example("lightning_trainer").main(20, collector=collector.grpc_target)).monitor
    assert monitor is not None and monitor.job in collector.snapshot()  # one process: Monitor's default
    state = collector.snapshot()[monitor.job]
    (rank,) = state["ranks"].values()
    assert rank["finished"] and rank["world_size"] == 1 and rank["frames"] == 4  # steps 0, 5, 10, 15
    assert state["last_step"] == 15 and monitor.delivered == 4 and monitor.dropped == 0
    expected = plain_loop(20).latest()
    assert expected is not None and state["energy"] == pytest.approx(expected.energy, rel=1e-9)
    # the snapshot says None where there is no reading: a 1-value bias has no entropy (NaN)
    pairs = zip(expected.layer_names, expected.layer_entropy, strict=True)
    entropies = {name: None if math.isnan(h) else h for name, h in pairs}
    assert state["layer_entropy"] == pytest.approx(entropies)
