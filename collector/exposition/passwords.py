"""Who may read `/metrics`: basic auth against a password file, hashing as little as it can.

Basic auth (`--metrics-basic-auth FILE`): lines `USER:HASH`, or `USER:HASH:PREFIX,...` for a user
bound to jobs whose ids start with one of the prefixes (the web page and its API show it only
those; /metrics, which has no per-job view, refuses it), the HASH bcrypt (`$2b$`/`$2y$`/`$2a$`,
what `thermoscope hash-password USER` and `htpasswd -nB USER` print, and what Prometheus' own
web config takes) or `pbkdf2_sha256$ITERATIONS$SALT$HEX` (what earlier versions printed; still
read). A hash costs ~60 ms of CPU (bcrypt cost 10, PBKDF2 200,000 rounds) by design, so
`PasswordCheck` hashes as little as it can: a verified (user, password) pair is remembered (by a
keyed hash of the pair, never the password) and not hashed again, and each client address may
have `FAILURE_BURST` wrong passwords hashed, then one per `1 / FAILURE_REFILL_PER_S` seconds;
beyond that it is answered 429 at once. Before, every wrong password was hashed: 100 in a row
cost the collector 6.18 CPU seconds, now 0.35 (tests/bench/bench_metrics_http.py). The
addresses share one budget too (`GLOBAL_BURST`, `GLOBAL_REFILL_PER_S`): with buckets per
address alone, guesses from 120 loopback addresses had 600 hashed (33.6 CPU seconds); a
credential verified before is answered from memory whatever the budgets hold, so a flood,
even from the scraper's own address, never refuses it. What it
refused and hashed is counted in /metrics (`thermoscope_metrics_auth_failures_total{reason}`,
`thermoscope_metrics_password_checks_total`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from prometheus_client.core import CounterMetricFamily

from ..credentials import AuthConfigError, read_file

#: The cost `hash_password` writes: ~60 ms a hash on this project's machine, as PBKDF2's 200,000 rounds were.
BCRYPT_ROUNDS = 10
#: bcrypt reads no more of a password than this; longer ones are refused, not cut.
BCRYPT_MAX_BYTES = 72
#: Wrong passwords a client address may have hashed at once, and how many more per second.
FAILURE_BURST = 5
FAILURE_REFILL_PER_S = 0.2
#: Passwords not remembered that all addresses together may have hashed at once, and how many more
#: per second: at ~60 ms a hash, at most ~6% of a core however many addresses guess.
GLOBAL_BURST = 10
GLOBAL_REFILL_PER_S = 1.0
#: Verified (user, password) pairs remembered, and client addresses whose failures are tracked.
VERIFIED_PAIRS = 64
TRACKED_ADDRESSES = 4096
#: What `PasswordCheck.admit` says; all but OK are the reasons of `thermoscope_metrics_auth_failures_total`.
OK, MISSING, WRONG, RATE_LIMITED = "ok", "missing", "wrong", "rate_limited"
#: The WSGI environ key an admitted request's job prefixes go in (None: the user sees every job).
PREFIXES = "thermoscope.prefixes"

_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")


def hash_password(password: str, *, rounds: int = BCRYPT_ROUNDS) -> str:
    """A bcrypt hash (`$2b$...`): the part after `USER:` of a basic-auth file line.

    ValueError for a password longer than bcrypt reads (`BCRYPT_MAX_BYTES`), rather than a hash
    that any password with the same first 72 bytes would match."""
    secret = password.encode()
    if len(secret) > BCRYPT_MAX_BYTES:
        raise ValueError(f"a password of at most {BCRYPT_MAX_BYTES} bytes, please (bcrypt reads no more)")
    return bcrypt.hashpw(secret, bcrypt.gensalt(rounds)).decode()


@dataclass(frozen=True)
class _Bcrypt:
    hashed: bytes

    def verify(self, password: bytes) -> bool:
        return len(password) <= BCRYPT_MAX_BYTES and bcrypt.checkpw(password, self.hashed)


@dataclass(frozen=True)
class _Pbkdf2:
    iterations: int
    salt: bytes
    digest: bytes

    def verify(self, password: bytes) -> bool:
        got = hashlib.pbkdf2_hmac("sha256", password, self.salt, self.iterations)
        return hmac.compare_digest(got, self.digest)


def _parse_hash(text: str) -> _Bcrypt | _Pbkdf2:
    """The hash of a basic-auth line (ValueError if it is neither format)."""
    if _BCRYPT.fullmatch(text):
        return _Bcrypt(text.encode())
    kind, iterations, salt, digest = text.split("$")  # ValueError unless four fields
    if kind != "pbkdf2_sha256":
        raise ValueError(kind)
    return _Pbkdf2(int(iterations), bytes.fromhex(salt), bytes.fromhex(digest))


class BasicAuthUsers:
    """The users of a basic-auth file: `USER:HASH` lines (bcrypt or PBKDF2), `#` comments."""

    def __init__(self, users: dict[str, str], prefixes: dict[str, tuple[str, ...]] | None = None) -> None:
        """`users`: user -> hash (bcrypt, or `pbkdf2_sha256$ITERATIONS$SALT$HEX`); `prefixes`:
        user -> the job prefixes it is bound to (a user not in it sees every job)."""
        self._prefixes = dict(prefixes or {})
        self._users: dict[str, _Bcrypt | _Pbkdf2] = {}
        for user, text in users.items():
            try:
                self._users[user] = _parse_hash(text)
            except ValueError:
                raise AuthConfigError(
                    f"user {user!r}: expected a bcrypt hash ($2b$, $2y$ or $2a$, 60 characters) or "
                    "pbkdf2_sha256$ITERATIONS$SALT_HEX$DIGEST_HEX (thermoscope hash-password USER "
                    "prints one)"
                ) from None
        if not self._users:
            raise AuthConfigError("no users")
        self._dummy = next(iter(self._users.values()))

    @classmethod
    def load(cls, path: str | Path) -> BasicAuthUsers:
        text = read_file(path, "basic-auth file").decode()
        users, prefixes = {}, {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            user, sep, rest = line.partition(":")
            hashed, bound, scope = rest.partition(":")  # a hash holds no ':'
            if not sep or not user or user in users:
                why = "a user appears twice" if user in users else "expected USER:HASH or USER:HASH:PREFIXES"
                raise AuthConfigError(f"{path} line {number}: {why}")
            if bound:
                names = tuple(p.strip() for p in scope.split(","))
                if not all(names):
                    raise AuthConfigError(
                        f"{path} line {number}: expected job prefixes separated by commas after the hash"
                    )
                prefixes[user] = names
            users[user] = hashed
        try:
            return cls(users, prefixes)
        except AuthConfigError as exc:
            raise AuthConfigError(f"{path}: {exc}") from None

    def prefixes(self, user: str) -> tuple[str, ...] | None:
        """The job prefixes the user is bound to (None: every job)."""
        return self._prefixes.get(user)

    def check(self, user: str, password: str) -> bool:
        """True if the password is the user's; an unknown user costs the same hashing."""
        known = self._users.get(user)
        ok = (known or self._dummy).verify(password.encode())
        return ok and known is not None


