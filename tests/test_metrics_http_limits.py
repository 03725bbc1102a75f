"""/metrics against idle, slow and hostile clients, and what a password costs it.

Idle and slow clients: a connection that has not sent its whole request head within the
timeout is closed, connections are bounded (the oldest unfinished one makes room for a new one),
and no connection gets a thread of its own, so scrapes keep answering. Passwords: a verified
(user, password) pair is not hashed again, and wrong passwords beyond a small burst per client
address, or beyond a budget all addresses share, are refused without hashing (counted in
/metrics, which is how these tests see it).

Real collectors on 127.0.0.1, real sockets and urllib; `start_metrics_server` alone where a test
needs limits a collector does not take.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import http.client
import math
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from thermoscope.cli.main import main
from thermoscope.collector.exposition.metrics_http import HttpLimits, start_metrics_server
from thermoscope.collector.exposition.passwords import (
    FAILURE_BURST,
    FAILURE_REFILL_PER_S,
    GLOBAL_BURST,
    GLOBAL_REFILL_PER_S,
    BasicAuthUsers,
    hash_password,
)
from thermoscope.collector.security import Security
from thermoscope.collector.service import Collector

HALF_SENT = b"GET /metrics HTTP/1.1\r\n"  # a request line, and never the blank line that ends the head


def open_half_sent(port: int, n: int) -> list[socket.socket]:
    """`n` clients that start a request and never finish it."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(HALF_SENT)
        socks.append(s)
    return socks


def closed_by_server(s: socket.socket, within: float = 60.0) -> bool:
    """Whether the server closed `s` (within `within` s) without answering it."""
    s.settimeout(within)
    try:
        return s.recv(1024) == b""
    except (ConnectionResetError, ssl.SSLError):  # a TLS connection cut without its close_notify
        return True
    except TimeoutError:
        return False


def get(
    url: str, user_password: str | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    """(status, body) of a GET, with basic auth if `user_password` is given."""
    request = urllib.request.Request(url)
    if user_password is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(user_password.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(body: bytes) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def hello_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello\n"]


# -- idle and slow clients ----------------------------------------------------------------------------


def test_hundreds_of_half_sent_requests_get_no_thread_and_a_scrape_still_answers(collector) -> None:
    port = collector.metrics_port
    threads_before = threading.active_count()
    idle = open_half_sent(port, 300)
    try:
        status, body = get(collector.metrics_url)  # accepted after all 300: they are all in
        assert status == 200 and b"thermoscope_collector_info" in body
        # no thread per connection: the workers that answer complete requests, and no more
        assert threading.active_count() - threads_before <= HttpLimits().workers
        # the server, not the client, ends each of them: at the timeout, or to make room earlier
        assert all(closed_by_server(s) for s in idle)
        assert get(collector.metrics_url)[0] == 200
    finally:
        for s in idle:
            s.close()


def test_a_client_that_sends_its_head_too_slowly_is_closed_unanswered() -> None:
    server, _ = start_metrics_server("127.0.0.1", 0, hello_app, limits=HttpLimits(timeout=1.0))
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=30) as slow:
            slow.sendall(HALF_SENT)
            closed = False
            for _ in range(100):  # a header line every 0.2 s: each read is quick, the head never ends
                time.sleep(0.2)
                try:
                    slow.sendall(b"X-Slow: yes\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
            assert closed or closed_by_server(slow)
        # a client that sends its request at once is answered
        assert get(f"http://127.0.0.1:{server.server_port}/metrics") == (200, b"hello\n")
    finally:
        server.shutdown()
        server.server_close()


def test_beyond_max_connections_the_oldest_unfinished_request_makes_room() -> None:
    limits = HttpLimits(timeout=60.0, max_connections=8)
    server, _ = start_metrics_server("127.0.0.1", 0, hello_app, limits=limits)
    try:
        idle = open_half_sent(server.server_port, 8)
        assert get(f"http://127.0.0.1:{server.server_port}/metrics") == (200, b"hello\n")
        assert closed_by_server(idle[0], within=10.0)  # long before its 60 s timeout
        more = open_half_sent(server.server_port, 20)
        assert get(f"http://127.0.0.1:{server.server_port}/metrics") == (200, b"hello\n")
        assert sum(closed_by_server(s, within=0.5) for s in idle + more) >= len(idle + more) - 8
        for s in idle + more:
            s.close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_request_head_over_the_limit_is_answered_431_and_closed() -> None:
    server, _ = start_metrics_server("127.0.0.1", 0, hello_app, limits=HttpLimits(max_head_bytes=1024))
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=30) as s:
            s.sendall(HALF_SENT + b"X-Long: " + b"a" * 2000 + b"\r\n\r\n")
            assert s.recv(1024).startswith(b"HTTP/1.0 431 Request Header Fields Too Large\r\n")
            assert closed_by_server(s)
        assert get(f"http://127.0.0.1:{server.server_port}/metrics") == (200, b"hello\n")
    finally:
        server.shutdown()
        server.server_close()


def test_tls_clients_that_never_handshake_or_never_finish_do_not_stop_scrapes(pki, tmp_path) -> None:
    security = Security(metrics_tls_cert=pki.server_cert, metrics_tls_key=pki.server_key)
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, security=security).running() as c:
        context = ssl.create_default_context(cafile=str(pki.ca))
        silent = [socket.create_connection(("127.0.0.1", c.metrics_port), timeout=30) for _ in range(50)]
        half = []
        for _ in range(50):
            s = context.wrap_socket(
                socket.create_connection(("127.0.0.1", c.metrics_port), timeout=30),
                server_hostname="localhost",
            )
            s.sendall(HALF_SENT)
            half.append(s)
        status, body = get(c.metrics_url, context=context)
        assert status == 200 and b"thermoscope_collector_info" in body
        assert all(closed_by_server(s) for s in silent + half)
        for s in silent + half:
            s.close()


