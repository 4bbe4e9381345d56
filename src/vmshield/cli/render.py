"""Human-readable lines of guest data (the monitor's event lines).

Every value here comes from the guest (process names, paths, argv, module names) and
goes through :func:`vmshield.text.term`, so one line on the terminal stays one line and
no escape sequence reaches the terminal. ``--json`` output does not pass through here.
"""

from __future__ import annotations

import time

from vmshield.monitor.events import Event
from vmshield.text import term


def event_line(ev: Event) -> str:
    """``HH:MM:SS object action comm[pid] uid=U key=value ...``, escaped."""
    p = ev.process
    who = f"{p.comm}[{p.pid}] uid={p.uid}" if p else "?"
    what = " ".join(f"{k}={v}" for k, v in ev.fields.items())
    return (
        f"{time.strftime('%H:%M:%S', time.localtime(ev.time))} "
        f"{term(ev.object):<14} {term(ev.action):<5} {term(who)} {term(what)}"
    )
