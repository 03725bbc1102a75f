"""`web_app`: the page (`/`), its static files (`/static/...`) and the JSON API (`/api/v1/...`)
in front of the `/metrics` app, on the same port, so they share its TLS, basic auth and bounds.

The page runs no inline script and loads nothing from elsewhere (a user's cluster often has no
internet): its script, styles and the vendored uPlot are same-origin files, and every answer of
this app carries a Content-Security-Policy that allows nothing else. Names (job ids, layers,
sites) come from agents: the script puts them in the page as text (`textContent`), never as
markup, and the API answers JSON only. A reader bound to job prefixes (basic auth sets
`PREFIXES`, passwords.py) sees only those jobs: an unseen job is a 404, as a missing one, and
/metrics, which has no per-job view, is a 403.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..exposition.passwords import PREFIXES
from ..state.job import Job
from . import api
from .recorder import Recorder

STATIC = Path(__file__).with_name("static")
#: What `/static/` serves: these files alone (no path from the request reaches the file system).
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".txt": "text/plain"}
FILES = {p.name: _TYPES[p.suffix] for p in STATIC.iterdir() if p.suffix in _TYPES}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = [
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]
_JOB = "/api/v1/jobs/"

App = Callable[[dict[str, Any], Callable[..., Any]], list[bytes]]


def web_app(jobs: Mapping[str, Job], recorder: Recorder, metrics: App) -> App:
    """The page and API over `jobs` and `recorder`; any other path goes to `metrics`."""

    def answer(start_response: Callable[..., Any], status: str, kind: str, body: bytes) -> list[bytes]:
        start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body))), *_HEADERS])
        return [body]

    def as_json(start_response: Callable[..., Any], status: str, value: object) -> list[bytes]:
        body = json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
        return answer(start_response, status, "application/json", body)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        # PEP 3333: the path's bytes as latin-1; agents' names are UTF-8
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        ours = path in ("/", "/index.html") or path.startswith(("/static/", "/api/"))
        prefixes = environ.get(PREFIXES)
        if not ours and prefixes is not None:  # /metrics has no per-job view to narrow
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"403 Forbidden: this user is bound to job prefixes; read /api/v1/jobs\n"]
        if not ours:
            return metrics(environ, start_response)
        if environ["REQUEST_METHOD"] != "GET":
            start_response("405 Method Not Allowed", [("Allow", "GET"), ("Content-Type", "text/plain")])
            return [b"405 Method Not Allowed: use GET\n"]
        if path in ("/", "/index.html"):
            return answer(
                start_response, "200 OK", "text/html; charset=utf-8", (STATIC / "index.html").read_bytes()
            )
        if path.startswith("/static/"):
            name = path[len("/static/") :]
            if name not in FILES:
                return as_json(start_response, "404 Not Found", {"error": "no such file"})
            return answer(start_response, "200 OK", FILES[name], (STATIC / name).read_bytes())
        if path == "/api/v1/jobs":
            return as_json(start_response, "200 OK", api.jobs(jobs, prefixes))
        if path.startswith(_JOB) and len(path) > len(_JOB):
            job_id = path[len(_JOB) :]
            found = api.job(jobs, recorder, job_id) if api.visible(job_id, prefixes) else None
            if found is None:
                return as_json(start_response, "404 Not Found", {"error": "no such job"})
            return as_json(start_response, "200 OK", found)
        return as_json(start_response, "404 Not Found", {"error": "no such path"})

    return app
