"""Each first-step mistake gets one clear line: no traceback, no usage banner, no gRPC log line.

The mistakes are the ones a new user made (issue 26): a collector address without its colon, a
URL, the /metrics port given to a `Monitor`; `Monitor(optimizer, model)`; a port taken; a `--db`
whose folder is a file or that cannot be opened; a missing extra, said one way everywhere and
before any work starts. The commands run as a user runs them (`thermoscope ...` in a process of
its own); a missing extra is a module Python cannot import in that process (`sys.modules[name] =
None`, as where it is not installed).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thermoscope.agent import Monitor
from thermoscope.collector.service import Collector

from helpers.processes import thermoscope
from helpers.training import small_model, train_steps


def one_line(stderr: str) -> str:
    """The one line of `stderr` (failing if it holds more, or a traceback)."""
    assert "Traceback" not in stderr and "usage:" not in stderr, stderr
    (line,) = stderr.splitlines()
    return line


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("localhost50051", "HOST:PORT"),
        ("http://127.0.0.1:50051", "is a URL"),
        ("127.0.0.1:50051,https://collector:9108/metrics", "is a URL"),
    ],
)
def test_a_monitor_given_a_collector_address_no_collector_can_be_at_refuses_it_at_construction(
    address: str, says: str
) -> None:
    model, opt = small_model()
    with pytest.raises(ValueError) as refused:
        Monitor(model, opt, collector=address)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and says in message and "127.0.0.1:50051" in message, message


def test_a_monitor_given_the_optimizer_and_the_model_swapped_says_so_in_one_line() -> None:
    model, opt = small_model()
    with pytest.raises(TypeError) as refused:
        Monitor(opt, model)
    message = str(refused.value)
    assert len(message.splitlines()) == 1, message
    assert "model first" in message and "SGD" in message and "swap" in message, message


def test_an_agent_given_the_metrics_port_logs_once_that_it_reached_something_that_is_not_a_collector(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="thermoscope.agent")
    model, opt = small_model()
    target = f"127.0.0.1:{collector.metrics_port}"
    monitor = Monitor(model, opt, collector=target, every=1, job="wrong-port")
    try:
        deadline = time.monotonic() + 120
        said: list[str] = []
        while len(said) < 1 and time.monotonic() < deadline:
            train_steps(monitor, model, opt, 2)
            time.sleep(0.2)
            said = [r.getMessage() for r in caplog.records if "not as a collector" in r.getMessage()]
        assert said, [r.getMessage() for r in caplog.records]
        assert target in said[0] and "gRPC" in said[0] and "/metrics" in said[0], said[0]
        train_steps(monitor, model, opt, 5)  # it retries meanwhile: the same reason is not logged again
        time.sleep(8)
    finally:
        monitor.close(timeout=2)
    said = [r.getMessage() for r in caplog.records if "not as a collector" in r.getMessage()]
    assert len(said) == 1, said
    assert not any("no collector answering" in r.getMessage() for r in caplog.records)
    assert "wrong-port" not in collector.snapshot()


def test_a_collector_whose_db_folder_is_a_file_says_so_in_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    db = tmp_path / "afile" / "events.db"
    result = thermoscope("collector", "--grpc", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--db", str(db))
    assert result.returncode != 0
    line = one_line(result.stderr)
    assert str(db) in line and f"{tmp_path / 'afile'} is a file" in line, line


def test_a_collector_whose_db_cannot_be_opened_says_so_in_one_line_naming_it() -> None:
    result = thermoscope(
        "collector", "--grpc", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--db", "/proc/events.db"
    )
    assert result.returncode != 0
    line = one_line(result.stderr)
    assert "/proc/events.db" in line and "cannot be opened" in line, line


def test_a_demo_whose_db_folder_is_a_file_says_so_in_one_line_before_training(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    db = tmp_path / "afile" / "events.db"
    result = thermoscope("demo", "--steps", "20", "--db", str(db))
    assert result.returncode != 0
    assert str(db) in one_line(result.stderr)


def without(module: str, *args: str) -> subprocess.CompletedProcess:
    """`thermoscope ARGS` in a process where `module` cannot be imported, as where it is not installed."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; "
        "from thermoscope.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        ("matplotlib", ("demo", "--steps", "40", "--figure", "run.png"), "plot"),
        ("ray", ("demo", "--steps", "40", "--workers", "2"), "ray"),
        ("matplotlib", ("plot", "--job", "j", "--out", "run.png"), "plot"),
        ("ray", ("attach", "--job", "01000000"), "ray"),
        ("ray", ("detach", "--job", "01000000"), "ray"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it_before_any_work_starts(
    tmp_path: Path, module: str, args: tuple[str, ...], extra: str
) -> None:
    result = without(module, *args, *(("--db", str(tmp_path / "events.db")) if args[0] == "plot" else ()))
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert f"thermoscope {args[0]}" in line and module in line and f"thermoscope[{extra}]" in line, line
    assert result.stdout == ""  # nothing started: no collector, no training
    assert not (tmp_path / "run.png").exists()