def _credentials(header: str) -> tuple[str, str] | None:
    """(user, password) of a basic `Authorization` header, None if it carries none."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


class PasswordCheck:
    """Who may read /metrics: the users' hashes, behind a memory of verified pairs and a bucket of
    wrong guesses per client address, so that a hash runs only where it must.

    A scraper with the right password is hashed once, then remembered (up to `VERIFIED_PAIRS`
    pairs, the least recently seen forgotten first) by an HMAC of the pair under a key made at
    start, so the memory holds no password. A pair not remembered costs its address a token
    before it is hashed (given back if it is right): `FAILURE_BURST` tokens, refilled at
    `FAILURE_REFILL_PER_S` a second; an address without one is answered 429 without hashing.
    The last `TRACKED_ADDRESSES` addresses are tracked (one forgotten starts again with a full
    bucket). Every hash also costs a token of one bucket all addresses share (`GLOBAL_BURST`,
    refilled at `GLOBAL_REFILL_PER_S`), so many addresses cannot multiply the hashing.
    """

    def __init__(self, users: BasicAuthUsers) -> None:
        self.users = users
        self._key = os.urandom(32)
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when), oldest first
        self._shared = (float(GLOBAL_BURST), time.monotonic())  # every address's: (tokens, when)
        self._lock = threading.Lock()  # the HTTP workers check concurrently
        self.checks = 0  # passwords hashed against the users' hashes
        self.failures: Counter[str] = Counter({MISSING: 0, WRONG: 0, RATE_LIMITED: 0})

    def replace_users(self, users: BasicAuthUsers) -> None:
        """Check against `users` from now on (a reload): the verified pairs are forgotten, so a
        removed user or a changed password is refused at its next scrape."""
        with self._lock:
            self.users = users
            self._verified.clear()

    def admit(self, header: str, address: str) -> str:
        """`OK`, or why not (`MISSING`, `WRONG`, `RATE_LIMITED`), for an `Authorization` header
        from `address`."""
        pair = _credentials(header)
        if pair is None:
            return self._refuse(MISSING)
        user, password = pair
        secret = user.encode()
        key = hmac.digest(self._key, len(secret).to_bytes(4, "big") + secret + password.encode(), "sha256")
        with self._lock:
            if key in self._verified:
                self._verified.move_to_end(key)
                return OK
            if not self._take(address, 1.0):
                self.failures[RATE_LIMITED] += 1
                return RATE_LIMITED
            if not self._take_shared(1.0):
                self._take(address, -1.0)  # not hashed: the address keeps its token
                self.failures[RATE_LIMITED] += 1
                return RATE_LIMITED
            self.checks += 1
        ok = self.users.check(user, password)  # outside the lock: this is what costs
        with self._lock:
            if not ok:
                self.failures[WRONG] += 1
                return WRONG
            self._take(address, -1.0)  # a right password costs no token
            self._take_shared(-1.0)
            self._verified[key] = None
            if len(self._verified) > VERIFIED_PAIRS:
                self._verified.popitem(last=False)
            return OK

    def retry_after(self, address: str) -> int:
        """Whole seconds until `address` may have a password hashed again (at least 1)."""
        with self._lock:
            now = time.monotonic()
            tokens, shared = self._tokens(address, now), self._shared_tokens(now)
        return max(
            1,
            math.ceil((1.0 - tokens) / FAILURE_REFILL_PER_S),
            math.ceil((1.0 - shared) / GLOBAL_REFILL_PER_S),
        )

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The counters, as a prometheus_client collector (`Guard.register_metrics`)."""
        failures = CounterMetricFamily(
            "thermoscope_metrics_auth_failures",
            "Requests for /metrics refused by basic auth, by reason: missing (no credentials), wrong "
            "(a password hashed and not the user's), rate_limited (answered 429 without hashing: the "
            "client address, or all addresses together, had too many passwords hashed).",
            labels=["reason"],
        )
        checks = CounterMetricFamily(
            "thermoscope_metrics_password_checks",
            "Passwords hashed against the basic-auth users' hashes (bcrypt or PBKDF2, ~60 ms of CPU "
            "each); a verified password is remembered, not hashed again.",
        )
        with self._lock:
            for reason, n in sorted(self.failures.items()):
                failures.add_metric([reason], n)
            checks.add_metric([], self.checks)
        yield failures
        yield checks

    def _refuse(self, reason: str) -> str:
        with self._lock:
            self.failures[reason] += 1
        return reason

    def _tokens(self, address: str, now: float) -> float:
        tokens, then = self._buckets.get(address, (FAILURE_BURST, now))
        return min(FAILURE_BURST, tokens + (now - then) * FAILURE_REFILL_PER_S)

    def _take(self, address: str, n: float) -> bool:
        """Take `n` tokens (give back, if negative) from `address`'s bucket; False if it has too few."""
        now = time.monotonic()
        tokens = self._tokens(address, now)
        self._buckets.pop(address, None)  # re-inserted last: the dict's order is the addresses' recency
        ok = tokens >= n
        self._buckets[address] = (min(FAILURE_BURST, tokens - n) if ok else tokens, now)
        if len(self._buckets) > TRACKED_ADDRESSES:
            del self._buckets[next(iter(self._buckets))]
        return ok

    def _shared_tokens(self, now: float) -> float:
        tokens, then = self._shared
        return min(GLOBAL_BURST, tokens + (now - then) * GLOBAL_REFILL_PER_S)

    def _take_shared(self, n: float) -> bool:
        """`_take`, from the bucket every address shares."""
        now = time.monotonic()
        tokens = self._shared_tokens(now)
        ok = tokens >= n
        self._shared = (min(GLOBAL_BURST, tokens - n) if ok else tokens, now)
        return ok


