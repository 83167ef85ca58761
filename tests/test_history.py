"""The topic log and recovery collection without a socket: rules, windows, heads, outbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from auth.tokens import Secret
from broker.config import Settings
from broker.core import Broker
from broker.history import (
    HistoryRule,
    TopicLog,
    derived_epoch,
    parse_rule,
    parse_rules,
)
from broker.recovery import Recovery
from broker.store.base import StoredMessage
from protocol.errors import Unavailable

from .helpers import SECRET


def test_rules_parse_and_first_match_wins() -> None:
    assert parse_rule("reports/**=1000:86400") == HistoryRule("reports/**", 1000, 86400.0)
    assert parse_rule(" chat/* = 5 ") == HistoryRule("chat/*", 5, None)
    rules = parse_rules(["a/x=0", "a/*=10", "", "none"])
    log = TopicLog(rules=rules)
    assert log.rule_for("a/x") == HistoryRule("a/x", 0)
    assert log.rule_for("a/y") == HistoryRule("a/*", 10)
    assert log.rule_for("b") is None
    assert str(parse_rule("r/**=3:60")) == "r/**=3:60"


@pytest.mark.parametrize(
    "spec",
    ["reports/**", "a/**/b=1", "a=-1", "a=x", "a=1:0", "a=1:nan", "a=1:abc", "=5", "a=99999999"],
)
def test_bad_rules_are_refused_with_their_text(spec: str) -> None:
    with pytest.raises(ValueError, match="history rule"):
        parse_rule(spec)


def test_memory_topic_window_and_new_epoch_per_log() -> None:
    log = TopicLog(window=3)
    for n in range(5):
        st, offset = log.append("t", float(n), n)
        assert offset == n + 1
    assert [e.offset for e in st.history] == [3, 4, 5]
    assert not st.persisted and not log.outbox
    assert TopicLog(window=3).state("t").epoch != st.epoch


def test_rule_keeping_nothing_has_no_window() -> None:
    log = TopicLog(window=10, rules=parse_rules(["quiet/**=0"]))
    st, _ = log.append("quiet/x", 1.0, "a")
    assert not st.history and not st.persisted and not log.outbox


def test_persisted_topic_holds_unstored_messages_beyond_the_window() -> None:
    log = TopicLog(window=2, rules=parse_rules(["p/**=100"]))
    woken: list[int] = []
    log.on_outbox = lambda: woken.append(1)
    for n in range(5):
        st, _ = log.append("p/a", float(n), n)
    assert woken == [1]
    assert [e.offset for e in st.history] == [1, 2, 3, 4, 5]
    batch = log.take(3)
    assert [e.offset for _, e in batch] == [1, 2, 3]
    log.give_back(batch)
    assert [e.offset for _, e in log.outbox] == [1, 2, 3, 4, 5]
    log.stored(log.take(2))
    assert st.committed == 2
    assert [e.offset for e in st.history] == [3, 4, 5]
    log.stored(log.take(10))
    assert st.committed == 5
    assert [e.offset for e in st.history] == [4, 5]


def test_full_outbox_drops_the_oldest_and_counts_it() -> None:
    log = TopicLog(window=1, rules=parse_rules(["p/**=100"]), outbox_max=3)
    for n in range(5):
        st, _ = log.append("p/a", float(n), n)
    assert [e.offset for _, e in log.outbox] == [3, 4, 5]
    assert log.dropped == 2
    assert st.committed == 2
    assert [e.offset for e in st.history] == [3, 4, 5]


def test_sealed_log_refuses_persisted_topics_only() -> None:
    log = TopicLog(rules=parse_rules(["p/**=10"]))
    log.sealed = True
    with pytest.raises(Unavailable):
        log.append("p/a", 1.0, None)
    assert log.append("m", 1.0, None)[1] == 1


def test_persisted_epoch_is_derived_from_the_generation() -> None:
    rules = parse_rules(["p/**=10"])
    a, b = TopicLog(rules=rules), TopicLog(rules=rules)
    a.load("gen1", {})
    b.load("gen1", {})
    assert a.state("p/x").epoch == b.state("p/x").epoch == derived_epoch("gen1", "p/x")
    b.load("gen2", {})
    assert b.state("p/y").epoch != a.state("p/y").epoch


def test_heads_of_another_generation_or_unpersisted_topics_are_ignored() -> None:
    log = TopicLog(rules=parse_rules(["p/**=10"]))
    kept = log.load(
        "g",
        {
            "p/ok": (derived_epoch("g", "p/ok"), 7),
            "p/stale": (derived_epoch("old", "p/stale"), 9),
            "memory/t": (derived_epoch("g", "memory/t"), 3),
        },
    )
    assert kept == 1
    assert (log.state("p/ok").epoch, log.state("p/ok").offset) == (derived_epoch("g", "p/ok"), 7)
    assert log.state("p/stale").offset == 0
    assert log.state("memory/t").offset == 0
    assert log.append("p/ok", 1.0, None)[1] == 8


def test_eviction_keeps_heads_of_persisted_topics_and_spares_unstored_ones() -> None:
    log = TopicLog(window=5, max_topics=2, rules=parse_rules(["p/**=10"]))
    log.load("g", {})
    log.append("p/a", 1.0, "a")  # not stored yet: must not be forgotten
    log.stored(log.take(10))
    log.append("p/b", 1.0, "b")
    memory = log.state("m").epoch
    assert log.peek("p/a") is None
    assert log.peek("p/b") is not None
    log.append("x", 1.0, None)
    assert log.peek("m") is None
    assert log.state("m").epoch != memory
    st = log.state("p/a")
    assert (st.epoch, st.offset, list(st.history)) == (derived_epoch("g", "p/a"), 1, [])


def test_job_topics_take_at_most_half_of_memory_and_go_first() -> None:
    log = TopicLog(window=5, max_topics=10)
    for name in ("queues/q", "stats/grades", "workers/events"):
        log.append(name, 1.0, "x")
    kept = {name: log.state(name).epoch for name in ("queues/q", "stats/grades", "workers/events")}
    for n in range(1000):  # a busy job queue: three messages per job topic
        for state in ("queued", "active", "done"):
            log.append(f"jobs/{n:04d}", 2.0, state)
    # The other topics kept their state, epoch and history; job topics hold half the room.
    for name, epoch in kept.items():
        st = log.peek(name)
        assert st is not None and st.epoch == epoch and [e.data for e in st.history] == ["x"]
    jobs = [t for t in (f"jobs/{n:04d}" for n in range(1000)) if log.peek(t) is not None]
    assert jobs == [f"jobs/{n:04d}" for n in range(995, 1000)]
    assert [e.data for e in log.peek("jobs/0999").history] == ["queued", "active", "done"]  # type: ignore[union-attr]
    # Other topics beyond the bound still go least recently used first, job topics included.
    for n in range(20):
        log.append(f"t/{n}", 3.0, n)
    assert len(log) == 10 and log.peek("t/19") is not None and log.peek("queues/q") is None


def test_rates_average_over_samples() -> None:
    log = TopicLog()
    st = log.state("t")
    log.sample_rates(0.0)
    for n in range(100):
        log.append("t", 0.0, n)
    log.sample_rates(10.0)
    assert 0 < st.rate < 10
    first = st.rate
    for n in range(100):
        log.append("t", 0.0, n)
    log.sample_rates(20.0)
    assert st.rate > first


# --- collection ---------------------------------------------------------------------------------


def _filled(n: int, window: int = 100, rules: tuple[str, ...] = ()) -> TopicLog:
    log = TopicLog(window=window, rules=parse_rules(rules))
    log.load("g", {})
    for i in range(1, n + 1):
        log.append("t", float(i), i)
    return log


def test_recovery_cases_from_memory() -> None:
    log = _filled(10)
    epoch = log.state("t").epoch
    r = Recovery(log, "t", 7, epoch, 100.0)
    assert r.step() is None
    assert ([e.offset for e in r.entries], r.recovered) == ([8, 9, 10], True)
    r = Recovery(log, "t", 10, epoch, 100.0)
    assert (r.step(), r.entries, r.recovered) == (None, [], True)
    r = Recovery(log, "t", 11, epoch, 100.0)
    assert (r.step(), r.entries, r.recovered) == (None, [], False)
    r = Recovery(log, "t", 3, "other", 100.0)
    assert (r.step(), r.entries, r.recovered) == (None, [], False)
    r = Recovery(log, "t", 3, None, 100.0, limit=2)
    assert r.step() is None
    assert ([e.offset for e in r.entries], r.recovered, r.truncated) == ([4, 5], True, True)


def test_memory_topic_beyond_its_window_is_not_recovered() -> None:
    log = _filled(10, window=4)
    r = Recovery(log, "t", 2, log.state("t").epoch, 100.0)
    assert r.step() is None
    assert ([e.offset for e in r.entries], r.recovered) == ([7, 8, 9, 10], False)


def test_persisted_topic_asks_the_store_for_older_offsets_then_takes_memory() -> None:
    log = _filled(10, window=3, rules=("t=100",))
    log.stored(log.take(100))
    st = log.state("t")
    r = Recovery(log, "t", 2, st.epoch, 100.0)
    assert r.step() == (2, 5)
    # Published and stored while the store is read: 8 leaves the memory window.
    log.append("t", 11.0, 11)
    log.stored(log.take(100))
    r.add_stored([StoredMessage("t", i, st.epoch, float(i), str(i)) for i in range(3, 8)])
    assert r.step() == (7, 1)
    r.add_stored([StoredMessage("t", 8, st.epoch, 8.0, "8")])
    assert r.step() is None
    assert [e.offset for e in r.entries] == list(range(3, 12))
    assert r.recovered


def test_store_gaps_and_expired_rows_make_recovery_false() -> None:
    log = _filled(10, window=2, rules=("t=100:50",))
    log.stored(log.take(100))
    st = log.state("t")
    r = Recovery(log, "t", 0, st.epoch, 58.0)  # rows older than 8.0 are expired
    assert r.step() == (0, 8)
    rows = [StoredMessage("t", i, st.epoch, float(i), str(i)) for i in (1, 2, 6, 8)]
    r.add_stored(rows)
    assert r.step() is None
    assert [e.offset for e in r.entries] == [8, 9, 10]
    assert not r.recovered


def test_since_older_than_the_rule_keeps_starts_at_the_floor() -> None:
    log = _filled(10, window=2, rules=("t=4",))
    log.stored(log.take(100))
    r = Recovery(log, "t", 1, log.state("t").epoch, 100.0)
    assert r.step() == (6, 2)
    assert not r.recovered


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("history_rules", ("reports/**=many",)),
        ("presence_patterns", ("a/**/b",)),
        ("rate_limits", ("robots=5",)),
        ("rate_limit_burst", 0.0),
    ],
)
async def test_invalid_settings_stop_the_start_with_their_name(
    tmp_path: Path, setting: str, value: Any
) -> None:
    settings = Settings(data_dir=tmp_path, secret=Secret(SECRET), **{setting: value})
    broker = Broker(settings)
    name = "RATE_LIMITS" if setting == "rate_limit_burst" else setting.upper()
    try:
        with pytest.raises(ValueError, match="QUICKSILVER_" + name):
            await broker.start()
    finally:
        await broker.store.close()


def test_the_rule_applies_as_of_the_request_while_publishing_goes_on() -> None:
    log = _filled(10, window=2, rules=("t=4",))
    log.stored(log.take(100))
    st = log.state("t")
    r = Recovery(log, "t", 6, st.epoch, 100.0)
    assert r.step() == (6, 2)
    for i in range(11, 16):  # five more: now only 12..15 would be kept
        log.append("t", float(i), i)
    rows = [StoredMessage("t", i, st.epoch, float(i), str(i)) for i in range(7, 11)]
    r.add_stored(rows[:2])
    assert r.step() == (8, 2)
    r.add_stored(rows[2:])
    assert r.step() is None
    assert ([e.offset for e in r.entries], r.recovered) == (list(range(7, 16)), True)


def test_a_pin_keeps_the_window_until_it_grows_too_far() -> None:
    log = TopicLog(window=2, rules=parse_rules(["t=100"]), pin_max=5)
    for i in range(1, 5):
        st, _ = log.append("t", float(i), i)
    log.stored(log.take(100))
    assert [e.offset for e in st.history] == [3, 4]
    st.pins.append(3)
    for i in range(5, 10):
        log.append("t", float(i), i)
        log.stored(log.take(100))
    assert [e.offset for e in st.history] == list(range(3, 10))
    assert st.pins == [3]
    for i in range(10, 12):
        log.append("t", float(i), i)
    assert st.pins == []  # 2 + 5 beyond the window: the pin is dropped
    log.stored(log.take(100))
    assert [e.offset for e in st.history] == [10, 11]
