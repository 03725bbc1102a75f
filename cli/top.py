"""`thermoscope top`: a live terminal view of a collector's jobs, refreshed in place.

It reads the collector's `/metrics`, not a private endpoint, because that page is what is
reachable wherever Prometheus scrapes from: over HTTPS against a CA (`--tls-ca`) and with basic
auth (`--basic-auth-user`, `--basic-auth-password-file`, named as in Prometheus' `basic_auth`).
It asks only for the families it shows (`name[]`), so a collector of many large jobs sends a
small page. What the page does not hold, `top` derives from two successive reads: the entropy
change per step, and which layers changed phase (the collector exports each layer's current
phase, not its history), so those appear from the second read on.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import math
import os
import select
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.cells import cell_len
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from thermoscope.collector.settings import DEFAULTS
from thermoscope.wire.contract import split_address

from .plain import plain

#: The families `top` asks the collector for, and reads.
FAMILIES = (
    "thermoscope_energy",
    "thermoscope_temperature",
    "thermoscope_temperature_stderr",
    "thermoscope_site_efficiency_quantile_ratio",
    "thermoscope_entropy_nats",
    "thermoscope_last_step",
    "thermoscope_agents_connected",
    "thermoscope_rank_stale",
    "thermoscope_phase",
    "thermoscope_job_paused",
    "thermoscope_finding",
)
#: Sort orders: the key that selects each, and what the title calls it.
SORTS = {"job": "j", "temperature": "t", "entropy": "s"}
_TITLES = {"job": "job", "temperature": "temperature", "entropy": "entropy change"}
#: Layer phase changes shown per job, most recent first.
RECENT = 3
#: The longest page `top` reads (bytes): its families of a collector at its bounds are far less;
#: a longer (or endless) one is refused, not held.
MAX_PAGE = 64 << 20
#: What a user who gave another port (the gRPC one a `Monitor` was given) is told to give instead.
NOT_METRICS = (
    f"give --collector the collector's metrics address (its --metrics, default {DEFAULTS.metrics}), "
    "not the gRPC one agents stream to"
)


class TopError(Exception):
    """The collector cannot be read, and retrying will not change that (auth, TLS, not a page)."""


class Unreachable(Exception):
    """The collector did not answer this time (refused, timed out): the live view retries."""


@dataclass
class Job:
    """One job as one read of /metrics shows it; NaN where the page has no value."""

    job_id: str
    phase: str = ""
    step: float = math.nan
    energy: float = math.nan
    temperature: float = math.nan
    temperature_stderr: float = math.nan
    efficiency: float = math.nan
    entropy: float = math.nan
    connected: int = 0
    stale: int = 0
    paused: bool = False
    run: str = ""  # the run its agents named (a Ray Train run's name), where the page says it
    layer_phases: dict[str, str] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)  # "name layer" of each finding that holds


_GAUGES = {
    "thermoscope_energy": "energy",
    "thermoscope_temperature": "temperature",
    "thermoscope_temperature_stderr": "temperature_stderr",
    "thermoscope_entropy_nats": "entropy",
    "thermoscope_last_step": "step",
}


def parse(text: str) -> dict[str, Job]:
    """The jobs of a /metrics page (text format 0.0.4), by job id."""
    jobs: dict[str, Job] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            job_id = sample.labels.get("job_id")
            if job_id is None:
                continue
            job = jobs.setdefault(job_id, Job(job_id))
            if sample.name in _GAUGES:
                setattr(job, _GAUGES[sample.name], sample.value)
            elif (
                sample.name == "thermoscope_site_efficiency_quantile_ratio"
                and sample.labels.get("q") == "0.5"
            ):
                job.efficiency = sample.value  # the median site efficiency
            elif sample.name == "thermoscope_agents_connected":
                job.connected = int(sample.value)
            elif sample.name == "thermoscope_run_info":
                job.run = sample.labels.get("run", "")
            elif sample.name == "thermoscope_job_paused":
                job.paused = sample.value == 1
            elif sample.name == "thermoscope_rank_stale":
                job.stale += int(sample.value == 1)
            elif sample.name == "thermoscope_phase" and sample.value == 1:
                if sample.labels.get("scope") == "job":
                    job.phase = sample.labels["phase"]
                else:
                    job.layer_phases[sample.labels.get("layer", "")] = sample.labels["phase"]
            elif sample.name == "thermoscope_finding" and sample.value == 1:
                where = sample.labels.get("layer", "")
                job.findings.append(f"{sample.labels.get('finding', '')} {where}".strip())
    return jobs


@dataclass(frozen=True)
class Source:
    """Where and how to read /metrics."""

    url: str
    context: ssl.SSLContext | None
    authorization: str | None

    def read(self, timeout: float = 10.0, families: tuple[str, ...] = FAMILIES) -> dict[str, Job]:
        """The jobs of one read of the page's `families` (`TopError`, `Unreachable` if none). A
        redirect is not followed: the credentials would go with it to wherever it points."""
        query = urllib.parse.urlencode([("name[]", name) for name in families])
        request = urllib.request.Request(f"{self.url}?{query}")
        if self.authorization is not None:
            request.add_header("Authorization", self.authorization)
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=self.context), _NoRedirect)
        try:
            with opener.open(request, timeout=timeout) as response:
                body = response.read(MAX_PAGE + 1)
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                given = "was refused" if self.authorization else "is needed"
                raise TopError(
                    f"{self.url} answered 401 Unauthorized: basic auth {given} "
                    "(--basic-auth-user USER --basic-auth-password-file FILE)"
                ) from None
            if 300 <= exc.code < 400:
                raise TopError(
                    f"{self.url} answered {exc.code}, a redirect to {exc.headers.get('Location')!r}: "
                    "not followed (give --collector the address it names)"
                ) from None
            raise TopError(f"{self.url} answered {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise TopError(
                    f"{self.url}: its TLS certificate is not trusted ({exc.reason.verify_message}); "
                    "give the CA that signed it with --tls-ca PEM"
                ) from None
            if isinstance(exc.reason, ssl.SSLError):
                raise TopError(f"{self.url}: TLS failed ({exc.reason})") from None
            raise Unreachable(f"cannot reach {self.url}: {exc.reason}") from None
        except (TimeoutError, ConnectionError) as exc:
            raise Unreachable(f"cannot reach {self.url}: {exc}") from None
        except http.client.HTTPException:  # not HTTP/1.1: a gRPC port (HTTP/2) answers its own frames
            raise TopError(f"{self.url} is not a /metrics endpoint: {NOT_METRICS}") from None
        if len(body) > MAX_PAGE:
            raise TopError(f"{self.url} sent a page over {MAX_PAGE >> 20} MiB: not a collector's, not read")
        text = body.decode(errors="replace")
        try:
            return parse(text)
        except ValueError as exc:
            raise TopError(f"{self.url} is not a /metrics endpoint ({exc}): {NOT_METRICS}") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are answers, not followed (urllib would send the `Authorization` header along)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl) -> None:  # type: ignore[override]
        return None


@dataclass
class Change:
    """A layer's phase change seen between two reads."""

    layer: str
    before: str
    after: str
    seen: float