class BasicAuth:
    """WSGI middleware: the app's answer for admitted requests; else 401 (with `WWW-Authenticate`),
    or 429 (with `Retry-After`) for an address with too many wrong passwords, or while all
    addresses together had as many hashed as they may."""

    def __init__(self, app, check: PasswordCheck, realm: str = "thermoscope") -> None:
        self.app, self.check, self.realm = app, check, realm

    def __call__(self, environ, start_response):
        address = environ.get("REMOTE_ADDR", "")
        verdict = self.check.admit(environ.get("HTTP_AUTHORIZATION", ""), address)
        if verdict == OK:
            # who it is: a user bound to job prefixes sees only those jobs (collector/web/app.py)
            user, _ = _credentials(environ["HTTP_AUTHORIZATION"])
            environ[PREFIXES] = self.check.users.prefixes(user)
            return self.app(environ, start_response)
        if verdict == RATE_LIMITED:
            retry = str(self.check.retry_after(address))
            start_response("429 Too Many Requests", [("Retry-After", retry), ("Content-Type", "text/plain")])
            return [b"429 Too Many Requests: too many wrong passwords, from this address or all\n"]
        start_response(
            "401 Unauthorized",
            [("WWW-Authenticate", f'Basic realm="{self.realm}"'), ("Content-Type", "text/plain")],
        )
        return [b"401 Unauthorized\n"]
