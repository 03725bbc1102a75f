"""Fixtures shared by the tests (their code lives in tests/helpers/): real collectors on loopback,
in this process or as their own, and a throwaway PKI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Ray reads this when it is imported: 0 makes a local cluster register its node as 127.0.0.1
# (with `_node_ip_address` alone it registers the machine's address, and actors listen there).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from thermoscope.collector.service import Collector

from helpers.processes import CollectorProcess, start_collector_process


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    """A collector on free loopback ports, on a background thread of this process."""
    db = tmp_path / "events.db"
    with Collector("127.0.0.1:0", "127.0.0.1:0", max_message_bytes=256 << 10, db=db).running() as c:
        yield c


@pytest.fixture
def collector_process(tmp_path: Path) -> Iterator[CollectorProcess]:
    """`thermoscope collector` as its own process on free loopback ports, stopped afterwards."""
    process = start_collector_process(tmp_path / "events.db")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    """Certificates for localhost and a client, signed by a throwaway CA.

    Imported here, plainly: without `cryptography` (the test extra's) every test of TLS errors
    instead of skipping, since a skipped security test reads as a passed suite.
    """
    from helpers import pki

    return pki.Pki(tmp_path_factory.mktemp("pki"))