class Board:
    """What successive reads show together: each job's latest read, its entropy change per step
    (between the last two reads whose steps differ) and its layers' latest phase changes."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.entropy_change: dict[str, float] = {}
        self.changes: dict[str, deque[Change]] = defaultdict(lambda: deque(maxlen=RECENT))

    def update(self, jobs: dict[str, Job], now: float) -> None:
        for job_id, job in jobs.items():
            before = self.jobs.get(job_id)
            if before is not None:
                if job.step > before.step:
                    self.entropy_change[job_id] = (job.entropy - before.entropy) / (job.step - before.step)
                for layer, phase in job.layer_phases.items():
                    old = before.layer_phases.get(layer)
                    if old is not None and old != phase:
                        self.changes[job_id].appendleft(Change(layer, old, phase, now))
        self.jobs = jobs

    def ordered(self, sort: str) -> list[Job]:
        """The jobs in `sort` order: by id, or the highest temperature (the largest entropy
        change per step, either sign) first; undefined values last."""
        jobs = sorted(self.jobs.values(), key=lambda j: j.job_id)
        if sort == "job":
            return jobs

        def key(job: Job) -> float:
            x = (
                job.temperature
                if sort == "temperature"
                else abs(self.entropy_change.get(job.job_id, math.nan))
            )
            return -math.inf if math.isnan(x) else x

        return sorted(jobs, key=key, reverse=True)


def _number(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.4g}"


#: The gap between two columns, in cells.
GAP = 2


@dataclass(frozen=True)
class Column:
    """One column of the jobs' table; `cell` makes a job's cell of it."""

    name: str
    justify: str
    cell: Callable[[Job, Board], Text]


def ranks(job: Job) -> Text:
    """Live ranks, and the stale ones and a pause marked: a paused job's quiet ranks look live."""
    text = Text(f"{job.connected} live")
    if job.stale:
        text.append(f", {job.stale} stale", "yellow")
    if job.paused:
        text = Text("paused", "cyan").append(", ").append_text(text)
    return text


