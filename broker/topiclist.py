"""The active topics of one broker node, for administrators (``GET /api/v1/topics``).

Listed: every topic with state in memory (those published or subscribed to recently; at most
the topic log's ``max_topics``) and every topic some connection holds an exact subscription to,
with its subscriber count (connections that would receive a message published there now), its
message rate and history position; and every wildcard pattern held, with its connection count.
Cost: one subscription match per listed topic; meant for occasional admin use.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from protocol.topics import covers, is_exact, matches

if TYPE_CHECKING:
    from .core import Broker


def list_topics(broker: Broker, pattern: str | None = None, limit: int = 1000) -> dict[str, Any]:
    """``{"topics": [...], "patterns": [...]}``, most active first; ``pattern`` filters topics
    and patterns (a held wildcard pattern is listed when ``pattern`` covers it)."""
    hub = broker.hub
    index = hub.index
    states = {st.topic: st for st in hub.log.states()}
    names = set(states) | set(index.exact)
    if pattern is not None:
        names = {t for t in names if matches(pattern, t)}
    topics: list[dict[str, Any]] = []
    for name in names:
        st = states.get(name)
        topics.append(
            {
                "topic": name,
                "subscribers": len(index.match(name)),
                "rate": round(st.rate, 3) if st is not None else 0.0,
                "epoch": st.epoch if st is not None else None,
                "offset": st.offset if st is not None else None,
                "last_ts": st.last_ts if st is not None else None,
                "persisted": st.persisted if st is not None else False,
                "presence": hub.presence.count(name) if hub.presence.tracks(name) else None,
            }
        )
    topics.sort(key=_activity)
    wildcards: Counter[str] = Counter()
    for conn in broker.connections:
        for held in conn.subscriptions:
            if not is_exact(held):
                wildcards[held] += 1
    patterns = [
        {"pattern": p, "subscribers": n}
        for p, n in sorted(wildcards.items(), key=lambda item: (-item[1], item[0]))
        if pattern is None or covers(pattern, p)
    ]
    return {"topics": topics[:limit], "patterns": patterns[:limit], "total": len(topics)}


def _activity(entry: dict[str, Any]) -> tuple[float, int, str]:
    return (-entry["rate"], -entry["subscribers"], entry["topic"])
