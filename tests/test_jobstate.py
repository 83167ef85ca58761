"""The job state table and the retry back-off: pure functions, no event loop."""

from __future__ import annotations

import itertools
import random

import pytest

from broker.jobstate import (
    READY,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    JobState,
    backoff_delay,
    check_transition,
)
from protocol.errors import UsageError

Q, A, D, F, R, C = (
    JobState.QUEUED,
    JobState.ACTIVE,
    JobState.DONE,
    JobState.FAILED,
    JobState.RETRYING,
    JobState.CANCELLED,
)

EXPECTED = {
    Q: {A, C},
    A: {D, R, F, C, Q},
    R: {A, C},
    F: {Q},
    C: {Q},
    D: set(),
}


def test_state_values_are_the_wire_names() -> None:
    assert [s.value for s in JobState] == [
        "queued",
        "active",
        "done",
        "failed",
        "retrying",
        "cancelled",
    ]
    assert JobState("retrying") is R
    assert f"{JobState.DONE}" == "done"


def test_table_is_exactly_the_documented_one() -> None:
    assert set(TRANSITIONS) == set(JobState)
    assert {old: set(new) for old, new in TRANSITIONS.items()} == EXPECTED
    assert all(isinstance(v, frozenset) for v in TRANSITIONS.values())


@pytest.mark.parametrize(("old", "new"), list(itertools.product(JobState, JobState)))
def test_check_transition_follows_the_table(old: JobState, new: JobState) -> None:
    if new in EXPECTED[old]:
        check_transition(old, new)
    else:
        with pytest.raises(IllegalTransition) as info:
            check_transition(old, new)
        assert info.value.old is old
        assert info.value.new is new
        assert f"{old.value} -> {new.value}" in str(info.value)


def test_illegal_transition_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        check_transition(D, Q)


def test_terminal_and_ready_sets() -> None:
    assert {D, F, C} == TERMINAL
    assert {Q, R} == READY
    # Only an operator's retry leaves failed or cancelled; nothing leaves done.
    for state in TERMINAL:
        assert TRANSITIONS[state] <= {Q}
    # A worker can only ever take a ready job.
    assert {old for old, new in TRANSITIONS.items() if A in new} == READY


class FixedDraw(random.Random):
    """A generator whose every draw is the same fraction of the window."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_window_doubles_up_to_the_cap() -> None:
    top = FixedDraw(1.0)
    got = [backoff_delay(n, base=1.0, cap=100.0, rng=top) for n in range(1, 10)]
    assert got == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 100.0, 100.0]
    half = FixedDraw(0.5)
    assert backoff_delay(3, base=2.0, cap=300.0, rng=half) == pytest.approx(4.0)


def test_backoff_full_jitter_spans_the_whole_window() -> None:
    rng = random.Random(1234)
    draws = [backoff_delay(5, base=1.0, cap=300.0, rng=rng) for _ in range(2000)]
    window = 16.0
    assert all(0.0 <= d <= window for d in draws)
    assert min(draws) < 0.05 * window
    assert max(draws) > 0.95 * window
    assert 0.4 * window < sum(draws) / len(draws) < 0.6 * window


def test_backoff_is_reproducible_with_a_seeded_generator() -> None:
    a = [backoff_delay(n, rng=random.Random(7)) for n in range(1, 20)]
    b = [backoff_delay(n, rng=random.Random(7)) for n in range(1, 20)]
    assert a == b


def test_backoff_huge_attempt_does_not_overflow() -> None:
    assert backoff_delay(100_000, cap=300.0, rng=FixedDraw(1.0)) == 300.0
    assert 0.0 <= backoff_delay(10**9) <= 300.0


@pytest.mark.parametrize(
    ("attempt", "base", "cap"),
    [(0, 1.0, 300.0), (-3, 1.0, 300.0), (1, -1.0, 300.0), (1, 1.0, -1.0)],
)
def test_backoff_rejects_bad_arguments(attempt: int, base: float, cap: float) -> None:
    with pytest.raises(UsageError):
        backoff_delay(attempt, base=base, cap=cap)
