"""attach and detach pause and resume production jobs: with a tokens file, only a token covering
the job may ask (every job: a token bound to none), and every request is logged with who asked
(docs/security.md, "Who may write"). The Ray actor's `attach`/`detach` and `thermoscope attach` /
`detach` (its $THERMOSCOPE_TOKEN) go through the same `Collector` methods tested here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from thermoscope.collector.security import Security
from thermoscope.collector.service import Collector

from helpers.security import TOKEN_A, TOKEN_ANY


def test_attach_and_detach_need_a_token_covering_the_job_and_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="thermoscope.collector")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_ANY}\n{TOKEN_A} teamA-\n")
    security = Security(tokens=tokens)
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, security=security).running() as c:
        for refused in (
            lambda: c.detach("teamA-train"),  # no token
            lambda: c.detach("teamA-train", token="not-a-token-0123456789"),
            lambda: c.detach("teamB-train", token=TOKEN_A),  # another team's job
            lambda: c.detach(None, token=TOKEN_A),  # every job: beyond a team's token
        ):
            with pytest.raises(PermissionError):
                refused()
        assert c.telemetry.active("teamA-train") and c.telemetry.active("teamB-train")  # nothing paused
        c.detach("teamA-train", token=TOKEN_A)
        assert not c.telemetry.active("teamA-train")
        c.attach(None, token=TOKEN_ANY)
        assert c.telemetry.active("teamA-train")
    log = caplog.text
    assert "refused: detach job teamA-train: no token" in log
    assert "refused: detach job teamB-train: the token of line 2 covers only jobs 'teamA-'" in log
    assert "detach job teamA-train, asked by the token of line 2" in log
    assert "attach every job, asked by the token of line 1" in log
    assert TOKEN_A not in log and TOKEN_ANY not in log  # who, never the secret


def test_without_a_tokens_file_anyone_who_reaches_the_collector_may_and_it_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="thermoscope.collector")
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None).running() as c:
        c.detach("job")
        assert not c.telemetry.active("job")
    assert "detach job job, asked by anyone (the collector has no tokens file)" in caplog.text
