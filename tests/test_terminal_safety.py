"""`thermoscope top` and `thermoscope events` against hostile values and hostile servers.

Values agents wrote (job ids, layer names) reach the terminal as plain text: rich markup in them
is not parsed (a job id `[/]` crashed both commands with MarkupError) and their control
characters are stripped (an escape sequence set the window title and cleared the screen). `top`
does not follow a redirect (urllib sent the basic-auth credentials along to wherever it
pointed) and reads a page up to `MAX_PAGE` bytes (an endless one grew it to 3 GB in 3 s).

The servers here are real HTTP servers on 127.0.0.1 answering as a hostile or broken collector
would; the commands run as a user runs them, in their own process.
"""

from __future__ import annotations

import http.server
import resource
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from thermoscope.collector.state.store import Event, EventStore

from helpers.processes import thermoscope

#: Label values an agent could have chosen: rich markup, and escape sequences that set the
#: window title (OSC 0), clear the screen (CSI 2J) and use the C1 form of CSI.
HOSTILE_JOB = "[/]"
ESCAPES = "evil\x1b]0;pwned\x07\x1b[2J\x9b2J"


def page(*jobs: str) -> bytes:
    lines = ["# TYPE thermoscope_last_step gauge"]
    lines += [f'thermoscope_last_step{{job_id="{job}"}} 7' for job in jobs]
    lines += ["# TYPE thermoscope_phase gauge"]
    lines += [
        f'thermoscope_phase{{job_id="{job}",scope="layer",layer="{ESCAPES}",phase="{ESCAPES}"}} 1'
        for job in jobs
    ]
    return ("\n".join(lines) + "\n").encode()


@contextmanager
def serving(answer: Callable[[http.server.BaseHTTPRequestHandler], None]) -> Iterator[tuple[str, list]]:
    """An HTTP server on 127.0.0.1 whose every GET `answer` handles: (its /metrics URL, the
    `Authorization` headers it received)."""
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            with suppress(BrokenPipeError, ConnectionResetError):
                answer(self)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics", seen
    finally:
        server.shutdown()
        server.server_close()


def send(body: bytes) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def answer(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/plain; version=0.0.4")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return answer


def test_top_shows_markup_and_escape_sequences_in_labels_as_plain_text() -> None:
    with serving(send(page(HOSTILE_JOB, "fine"))) as (url, _):
        shown = thermoscope("top", "--collector", url, "--once", timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "MarkupError" not in shown.stderr and "Traceback" not in shown.stderr
    rows = [line for line in shown.stdout.splitlines() if line.startswith((HOSTILE_JOB, "fine"))]
    # job, phase, ranks ("0 live"), step
    assert [row.split()[:5] for row in rows] == [
        [HOSTILE_JOB, "—", "0", "live", "7"],
        ["fine", "—", "0", "live", "7"],
    ]
    assert "\x1b" not in shown.stdout and "\x9b" not in shown.stdout and "\x07" not in shown.stdout


def test_events_shows_markup_and_escape_sequences_in_stored_names_as_plain_text(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    store = EventStore(db)
    store.add([
        Event(HOSTILE_JOB, "job", "", 10, 1000.0, "type_i", "transition", "energy_slope_t", 0.9),
        Event(ESCAPES, "layer", ESCAPES, 12, 1001.0, "type_i", "transition", "entropy_rate", 0.6),
    ])  # fmt: skip
    store.close()
    table = thermoscope("events", "--db", str(db), timeout=60)
    assert table.returncode == 0, table.stderr
    assert "Traceback" not in table.stderr
    assert HOSTILE_JOB in table.stdout and "evil]0;pwned" in table.stdout
    assert "\x1b" not in table.stdout and "\x9b" not in table.stdout and "\x07" not in table.stdout


def test_top_does_not_follow_a_redirect_with_its_credentials(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    with serving(send(page("elsewhere"))) as (other, received):

        def redirect(h: http.server.BaseHTTPRequestHandler) -> None:
            h.send_response(302)
            h.send_header("Location", other)
            h.send_header("Content-Length", "0")
            h.end_headers()

        with serving(redirect) as (url, asked):
            shown = thermoscope(
                "top", "--collector", url, "--once", "--basic-auth-user", "prometheus",
                "--basic-auth-password-file", str(password), timeout=60,
            )  # fmt: skip
    assert len(asked) == 1 and asked[0] is not None and asked[0].startswith("Basic ")
    assert received == []  # the other port never saw the request, let alone the credentials
    assert shown.returncode == 1
    assert "302" in shown.stderr and other in shown.stderr and "not followed" in shown.stderr


def limit_memory() -> None:
    """In the child, before it runs: at most 2 GiB of address space (an unbounded read fails)."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def test_top_refuses_an_endless_page_instead_of_holding_it() -> None:
    chunk = b"# an endless comment line, again and again\n" * 20_000

    def endless(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.end_headers()
        while True:
            h.wfile.write(chunk)

    with serving(endless) as (url, _):
        shown = subprocess.run(
            [sys.executable, "-m", "thermoscope.cli", "top", "--collector", url, "--once"],
            capture_output=True, text=True, timeout=120, preexec_fn=limit_memory,
        )  # fmt: skip
    assert shown.returncode == 1, shown.stderr[-2000:]
    assert "over 64 MiB" in shown.stderr and "Traceback" not in shown.stderr
