"""The progress printer: one-line ``[bitq-tvm] ...`` messages on stderr, with ETAs for long loops.

Library functions take a ``progress`` callable (``None``: silent) and default to :func:`say`, so
the CLI and scripts show what a long step is doing while stdout stays for results.
"""

from __future__ import annotations

import sys
import time


def say(message: str, topic: str | None = None, file=None) -> None:
    """Print ``[bitq-tvm] message`` (``[bitq-tvm TOPIC] message`` with a topic) on ``file`` (stderr)."""
    prefix = f"[bitq-tvm {topic}]" if topic else "[bitq-tvm]"
    print(f"{prefix} {message}", file=file or sys.stderr, flush=True)


def say_tune(message: str) -> None:
    """:func:`say` for the tuning session (``[bitq-tvm tune] ...``)."""
    say(message, "tune")


class Countdown:
    """Elapsed time and ETA of a loop of ``total`` steps, for the end of its progress lines.

    ``started`` is when the whole job started (the elapsed figure counts from it, default now);
    the ETA extrapolates the rate of this loop alone, which starts when the countdown is made.
    """

    def __init__(self, total: int, started: float | None = None) -> None:
        self.total = total
        self.loop_started = time.perf_counter()
        self.started = self.loop_started if started is None else started

    def eta(self, done: int) -> float:
        """Seconds left after ``done`` (>= 1) of ``total`` steps at the rate so far."""
        return (time.perf_counter() - self.loop_started) / done * (self.total - done)

    def suffix(self, done: int) -> str:
        """``[E s, ETA R s]`` after ``done`` (>= 1) steps."""
        eta = self.eta(done)
        return f"[{time.perf_counter() - self.started:.0f} s, ETA {eta:.0f} s]"
