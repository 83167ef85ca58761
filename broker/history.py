"""Per-topic offsets, epochs, history windows and history rules. No I/O.

Every topic has a current ``epoch`` and the ``offset`` of its last message; offsets grow by one
per message. The epoch changes only when the topic's history is lost, so a client can tell a gap
from a restart: a ``since`` whose epoch differs cannot be recovered.

History rules (``pattern=KEEP[:MAX_AGE]``, first matching rule wins) choose what is kept:

- A topic matched by a rule with ``KEEP > 0`` is *persisted*: its messages go to the store (see
  :mod:`broker.history_writer`), the last ``KEEP`` of them younger than ``MAX_AGE`` seconds can be
  recovered, and its epoch and offsets survive a clean restart. Its epoch is derived from the
  store's history *generation* and the topic name, so a persisted topic that has no message yet
  gets the same epoch after a clean restart; the generation changes after an unclean stop, which
  gives every persisted topic a new epoch (messages on their way to the store were lost).
- A rule with ``KEEP = 0`` keeps nothing.
- Other topics keep the last ``window`` messages in memory; a restart loses them (new epoch).

Bounds and overflow policies:

- Memory holds at most ``window`` messages per topic (fewer when the rule keeps fewer); messages
  of a persisted topic that have not reached the store yet are held beyond that until stored.
- At most ``max_topics`` topics keep state in memory; beyond that the least recently used one is
  forgotten. A forgotten memory topic starts a new epoch; a forgotten persisted topic keeps only
  ``(epoch, offset)`` in a small table and reloads its history from the store when needed.
  Persisted topics with messages not stored yet are not forgotten until stored.
- Job topics (``jobs/<id>``, one per job, published three times and then rarely read) may hold
  at most half of ``max_topics``; beyond that the oldest job topic is forgotten first, so a
  high job rate does not push every other topic out of memory.
- At most ``outbox_max`` messages wait for the store. Beyond that the oldest is dropped (counted
  in :attr:`TopicLog.dropped`): a recovery that needs it then reports ``recovered: false``.
- While a recovery reads a persisted topic's older messages from the store, the messages it will
  take from memory are kept (pinned), at most ``pin_max`` beyond the window; past that the pin is
  dropped and the recovery reads the store again.
"""

from __future__ import annotations

import hashlib
import math
import random
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from protocol.errors import Unavailable
from protocol.topics import is_valid_pattern, matches

EPOCH_BYTES = 8
#: Topics of one job each (see the bounds in the module docstring).
JOB_TOPIC_PREFIX = "jobs/"
#: Half-life of the message rate average, seconds.
RATE_HALF_LIFE = 30.0


#: Epochs need to differ, not to be secret: a PRNG seeded from the OS is enough, and every job's
#: topic gets one, where os.urandom showed up in the broker's profile.
_epochs = random.Random(secrets.randbits(128))


def new_epoch() -> str:
    """A random epoch (16 hex digits)."""
    return f"{_epochs.getrandbits(EPOCH_BYTES * 8):0{EPOCH_BYTES * 2}x}"


def derived_epoch(generation: str, topic: str) -> str:
    """The epoch of a persisted topic in history generation ``generation`` (16 hex digits)."""
    data = f"{generation}\0{topic}".encode()
    return hashlib.blake2b(data, digest_size=EPOCH_BYTES).hexdigest()


# --- rules --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistoryRule:
    """How much history a topic matching ``pattern`` keeps: the last ``keep`` messages, none
    older than ``max_age`` seconds (None: no age limit). ``keep > 0`` means persisted."""

    pattern: str
    keep: int
    max_age: float | None = None

    @property
    def persisted(self) -> bool:
        return self.keep > 0

    def __str__(self) -> str:
        age = "" if self.max_age is None else f":{self.max_age:g}"
        return f"{self.pattern}={self.keep}{age}"


