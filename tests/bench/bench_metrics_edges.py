"""/metrics against clients that never read their answers, and password guesses from many
addresses: the measurements behind issue 23's items 8 and 9 (docs/security.md).

Run it as a script (pytest does not collect it), on the code to measure:

    python tests/bench/bench_metrics_edges.py [--never-reading 40] [--page-mb 8] [--addresses 24]

1. Never-reading clients: `--never-reading` clients send a whole request for a `--page-mb` MB page
   (more than the kernel buffers of one connection: tcp_wmem's 4 MiB here) and read nothing; then
   one scrape, timed. A server alone (`start_metrics_server`, its default limits).
2. Guesses from many addresses: a `thermoscope collector` process with a bcrypt (cost 10) user;
   its scraper verified once; then 5 wrong passwords from each of `--addresses` loopback
   addresses (127.0.0.2, ...) and 5 from the scraper's own, the scraper scraping after each
   round: the collector's CPU seconds, the answers, and the scraper's.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import bcrypt

from thermoscope.collector.exposition.metrics_http import start_metrics_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from bench_metrics_http import cpu_seconds, get

from helpers.processes import start_collector_process


def never_reading(n: int, page_mb: float) -> None:
    page = b"x" * int(page_mb * 1e6)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [page]

    server, _ = start_metrics_server("127.0.0.1", 0, app)
    stuck = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", server.server_port))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            stuck.append(s)
        time.sleep(0.5)
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=600) as r:
            body = r.read()
        print(
            f"{n} never-reading clients, a {page_mb:g} MB page: a scrape got {len(body)} bytes "
            f"after {time.monotonic() - started:.2f} s",
            flush=True,
        )
    finally:
        for s in stuck:
            s.close()
        server.shutdown()
        server.server_close()


def from_address(port: int, source: str, user_password: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        token = base64.b64encode(user_password.encode()).decode()
        connection.request("GET", "/metrics", headers={"Authorization": f"Basic {token}"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def guesses(addresses: int, tmp: Path) -> None:
    users = tmp / "users"
    users.write_text(f"prometheus:{bcrypt.hashpw(b's3cret', bcrypt.gensalt(10)).decode()}\n")
    c = start_collector_process(tmp / "guesses.db", None, "--metrics-basic-auth", str(users))
    try:
        assert get(c.metrics_url, "prometheus:s3cret") == 200
        port = int(c.metrics_url.rsplit(":", 1)[1].split("/")[0])
        time.sleep(0.5)
        before, started = cpu_seconds(c.proc.pid), time.monotonic()
        statuses, scraper = [], []
        for i in range(5):
            for n in range(2, 2 + addresses):
                statuses.append(from_address(port, f"127.0.0.{n}", f"prometheus:guess{i}-{n}"))
            statuses += [from_address(port, "127.0.0.1", f"prometheus:own{i}-{j}") for j in range(5)]
            scraper.append(get(c.metrics_url, "prometheus:s3cret"))
        spent, wall = cpu_seconds(c.proc.pid) - before, time.monotonic() - started
        codes = {code: statuses.count(code) for code in sorted(set(statuses))}
        print(
            f"{len(statuses)} wrong passwords from {addresses + 1} addresses: {spent:.2f} CPU s in the "
            f"collector ({wall:.2f} s wall), answers {codes}; the verified scraper meanwhile: {scraper}",
            flush=True,
        )
    finally:
        c.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--never-reading", type=int, default=40)
    parser.add_argument("--page-mb", type=float, default=8.0)
    parser.add_argument("--addresses", type=int, default=24)
    args = parser.parse_args()
    never_reading(args.never_reading, args.page_mb)
    with tempfile.TemporaryDirectory() as tmp:
        guesses(args.addresses, Path(tmp))


if __name__ == "__main__":
    main()
