"""A collector's /metrics page as a scraper reads it."""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page, keyed by (name, labels)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: dict, name: str, **labels: str) -> float:
    """The value of the sample `name{labels}` of a scrape."""
    return metrics[(name, frozenset(labels.items()))]


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` every 50 ms until it holds; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def wait_for_value(url: str, name: str, expected: float, timeout: float = 15.0, **labels: str) -> dict:
    """Scrape `url` until `name{labels}` reads `expected`; return that scrape."""
    scraped: dict = {}

    def reads_expected() -> bool:
        scraped.update(scrape(url))
        return scraped.get((name, frozenset(labels.items()))) == expected

    wait_until(reads_expected, timeout, f"{name}{labels} never became {expected}")
    return scraped