def _entropy_change(job: Job, board: Board) -> Text:
    return Text(_number(board.entropy_change.get(job.job_id, math.nan)))


def _temperature(job: Job, board: Board) -> Text:
    shown = _number(job.temperature)
    if not math.isnan(job.temperature):
        shown += f" ± {job.temperature_stderr:.2g}"  # an error's third digit is noise
    return Text(shown)


#: The columns in the order they are dropped last to first as the terminal narrows: the job id
#: and its phase are always shown whole, then whether its ranks stream, then its readings.
COLUMNS = (
    Column("job", "left", lambda job, board: plain(job.job_id)),
    Column("phase", "left", lambda job, board: plain(job.phase or "—")),
    Column("ranks", "left", lambda job, board: ranks(job)),
    Column("step", "right", lambda job, board: Text("—" if math.isnan(job.step) else str(int(job.step)))),
    Column("temperature", "right", _temperature),
    Column("energy", "right", lambda job, board: Text(_number(job.energy))),
    Column("ΔS/step", "right", _entropy_change),
    Column("efficiency", "right", lambda job, board: Text(_number(job.efficiency))),
)
#: The columns shown however narrow the terminal is (wrapped there, never cut).
KEPT = 2


def fitting(cells: list[list[Text]], width: int) -> int:
    """How many of `COLUMNS` (from the first) fit in `width` cells, `KEPT` at least."""
    used = 0
    for n, column in enumerate(COLUMNS):
        wide = max([len(column.name), *(cell_len(row[n].plain) for row in cells)])
        used += wide + (GAP if n else 0)
        if used > width and n >= KEPT:
            return n
    return len(COLUMNS)


def view(
    board: Board, sort: str, source: Source, now: float, problem: str | None = None, width: int = 80
) -> Group:
    """The screen for a terminal `width` cells wide: a title, the jobs (the columns that fit),
    the layers that changed phase below them, and the last read's problem, if any."""
    keys = "  ".join(f"{key}: {_TITLES[name]}" for name, key in SORTS.items())
    title = plain(f"thermoscope top  {source.url}  sorted by {_TITLES[sort]}", "bold")
    parts: list[Text | Table] = [title, Text(f"keys  {keys}  q: quit", "dim")]
    jobs = board.ordered(sort)
    if not jobs:
        parts.append(Text("no job yet"))
    else:
        # the page's labels as plain text: no markup, no escape sequences
        cells = [[column.cell(job, board) for column in COLUMNS] for job in jobs]
        shown = fitting(cells, width)
        table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, GAP, 0, 0), expand=False)
        for column in COLUMNS[:shown]:
            whole = column.name in ("job", "phase")  # folded onto a second line, never cut
            table.add_column(column.name, justify=column.justify, overflow="fold" if whole else "ellipsis")
        for row in cells:
            table.add_row(*row[:shown])
        parts.append(table)
        held = [(job.job_id, finding) for job in jobs for finding in job.findings]
        if held:
            parts.append(Text("findings that hold (docs/findings.md)", "bold"))
            parts.extend(plain(f"{job_id}: {finding}") for job_id, finding in held)
        changes = [(job.job_id, c) for job in jobs for c in board.changes[job.job_id]]
        if changes:
            parts.append(Text("layers that changed phase, latest first", "bold"))
            parts.extend(
                plain(f"{job_id}: {c.layer} {c.before}→{c.after} ({now - c.seen:.0f}s ago)")
                for job_id, c in changes
            )
    if problem is not None:
        parts.append(plain(problem, "red"))
    return Group(*parts)


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """The `top` command and its flags."""
    t = sub.add_parser(
        "top",
        help="a live view of a collector's jobs (read from its /metrics)",
        description="Each job's phase, energy, temperature with its standard error, efficiency, ranks "
        "live and stale, the findings that hold (docs/findings.md), and the layers that changed phase "
        "most recently, refreshed in place. "
        "Keys: t sorts by temperature, s by entropy change, j by job; q quits.",
    )
    reading_arguments(t)
    t.add_argument("--job", action="append", metavar="ID", help="only this job (repeat for several)")
    t.add_argument("--sort", choices=tuple(SORTS), default="job", help="the first sort order (default job)")
    t.add_argument(
        "--interval", type=_interval, default=2.0, metavar="S", help="seconds between reads (default 2)"
    )
    t.add_argument("--once", action="store_true", help="print the table once and exit")
    t.add_argument("--iterations", type=_iterations, metavar="N", help="exit after N reads")