BIG_PAGE = b"x" * 8_000_000  # more than the kernel's buffers of a connection hold (tcp_wmem's 4 MiB)


def big_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [BIG_PAGE]


def open_never_reading(port: int, n: int) -> list[socket.socket]:
    """`n` clients that send a whole request and never read the answer (a small receive buffer)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(30)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        socks.append(s)
    return socks


def read_to_the_end(s: socket.socket) -> int:
    """Bytes `s` receives until the server closes it."""
    got = 0
    try:
        while chunk := s.recv(1 << 20):
            got += len(chunk)
    except ConnectionResetError:
        pass
    return got


def test_clients_that_never_read_their_answer_hold_no_worker_and_a_scrape_still_answers() -> None:
    limits = HttpLimits(timeout=60.0)  # before, each held a worker up to 60 s at each write
    server, _ = start_metrics_server("127.0.0.1", 0, big_app, limits=limits)
    try:
        stuck = open_never_reading(server.server_port, 5 * limits.workers)
        time.sleep(1.0)  # their requests are in, and answered as far as they read
        assert get(f"http://127.0.0.1:{server.server_port}/metrics") == (200, BIG_PAGE)
        assert get(f"http://127.0.0.1:{server.server_port}/metrics") == (200, BIG_PAGE)
        for s in stuck:
            s.close()
    finally:
        server.shutdown()
        server.server_close()


def test_answers_held_for_clients_that_do_not_read_are_bounded_and_the_oldest_is_dropped() -> None:
    limits = HttpLimits(timeout=60.0, max_buffered_bytes=3 * len(BIG_PAGE))
    server, _ = start_metrics_server("127.0.0.1", 0, big_app, limits=limits)
    try:
        stuck = open_never_reading(server.server_port, 10)
        time.sleep(1.0)  # their answers are written, and all but the 3 the bound holds dropped
        assert get(f"http://127.0.0.1:{server.server_port}/metrics") == (200, BIG_PAGE)
        # the dropped ones got less than the page, long before their 60 s timeout: read to the end
        received = [read_to_the_end(s) for s in stuck]
        assert sum(got < len(BIG_PAGE) for got in received) >= 10 - 3, received
        for s in stuck:
            s.close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_that_stops_reading_its_answer_is_closed_at_the_timeout() -> None:
    server, _ = start_metrics_server("127.0.0.1", 0, big_app, limits=HttpLimits(timeout=1.0))
    try:
        (stuck,) = open_never_reading(server.server_port, 1)
        time.sleep(3.0)  # it read nothing for longer than the timeout
        assert 0 < read_to_the_end(stuck) < len(BIG_PAGE)
        stuck.close()
        assert get(f"http://127.0.0.1:{server.server_port}/metrics") == (200, BIG_PAGE)
    finally:
        server.shutdown()
        server.server_close()


# -- passwords ----------------------------------------------------------------------------------------


def users_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "users"
    path.write_text("\n".join(lines) + "\n")
    return path


def auth_counters(url: str, user_password: str) -> tuple[float, dict[str, float]]:
    """(passwords hashed, refusals by reason), read from /metrics with the right password."""
    status, body = get(url, user_password)
    assert status == 200
    scraped = samples(body)
    failures = {
        dict(labels)["reason"]: value
        for (name, labels), value in scraped.items()
        if name == "thermoscope_metrics_auth_failures_total"
    }
    return scraped[("thermoscope_metrics_password_checks_total", frozenset())], failures


def test_wrong_passwords_beyond_a_small_burst_are_refused_without_hashing(tmp_path) -> None:
    users = users_file(tmp_path, f"prometheus:{hash_password('s3cret', rounds=4)}")
    security = Security(metrics_basic_auth=users)
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, security=security).running() as c:
        assert get(c.metrics_url, "prometheus:s3cret")[0] == 200
        hashes, failures = auth_counters(c.metrics_url, "prometheus:s3cret")
        assert hashes == 1  # verified once; the counters' own scrape was not hashed again
        assert failures == {"missing": 0, "wrong": 0, "rate_limited": 0}

        started = time.monotonic()
        statuses = [get(c.metrics_url, f"prometheus:guess{i}")[0] for i in range(40)]
        elapsed = time.monotonic() - started
        hashes, failures = auth_counters(c.metrics_url, "prometheus:s3cret")
        budget = FAILURE_BURST + math.ceil(elapsed * FAILURE_REFILL_PER_S)  # what the bucket let through
        assert set(statuses) <= {401, 429}
        assert hashes - 1 == statuses.count(401) <= budget  # one hash per 401, none per 429
        assert statuses.count(429) >= 40 - budget
        assert failures["wrong"] == statuses.count(401)
        assert failures["rate_limited"] == statuses.count(429)

        # the address is refused hashing now; the verified pair still gets in, and is not hashed again
        assert get(c.metrics_url, "prometheus:s3cret")[0] == 200
        assert auth_counters(c.metrics_url, "prometheus:s3cret")[0] == hashes
        assert get(c.metrics_url)[0] == 401  # no credentials: no hash either
        assert auth_counters(c.metrics_url, "prometheus:s3cret") == (hashes, failures | {"missing": 1})


def test_a_rate_limited_client_is_told_when_to_come_back(tmp_path) -> None:
    users = users_file(tmp_path, f"prometheus:{hash_password('s3cret', rounds=4)}")
    with Collector(
        "127.0.0.1:0", "127.0.0.1:0", db=None, security=Security(metrics_basic_auth=users)
    ).running() as c:
        for _ in range(FAILURE_BURST):
            assert get(c.metrics_url, "prometheus:wrong")[0] in (401, 429)
        request = urllib.request.Request(c.metrics_url)
        request.add_header("Authorization", "Basic " + base64.b64encode(b"prometheus:wrong").decode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 429
        assert 1 <= int(refused.value.headers["Retry-After"]) <= math.ceil(1 / FAILURE_REFILL_PER_S)


def test_bcrypt_lines_as_htpasswd_writes_them_and_pbkdf2_lines_of_earlier_versions_log_in(tmp_path) -> None:
    salt = bytes(range(16))  # the line `thermoscope hash-password` printed before it wrote bcrypt
    digest = hashlib.pbkdf2_hmac("sha256", b"old-s3cret", salt, 1000)
    htpasswd = bcrypt.hashpw(b"new-s3cret", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)
    users = users_file(
        tmp_path,
        "# one user of each format",
        f"legacy:pbkdf2_sha256$1000${salt.hex()}${digest.hex()}",
        f"grafana:{htpasswd}",  # what `htpasswd -nB grafana` prints
        f"prometheus:{hash_password('s3cret', rounds=4)}",
    )
    with Collector(
        "127.0.0.1:0", "127.0.0.1:0", db=None, security=Security(metrics_basic_auth=users)
    ).running() as c:
        for right in ("legacy:old-s3cret", "grafana:new-s3cret", "prometheus:s3cret"):
            assert get(c.metrics_url, right)[0] == 200, right
        for wrong in ("legacy:new-s3cret", "grafana:old-s3cret", "nobody:s3cret"):
            assert get(c.metrics_url, wrong)[0] == 401, wrong


def test_hash_password_writes_a_bcrypt_line(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(getpass, "getpass", lambda prompt: "s3cret")  # what the user types, unechoed
    assert main(["hash-password", "prometheus"]) == 0
    line = capsys.readouterr().out.strip()
    user, hashed = line.split(":", 1)
    assert user == "prometheus" and hashed.startswith("$2b$") and len(hashed) == 60
    loaded = BasicAuthUsers.load(users_file(tmp_path, line))
    assert loaded.check("prometheus", "s3cret")
    assert not loaded.check("prometheus", "s3cret!")


def test_hash_password_refuses_a_password_bcrypt_would_cut(monkeypatch, capsys) -> None:
    monkeypatch.setattr(getpass, "getpass", lambda prompt: "x" * 73)
    with pytest.raises(SystemExit, match="72 bytes"):
        main(["hash-password", "prometheus"])
    assert capsys.readouterr().out == ""


def test_a_malformed_hash_names_the_line_and_the_formats(tmp_path) -> None:
    from thermoscope.collector.credentials import AuthConfigError

    with pytest.raises(AuthConfigError, match=r"user 'prometheus'.*\$2b\$.*pbkdf2_sha256"):
        BasicAuthUsers.load(users_file(tmp_path, "prometheus:$2b$10$short"))


def from_address(port: int, source: str, user_password: str) -> int:
    """The status of a GET /metrics with basic auth, sent from the loopback address `source`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        token = base64.b64encode(user_password.encode()).decode()
        connection.request("GET", "/metrics", headers={"Authorization": f"Basic {token}"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_guesses_from_many_addresses_share_one_hashing_budget_and_a_verified_scraper_stays_in(
    tmp_path,
) -> None:
    users = users_file(tmp_path, f"prometheus:{hash_password('s3cret', rounds=4)}")
    with Collector(
        "127.0.0.1:0", "127.0.0.1:0", db=None, security=Security(metrics_basic_auth=users)
    ).running() as c:
        assert get(c.metrics_url, "prometheus:s3cret")[0] == 200  # the scraper, verified once
        started = time.monotonic()
        statuses, scraper = [], []
        for i in range(FAILURE_BURST):  # each of 120 addresses 127.0.0.2.. within its own burst
            for n in range(2, 122):
                statuses.append(from_address(c.metrics_port, f"127.0.0.{n}", f"prometheus:guess{i}-{n}"))
            # a flood from the scraper's own address too; the scraper is answered from memory
            statuses += [
                from_address(c.metrics_port, "127.0.0.1", f"prometheus:own{i}-{j}") for j in range(5)
            ]
            scraper.append(get(c.metrics_url, "prometheus:s3cret")[0])
        elapsed = time.monotonic() - started
        hashes, failures = auth_counters(c.metrics_url, "prometheus:s3cret")
    assert scraper == [200] * FAILURE_BURST
    assert set(statuses) <= {401, 429} and len(statuses) == 625
    budget = GLOBAL_BURST + math.ceil(elapsed * GLOBAL_REFILL_PER_S)  # what the shared bucket let through
    assert hashes - 1 == statuses.count(401) <= budget  # before: 625, each address within its own burst
    assert failures["rate_limited"] == statuses.count(429) >= 625 - budget
