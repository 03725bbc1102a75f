"""/metrics under hostile clients, against `thermoscope collector` processes on loopback.

Run it as a script (pytest does not collect it):

    python tests/bench/bench_metrics_http.py [--formats pbkdf2,bcrypt] [--idle 250,500,1012,2000,4000]

1. Passwords: the CPU seconds the collector spends on 100 wrong basic-auth passwords sent in a row
   by one client, for each format of the users file (PBKDF2 at 200,000 rounds, bcrypt at cost 10),
   the answers it gave, and whether the right password still gets in afterwards.
2. Idle clients: N half-sent requests (`GET /metrics HTTP/1.1` and never the blank line that ends
   the head) opened first, the collector run with a limit of 1,024 file descriptors, then one
   scrape: its status and time, the collector's threads and open file descriptors.

Results: docs/security.md (#who-may-read-metrics-and-what-it-withstands).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import resource
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers.processes import start_collector_process

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def threads_and_fds(pid: int) -> tuple[int, int]:
    threads = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("Threads:")
    )
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def get(url: str, user_password: str | None, timeout: float = 30) -> int:
    request = urllib.request.Request(url)
    if user_password is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(user_password.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def pbkdf2_line(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 200_000)
    return f"pbkdf2_sha256$200000${salt.hex()}${digest.hex()}"


def bcrypt_line(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(10)).decode()


def passwords(fmt: str, tmp: Path) -> None:
    users = tmp / f"users-{fmt}"
    users.write_text(f"prometheus:{pbkdf2_line('s3cret') if fmt == 'pbkdf2' else bcrypt_line('s3cret')}\n")
    c = start_collector_process(tmp / f"{fmt}.db", None, "--metrics-basic-auth", str(users))
    try:
        assert get(c.metrics_url, "prometheus:s3cret") == 200
        time.sleep(0.5)
        before = cpu_seconds(c.proc.pid)
        started = time.monotonic()
        statuses = [get(c.metrics_url, f"prometheus:wrong{i}") for i in range(100)]
        wall = time.monotonic() - started
        spent = cpu_seconds(c.proc.pid) - before
        after_right = get(c.metrics_url, "prometheus:s3cret")
        codes = {code: statuses.count(code) for code in sorted(set(statuses))}
        print(
            f"{fmt}: 100 wrong passwords: {spent:.2f} CPU s in the collector ({wall:.2f} s wall), "
            f"answers {codes}; then the right password: {after_right}",
            flush=True,
        )
    finally:
        c.stop()


def limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def idle(n: int, tmp: Path) -> None:
    c = start_collector_process(tmp / f"idle{n}.db", None, preexec_fn=limit_fds)
    port = int(c.metrics_url.rsplit(":", 1)[1].split("/")[0])
    socks, failed = [], 0
    try:
        for _ in range(n):
            s = socket.socket()
            s.settimeout(3)
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(b"GET /metrics HTTP/1.1\r\n")
                socks.append(s)
            except OSError:
                failed += 1
                s.close()
        time.sleep(1.0)
        threads, fds = threads_and_fds(c.proc.pid)
        started = time.monotonic()
        try:
            status: int | str = get(c.metrics_url, None, timeout=30)
        except OSError as exc:
            status = f"failed ({exc})"
        took = time.monotonic() - started
        alive = c.proc.poll() is None
        print(
            f"{n} half-sent requests ({failed} could not connect): scrape {status} in {took:.2f} s; "
            f"collector threads {threads}, open fds {fds}, alive {alive}",
            flush=True,
        )
    finally:
        for s in socks:
            s.close()
        c.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", default="pbkdf2,bcrypt")
    parser.add_argument("--idle", default="250,500,1012,2000,4000")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in filter(None, args.formats.split(",")):
            passwords(fmt, Path(tmp))
        for n in filter(None, args.idle.split(",")):
            idle(int(n), Path(tmp))


if __name__ == "__main__":
    main()