def reading_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say where and how to read a collector's /metrics (`top`'s, `jobs`')."""
    parser.add_argument(
        "--collector",
        default=DEFAULTS.metrics,
        metavar="ADDR",
        help=f"the collector's /metrics: HOST:PORT or a URL (default {DEFAULTS.metrics})",
    )
    parser.add_argument(
        "--tls-ca", metavar="PEM", help="the CA that signed the collector's /metrics certificate (HTTPS)"
    )
    parser.add_argument("--basic-auth-user", metavar="USER", help="basic auth of /metrics: the user")
    parser.add_argument(
        "--basic-auth-password-file",
        metavar="FILE",
        help="basic auth of /metrics: a file holding the password",
    )


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _iterations(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def source(args: argparse.Namespace, p: argparse.ArgumentParser, command: str = "top") -> Source:
    """The `Source` of the flags (`reading_arguments`); a bad combination or an unreadable file:
    `p.error`, naming `command`."""
    url = args.collector if "://" in args.collector else None
    if url is None:
        try:
            host, port = split_address(args.collector)
        except ValueError as exc:
            p.error(f"{command}: --collector: {exc} (or give a URL)")
        host = f"[{host}]" if ":" in host else host
        url = f"{'https' if args.tls_ca else 'http'}://{host}:{port}/metrics"
    elif urllib.parse.urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + "/metrics"
    if (args.basic_auth_user is None) != (args.basic_auth_password_file is None):
        p.error(f"{command}: --basic-auth-user and --basic-auth-password-file go together")
    authorization = None
    if args.basic_auth_user is not None:
        try:
            password = Path(args.basic_auth_password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            p.error(f"{command}: --basic-auth-password-file: cannot read {exc.filename}: {exc.strerror}")
        token = base64.b64encode(f"{args.basic_auth_user}:{password}".encode()).decode()
        authorization = f"Basic {token}"
    context = None
    if url.startswith("https://"):
        try:
            context = ssl.create_default_context(cafile=args.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            p.error(f"{command}: --tls-ca: cannot use {args.tls_ca}: {exc}")
    return Source(url, context, authorization)


def main(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """`thermoscope top`: 0 when quit (or after --once, --iterations), 1 when the collector
    cannot be read (a reason on stderr)."""
    src = source(args, p)
    wanted = set(args.job) if args.job else None
    board, sort = Board(), args.sort
    console = Console()
    if not console.is_terminal:  # a pipe or a file: whole lines, not cut at 80 columns
        console = Console(width=1000)

    def screen(problem: str | None = None) -> Group:
        return view(board, sort, src, time.time(), problem, console.width)

    def read() -> None:
        jobs = src.read()
        board.update(jobs if wanted is None else {k: v for k, v in jobs.items() if k in wanted}, time.time())

    try:
        if args.once:
            try:
                read()
            except Unreachable as exc:
                raise TopError(str(exc)) from None
            console.print(screen())
            return 0
        reads = 0
        with _keys() as keys, Live(console=console, auto_refresh=False) as live:
            while True:
                problem = None
                try:
                    read()
                except Unreachable as exc:
                    problem = f"{exc} (retrying every {args.interval:g} s)"
                reads += 1
                live.update(screen(problem), refresh=True)
                if args.iterations is not None and reads >= args.iterations:
                    return 0
                deadline = time.monotonic() + args.interval
                while (left := deadline - time.monotonic()) > 0:
                    key = keys(left)
                    if key == "q":
                        return 0
                    for name, k in SORTS.items():
                        if key == k:
                            sort = name
                            live.update(screen(problem), refresh=True)
    except TopError as exc:
        print(f"thermoscope top: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


@contextlib.contextmanager
def _keys() -> Iterator:
    """`wait(timeout) -> key or None`: one key typed on the terminal, read without Enter.

    Where stdin is not a terminal (a pipe, /dev/null) there are no keys: it only waits."""
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():

        def wait(timeout: float) -> str | None:
            time.sleep(timeout)
            return None

        yield wait
        return
    import termios
    import tty

    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read_key(timeout: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="replace") if ready else None

    try:
        yield read_key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
