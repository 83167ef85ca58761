"""The subscription index: which subscribers get a message published on topic T.

Exact subscriptions (the common case) live in a dict, found in one lookup. Wildcard patterns live
in a trie keyed by segment, with ``*`` and ``**`` children, so a lookup walks at most three branches
per segment of T instead of scanning every pattern.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from protocol.topics import STAR, STARSTAR, is_exact

S = TypeVar("S", bound=Hashable)


class _Node(Generic[S]):
    __slots__ = ("children", "here", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = {}
        self.here: set[S] = set()  # subscribers whose pattern ends at this node
        self.rest: set[S] = set()  # subscribers of ``<path>/**``

    def empty(self) -> bool:
        return not (self.children or self.here or self.rest)


class SubscriptionIndex(Generic[S]):
    """Maps patterns to subscribers. Each (pattern, subscriber) pair is stored once."""

    def __init__(self) -> None:
        self.exact: dict[str, set[S]] = {}
        self._root: _Node[S] = _Node()
        self._wildcards = 0

    def __len__(self) -> int:
        """Number of (pattern, subscriber) pairs."""
        return sum(len(s) for s in self.exact.values()) + self._wildcards

    def add(self, pattern: str, subscriber: S) -> bool:
        """Add a pair; False when it was there already."""
        if is_exact(pattern):
            subs = self.exact.get(pattern)
            if subs is None:
                self.exact[pattern] = {subscriber}
                return True
            if subscriber in subs:
                return False
            subs.add(subscriber)
            return True
        node = self._root
        segments = pattern.split("/")
        for seg in segments[:-1]:
            node = node.children.setdefault(seg, _Node())
        last = segments[-1]
        target = node.rest if last == STARSTAR else node.children.setdefault(last, _Node()).here
        if subscriber in target:
            return False
        target.add(subscriber)
        self._wildcards += 1
        return True

    def remove(self, pattern: str, subscriber: S) -> bool:
        """Remove a pair; False when it was not there. Empty branches are pruned."""
        if is_exact(pattern):
            subs = self.exact.get(pattern)
            if not subs or subscriber not in subs:
                return False
            subs.discard(subscriber)
            if not subs:
                del self.exact[pattern]
            return True
        segments = pattern.split("/")
        path: list[tuple[_Node[S], str]] = []
        node = self._root
        for seg in segments[:-1]:
            child = node.children.get(seg)
            if child is None:
                return False
            path.append((node, seg))
            node = child
        last = segments[-1]
        if last == STARSTAR:
            if subscriber not in node.rest:
                return False
            node.rest.discard(subscriber)
        else:
            leaf = node.children.get(last)
            if leaf is None or subscriber not in leaf.here:
                return False
            leaf.here.discard(subscriber)
            if leaf.empty():
                del node.children[last]
        self._wildcards -= 1
        while path and node.empty():
            parent, seg = path.pop()
            del parent.children[seg]
            node = parent
        return True

    def match(self, topic: str) -> set[S]:
        """Every subscriber with at least one pattern matching ``topic`` (an exact name)."""
        exact = self.exact.get(topic)
        if not self._wildcards:
            return set(exact) if exact else set()
        out: set[S] = set(exact) if exact else set()
        self._walk(self._root, topic.split("/"), 0, out)
        return out

    def match_exact_only(self, topic: str) -> set[S] | None:
        """The live set for ``topic`` when no wildcard pattern exists, else None (fast path).

        The caller must not mutate the returned set.
        """
        if self._wildcards:
            return None
        return self.exact.get(topic) or set()

    def _walk(self, node: _Node[S], segs: list[str], i: int, out: set[S]) -> None:
        if node.rest:
            out.update(node.rest)
        if i == len(segs):
            return
        last = i == len(segs) - 1
        for key in (segs[i], STAR):
            child = node.children.get(key)
            if child is None:
                continue
            if last:
                if child.here:
                    out.update(child.here)
                if child.rest:  # ``a/b/**`` matches ``a/b``
                    out.update(child.rest)
            else:
                self._walk(child, segs, i + 1, out)

    def has_wildcards(self) -> bool:
        return self._wildcards > 0