def parse_rule(spec: str) -> HistoryRule:
    """Parse ``pattern=KEEP[:MAX_AGE]`` (e.g. ``reports/**=1000:86400``); ValueError when bad."""
    pattern, sep, limits = spec.strip().partition("=")
    pattern = pattern.strip()
    if not sep or not is_valid_pattern(pattern):
        raise ValueError(f"history rule {spec!r} must be 'PATTERN=KEEP[:MAX_AGE_SECONDS]'")
    keep_text, _, age_text = limits.partition(":")
    try:
        keep = int(keep_text)
        max_age = float(age_text) if age_text.strip() else None
    except ValueError:
        raise ValueError(
            f"history rule {spec!r}: KEEP must be an integer and MAX_AGE a number of seconds"
        ) from None
    if keep < 0 or keep > 10_000_000:
        raise ValueError(f"history rule {spec!r}: KEEP must be between 0 and 10000000")
    if max_age is not None and (not math.isfinite(max_age) or max_age <= 0):
        raise ValueError(f"history rule {spec!r}: MAX_AGE must be a positive number of seconds")
    return HistoryRule(pattern, keep, max_age)


def parse_rules(specs: Iterable[str]) -> tuple[HistoryRule, ...]:
    """Parse every rule; empty entries and ``none`` are skipped. ValueError names the first bad
    one."""
    return tuple(parse_rule(spec) for spec in specs if spec.strip() not in ("", "none"))


# --- per-topic state ----------------------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """One message in a topic's history: its offset, timestamp, and data as given."""

    offset: int
    ts: float
    data: object


class TopicState:
    """What the broker knows of one topic.

    ``committed`` (persisted topics) is the highest offset the store has dealt with: every
    message up to it is stored, or was dropped for good. Messages above it are in ``history``.
    ``pins`` holds the offsets from which recoveries reading the store need the memory window
    kept: messages at or above the lowest pin are not trimmed.
    """

    __slots__ = (
        "committed",
        "epoch",
        "history",
        "last_ts",
        "mark",
        "offset",
        "persisted",
        "pins",
        "rate",
        "rule",
        "topic",
        "window",
    )

    def __init__(
        self,
        topic: str,
        epoch: str,
        offset: int,
        window: int,
        rule: HistoryRule | None = None,
    ) -> None:
        self.topic = topic
        self.epoch = epoch
        self.offset = offset
        self.rule = rule
        self.persisted = rule is not None and rule.persisted
        self.window = window
        # A persisted topic trims by hand: messages not stored yet must stay.
        self.history: deque[Entry] = deque() if self.persisted else deque(maxlen=window)
        self.committed = offset
        self.pins: list[int] = []
        self.last_ts: float | None = None
        self.mark = offset
        self.rate = 0.0

    @property
    def max_age(self) -> float | None:
        return None if self.rule is None else self.rule.max_age

    def floor(self) -> int:
        """The lowest offset the topic's rule still keeps (by count)."""
        if self.rule is None:
            return 1
        return max(1, self.offset - self.rule.keep + 1)

    def trim(self) -> None:
        """Drop stored messages beyond the memory window (not those a pin holds)."""
        hist = self.history
        limit = self.committed if not self.pins else min(self.committed, min(self.pins) - 1)
        while len(hist) > self.window and hist[0].offset <= limit:
            hist.popleft()


#: A message waiting for the store: its topic's state and the entry.
Pending = tuple[TopicState, Entry]


