"""A job's life as one table of states and legal moves, plus the retry back-off.

::

    queued    → active | cancelled
    active    → done | retrying | failed | cancelled | queued
    retrying  → active | cancelled
    failed    → queued            (an operator's retry)
    cancelled → queued            (an operator's retry)
    done      → (nothing: final)

``active → queued`` gives a job back without a verdict. ``done`` is final. Every state change
the store makes goes through :func:`check_transition` (or a SQL ``WHERE`` clause that admits
exactly the same moves).
"""

from __future__ import annotations

import random
from enum import StrEnum

from protocol.errors import UsageError

__all__ = [
    "READY",
    "TERMINAL",
    "TRANSITIONS",
    "IllegalTransition",
    "JobState",
    "backoff_delay",
    "check_transition",
]


class JobState(StrEnum):
    """Where a job is in its life; the value is the wire name."""

    QUEUED = "queued"
    ACTIVE = "active"
    DONE = "done"
    FAILED = "failed"
    RETRYING = "retrying"
    CANCELLED = "cancelled"


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.ACTIVE, JobState.CANCELLED}),
    JobState.ACTIVE: frozenset(
        {
            JobState.DONE,
            JobState.RETRYING,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.QUEUED,
        }
    ),
    JobState.RETRYING: frozenset({JobState.ACTIVE, JobState.CANCELLED}),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
    JobState.DONE: frozenset(),
}

TERMINAL: frozenset[JobState] = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
"""States in which no worker holds the job and nothing happens without an operator."""

READY: frozenset[JobState] = frozenset({JobState.QUEUED, JobState.RETRYING})
"""States from which a worker may claim the job once its ``run_at`` has come."""


class IllegalTransition(UsageError):
    """A state change that :data:`TRANSITIONS` does not allow: a bug in the caller."""

    def __init__(self, old: JobState, new: JobState) -> None:
        super().__init__(f"illegal job state transition {old.value} -> {new.value}")
        self.old = old
        self.new = new


def check_transition(old: JobState, new: JobState) -> None:
    """Return when ``old → new`` is a legal move, else raise :class:`IllegalTransition`."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(old, new)


# Beyond this exponent ``base * 2**n`` exceeds any sane cap; clamping also avoids OverflowError.
_MAX_EXPONENT = 64


def backoff_delay(
    attempt: int,
    *,
    base: float = 1.0,
    cap: float = 300.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retrying after failed attempt number ``attempt`` (1 = first).

    Exponential back-off with "full jitter": the delay is drawn uniformly from
    ``[0, min(cap, base * 2 ** (attempt - 1))]``. Spreading retries over the whole window, rather
    than adding a little noise to a fixed delay, keeps jobs that failed together (a database
    that went away) from coming back together. The expected delay is half the window.

    ``rng`` makes the draw reproducible in tests; the module's shared generator is used
    otherwise. Raises :class:`UsageError` when ``attempt < 1`` or ``base``/``cap`` is negative.
    """
    if attempt < 1:
        raise UsageError(f"attempt must be >= 1, not {attempt}")
    if base < 0 or cap < 0:
        raise UsageError("base and cap must not be negative")
    exponent = min(attempt - 1, _MAX_EXPONENT)
    window = min(cap, base * 2.0**exponent)
    draw = rng.random() if rng is not None else random.random()
    return window * draw
