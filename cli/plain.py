"""What a terminal command prints of values it did not write (job ids, layer names, phases):
plain text, never markup or control sequences.

Those values come from agents (a job id, a layer name) through a collector's page or database,
so a `[/]` in one made rich raise MarkupError, and an escape sequence in one reached the
terminal (a window title set, the screen cleared). `plain` strips every control character
(C0, DEL, C1: what starts or carries a sequence) and returns a rich `Text`, which rich prints
as it is, never parsing markup in it.
"""

from __future__ import annotations

import re

from rich.text import Text

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain(value: str, style: str = "") -> Text:
    """`value` as text a terminal shows as it is: no control characters, no markup."""
    return Text(_CONTROL.sub("", value), style=style)