class TopicLog:
    """Offsets, epochs and history windows of every topic this process has seen.

    ``window`` is the memory window of topics without a rule (``QUICKSILVER_HISTORY_SIZE``) and
    the largest memory window of persisted ones. Call :meth:`configure` before the first
    message, and :meth:`load` with the store's heads when history is persisted.
    """

    def __init__(
        self,
        *,
        window: int = 100,
        max_topics: int = 10_000,
        rules: Sequence[HistoryRule] = (),
        outbox_max: int = 100_000,
        pin_max: int = 100_000,
    ) -> None:
        self.window = max(0, window)
        #: Most messages kept beyond the window for recoveries reading the store.
        self.pin_max = max(0, pin_max)
        self.max_topics = max(1, max_topics)
        self.rules = tuple(rules)
        self.outbox_max = max(1, outbox_max)
        #: Generation of derived epochs; replaced by :meth:`load` with the store's.
        self.generation = new_epoch()
        #: Messages of persisted topics waiting for the store, oldest first.
        self.outbox: deque[Pending] = deque()
        #: Messages dropped from a full outbox (never stored).
        self.dropped = 0
        #: Called when the outbox stops being empty.
        self.on_outbox: Callable[[], None] | None = None
        #: Set on shutdown once the outbox is flushed; persisted topics then refuse messages.
        self.sealed = False
        self._topics: OrderedDict[str, TopicState] = OrderedDict()
        #: The job topics among them (not persisted), oldest first.
        self._job_topics: OrderedDict[str, None] = OrderedDict()
        self._heads: dict[str, tuple[str, int]] = {}
        self._sampled_at: float | None = None

    def __len__(self) -> int:
        return len(self._topics)

    def configure(
        self,
        *,
        rules: Sequence[HistoryRule] | None = None,
        max_topics: int | None = None,
        outbox_max: int | None = None,
    ) -> None:
        """Set the rules and bounds. Topics that already have state keep the rule they had."""
        if rules is not None:
            self.rules = tuple(rules)
        if max_topics is not None:
            self.max_topics = max(1, max_topics)
        if outbox_max is not None:
            self.outbox_max = max(1, outbox_max)

    def load(self, generation: str, heads: Mapping[str, tuple[str, int]]) -> int:
        """Adopt the store's history generation and the ``(epoch, last offset)`` of persisted
        topics. Heads whose epoch is not this generation's (left by an unclean stop, or by a
        topic no rule persists now) are ignored: those topics start a new history. Returns how
        many heads were kept."""
        self.generation = generation
        self._heads = {}
        for topic, (epoch, offset) in heads.items():
            rule = self.rule_for(topic)
            persisted = rule is not None and rule.persisted
            if persisted and offset > 0 and epoch == derived_epoch(generation, topic):
                self._heads[topic] = (epoch, offset)
        return len(self._heads)

    def rule_for(self, topic: str) -> HistoryRule | None:
        for rule in self.rules:
            if matches(rule.pattern, topic):
                return rule
        return None

    # --- state ----------------------------------------------------------------------------

    def _new_state(self, topic: str) -> TopicState:
        rule = self.rule_for(topic)
        if rule is None:
            return TopicState(topic, new_epoch(), 0, self.window)
        if not rule.persisted:
            return TopicState(topic, new_epoch(), 0, 0, rule)
        head = self._heads.pop(topic, None)
        epoch, offset = head if head is not None else (derived_epoch(self.generation, topic), 0)
        return TopicState(topic, epoch, offset, min(rule.keep, self.window), rule)

    def state(self, topic: str) -> TopicState:
        """The topic's state, created (or reloaded from the persisted heads) when needed."""
        st = self._topics.get(topic)
        if st is None:
            st = self._new_state(topic)
            self._topics[topic] = st
            if topic.startswith(JOB_TOPIC_PREFIX) and not st.persisted:
                jobs = self._job_topics
                jobs[topic] = None
                if len(jobs) > max(1, self.max_topics // 2):
                    # Memory topics: nothing unstored, no pins (those are for store reads).
                    del self._topics[jobs.popitem(last=False)[0]]
            if len(self._topics) > self.max_topics:
                self._evict()
        return st

    def peek(self, topic: str) -> TopicState | None:
        """The topic's state when it is in memory, without creating it."""
        return self._topics.get(topic)

    def states(self) -> Iterator[TopicState]:
        """Every topic state in memory, least recently used first."""
        return iter(list(self._topics.values()))

    def persisted_topics(self) -> list[str]:
        """Every persisted topic known: in memory or only by its head."""
        return [*self._heads, *(t for t, st in self._topics.items() if st.persisted)]

    def _evict(self) -> None:
        # A persisted topic with messages not yet stored is skipped (they exist nowhere else),
        # and so is one a recovery has pinned. The size may then stay above the bound a while.
        topics = self._topics
        for _ in range(min(16, len(topics) - 1)):
            topic, st = next(iter(topics.items()))
            if st.persisted and (st.committed < st.offset or st.pins):
                topics.move_to_end(topic)
                continue
            del topics[topic]
            self._job_topics.pop(topic, None)
            if st.persisted and st.offset > 0:
                self._heads[topic] = (st.epoch, st.offset)
            return

    # --- publishing -----------------------------------------------------------------------

    def append(self, topic: str, ts: float, data: object) -> tuple[TopicState, int]:
        """Assign the next offset on ``topic`` and remember the message.

        Raises :class:`Unavailable` for a persisted topic once the log is sealed (shutdown).
        """
        st = self._topics.get(topic)
        if st is None:
            st = self.state(topic)
        else:
            self._topics.move_to_end(topic)
        if st.persisted:
            if self.sealed:
                raise Unavailable("the server is shutting down; try again after the restart")
            offset = st.offset = st.offset + 1
            st.last_ts = ts
            entry = Entry(offset, ts, data)
            hist = st.history
            hist.append(entry)
            if len(hist) > st.window and hist[0].offset <= st.committed:
                if not st.pins or hist[0].offset < min(st.pins):
                    hist.popleft()
                elif len(hist) > st.window + self.pin_max:
                    # Recoveries read too slowly: stop holding for them (they read again).
                    st.pins.clear()
                    hist.popleft()
            outbox = self.outbox
            outbox.append((st, entry))
            if len(outbox) == 1:
                if self.on_outbox is not None:
                    self.on_outbox()
            elif len(outbox) > self.outbox_max:
                self._drop_oldest()
            return st, offset
        offset = st.offset = st.offset + 1
        st.last_ts = ts
        if st.window:
            st.history.append(Entry(offset, ts, data))
        return st, offset

    def _drop_oldest(self) -> None:
        st, entry = self.outbox.popleft()
        self.dropped += 1
        if entry.offset > st.committed:
            st.committed = entry.offset
            st.trim()

    def take(self, limit: int) -> list[Pending]:
        """Remove and return up to ``limit`` of the oldest messages waiting for the store."""
        outbox = self.outbox
        n = min(limit, len(outbox))
        return [outbox.popleft() for _ in range(n)]

    def give_back(self, batch: Sequence[Pending]) -> None:
        """Put a batch the store could not take back in front of the outbox."""
        self.outbox.extendleft(reversed(batch))
        while len(self.outbox) > self.outbox_max:
            self._drop_oldest()

    def stored(self, batch: Iterable[Pending]) -> set[TopicState]:
        """The store has dealt with ``batch`` (stored it, or refused it for good): trim memory.
        Returns the states touched."""
        touched: set[TopicState] = set()
        for st, entry in batch:
            if entry.offset > st.committed:
                st.committed = entry.offset
            touched.add(st)
        for st in touched:
            st.trim()
        return touched

    # --- reading --------------------------------------------------------------------------

    @staticmethod
    def kept(st: TopicState, after: int, now: float, floor: int | None = None) -> list[Entry]:
        """The messages in memory after offset ``after`` that the topic's rule keeps at time
        ``now`` when its lowest kept offset is ``floor`` (default: the current one)."""
        max_age = st.max_age
        if floor is None:
            floor = st.floor()
        if max_age is None:
            return [e for e in st.history if e.offset > after and e.offset >= floor]
        cutoff = now - max_age
        return [e for e in st.history if e.offset > after and e.offset >= floor and e.ts >= cutoff]

    def sample_rates(self, now: float) -> None:
        """Update every topic's message rate (messages per second, exponentially averaged)."""
        last = self._sampled_at
        self._sampled_at = now
        if last is None or now <= last:
            for st in self._topics.values():
                st.mark = st.offset
            return
        elapsed = now - last
        keep = 0.5 ** (elapsed / RATE_HALF_LIFE)
        for st in self._topics.values():
            delta = st.offset - st.mark
            st.mark = st.offset
            st.rate = st.rate * keep + (max(0, delta) / elapsed) * (1.0 - keep)
