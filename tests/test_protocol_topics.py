"""Topic names and patterns: what is accepted, what matches what, and what covers what.

The rules are those of the wire contract: ``/``-separated segments of letters, digits and
``-_.:@+~``, 1 to 255 bytes, no empty segment; patterns add ``*`` (one segment) and ``**`` (zero
or more trailing segments, last segment only). Matching is checked against an independent
regex translation; ``covers`` against the set of topics each pattern matches.
"""

from __future__ import annotations

import re
from functools import lru_cache

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from protocol.errors import BadRequest
from protocol.topics import (
    MAX_TOPIC_BYTES,
    covers,
    is_exact,
    is_valid_pattern,
    is_valid_topic,
    matches,
    parse_pattern,
    parse_topic,
)

SEGMENT_CHARS = "ABCXYZabcxyz0189-_.:@+~"
_VALID_TOPIC = re.compile(r"[A-Za-z0-9\-_.:@+~]+(?:/[A-Za-z0-9\-_.:@+~]+)*")


def reference_is_topic(text: str) -> bool:
    return _VALID_TOPIC.fullmatch(text) is not None and len(text.encode("utf-8")) <= MAX_TOPIC_BYTES


def reference_is_pattern(text: str) -> bool:
    if not text or len(text.encode("utf-8")) > MAX_TOPIC_BYTES:
        return False
    segments = text.split("/")
    for i, seg in enumerate(segments):
        if seg == "**":
            if i != len(segments) - 1:
                return False
        elif seg != "*" and _VALID_TOPIC.fullmatch(seg) is None:
            return False
    return True


@lru_cache(maxsize=4096)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    for i, seg in enumerate(pattern.split("/")):
        if seg == "**":
            # Zero or more further segments; at the start, any (non-empty) topic at all.
            out += "(?:/[^/]+)*" if i else "[^/]+(?:/[^/]+)*"
        elif seg == "*":
            out += ("/" if i else "") + "[^/]+"
        else:
            out += ("/" if i else "") + re.escape(seg)
    return re.compile(out)


def reference_matches(pattern: str, topic: str) -> bool:
    return _pattern_regex(pattern).fullmatch(topic) is not None


# --- strategies ----------------------------------------------------------------------------------

# Small alphabets make matches and covers relations common.
small_segments = st.sampled_from(["a", "b", "c"])
small_topics = st.lists(small_segments, min_size=1, max_size=5).map("/".join)


@st.composite
def small_patterns(draw: st.DrawFn) -> str:
    body = draw(st.lists(st.sampled_from(["a", "b", "*"]), min_size=0, max_size=4))
    if draw(st.booleans()) or not body:
        body.append("**")
    return "/".join(body)


any_small_pattern = st.one_of(small_patterns(), small_topics)

wide_segments = st.text(st.sampled_from(SEGMENT_CHARS), min_size=1, max_size=8)
wide_topics = st.lists(wide_segments, min_size=1, max_size=6).map("/".join)
wide_patterns = st.lists(st.one_of(wide_segments, st.just("*")), min_size=0, max_size=5).flatmap(
    lambda segs: st.sampled_from(["/".join([*segs, "**"])] + (["/".join(segs)] if segs else []))
)
# Mostly valid characters, with some that are not, to probe validation.
mixed_text = st.text(
    st.sampled_from([*SEGMENT_CHARS, "/", "*", " ", "é", "#", "\n", "\x00", "?", "%"]),
    max_size=300,
)


# --- parse_topic ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "reports",
        "reports/dist/Data-Printer/0.39",
        "a",
        "A-Z_a.z:0@9+~",
        "user@example.com/inbox",
        "jobs/01HZX3K9Q2",
        "x/" * 126 + "yz",
        "t" * 255,
        "..",
        "a/./b",
    ],
)
def test_parse_topic_accepts(topic: str) -> None:
    assert parse_topic(topic) == topic
    assert is_valid_topic(topic)


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("", "empty"),
        ("/", "empty or invalid segment"),
        ("/a", "empty or invalid segment"),
        ("a/", "empty or invalid segment"),
        ("a//b", "empty or invalid segment"),
        ("a b", "invalid segment"),
        ("a\nb", "invalid segment"),
        ("a\n", "invalid segment"),
        ("café", "invalid segment"),
        ("a#b", "invalid segment"),
        ("a?b", "invalid segment"),
        ("a%20b", "invalid segment"),
        ("a\\b", "invalid segment"),
        ("a\x00", "invalid segment"),
        ("a/*", "wildcard"),
        ("**", "wildcard"),
        ("reports/**", "wildcard"),
        ("a*", "invalid segment"),
        ("t" * 256, "255 bytes"),
        ("x/" * 127 + "yz", "255 bytes"),
    ],
)
def test_parse_topic_refuses(topic: str, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        parse_topic(topic)
    assert not is_valid_topic(topic)


def test_topic_length_is_counted_in_utf8_bytes() -> None:
    # 128 characters but 256 bytes: refused for its length before its characters are looked at.
    with pytest.raises(BadRequest, match="255 bytes"):
        parse_topic("é" * 128)
    with pytest.raises(BadRequest, match="invalid segment"):
        parse_topic("é" * 127)
    with pytest.raises(BadRequest, match="255 bytes"):
        parse_pattern("é" * 128)


@pytest.mark.parametrize("value", [None, 5, b"reports", ["reports"], {"t": 1}, 1.5, True])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(BadRequest, match="must be a string"):
        parse_topic(value)
    with pytest.raises(BadRequest, match="must be a string"):
        parse_pattern(value)
    assert not is_valid_topic(value)
    assert not is_valid_pattern(value)


@given(text=mixed_text)
@example(text="t" * 255)
@example(text="t" * 256)
def test_parse_topic_agrees_with_reference(text: str) -> None:
    assert is_valid_topic(text) == reference_is_topic(text)


@given(topic=wide_topics)
def test_generated_topics_are_accepted_when_short_enough(topic: str) -> None:
    assert is_valid_topic(topic) == (len(topic) <= MAX_TOPIC_BYTES)


# --- parse_pattern -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "reports",
        "reports/dist/*",
        "reports/**",
        "*",
        "**",
        "*/*",
        "*/**",
        "a/*/c/**",
        "reports/dist/Data-Printer/0.39",
        "p" * 255,
    ],
)
def test_parse_pattern_accepts(pattern: str) -> None:
    assert parse_pattern(pattern) == pattern
    assert is_valid_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("", "empty"),
        ("**/a", "last segment only"),
        ("a/**/b", "last segment only"),
        ("**/**", "last segment only"),
        ("a/***", "invalid segment"),
        ("a*", "invalid segment"),
        ("*a", "invalid segment"),
        ("a/b*c", "invalid segment"),
        ("a//*", "empty or invalid segment"),
        ("a/", "empty or invalid segment"),
        ("/**", "empty or invalid segment"),
        ("a b/*", "invalid segment"),
        ("p" * 256, "255 bytes"),
    ],
)
def test_parse_pattern_refuses(pattern: str, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        parse_pattern(pattern)
    assert not is_valid_pattern(pattern)


@given(text=mixed_text)
@example(text="a/**/b")
@example(text="**")
def test_parse_pattern_agrees_with_reference(text: str) -> None:
    assert is_valid_pattern(text) == reference_is_pattern(text)


@given(topic=wide_topics)
def test_every_topic_is_a_pattern(topic: str) -> None:
    assert is_valid_pattern(topic) == is_valid_topic(topic)


@pytest.mark.parametrize(
    ("pattern", "exact"),
    [("a", True), ("a/b/c", True), ("a/*", False), ("*", False), ("a/**", False), ("**", False)],
)
def test_is_exact(pattern: str, exact: bool) -> None:
    assert is_exact(pattern) is exact


# --- matches -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        # The contract's own examples.
        ("reports/dist/*", "reports/dist/Foo", True),
        ("reports/dist/*", "reports/dist/Foo/1.0", False),
        ("reports/**", "reports", True),
        ("reports/**", "reports/dist", True),
        ("reports/**", "reports/dist/Data-Printer/0.39", True),
        # Around them.
        ("reports/dist/*", "reports/dist", False),
        ("reports/dist/*", "reports/other/Foo", False),
        ("reports/**", "reportsX", False),
        ("reports/**", "report", False),
        ("reports/**", "other/reports", False),
        ("reports/dist/Data-Printer/0.39", "reports/dist/Data-Printer/0.39", True),
        ("reports/dist/Data-Printer/0.39", "reports/dist/Data-Printer/0.390", False),
        ("reports", "reports/dist", False),
        ("*", "a", True),
        ("*", "a/b", False),
        ("**", "a", True),
        ("**", "a/b/c/d", True),
        ("*/**", "a", True),
        ("*/**", "a/b/c", True),
        ("*/*", "a", False),
        ("*/*", "a/b", True),
        ("a/*/**", "a", False),
        ("a/*/**", "a/b", True),
        ("a/*/c", "a/b/c", True),
        ("a/*/c", "a/b/d", False),
        ("a/*/c", "a/c", False),
        ("A", "a", False),
    ],
)
def test_matches_examples(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected
    assert reference_matches(pattern, topic) is expected


@given(pattern=any_small_pattern, topic=small_topics)
def test_matches_agrees_with_regex_reference(pattern: str, topic: str) -> None:
    assert matches(pattern, topic) == reference_matches(pattern, topic)


@given(pattern=wide_patterns, topic=wide_topics)
def test_matches_agrees_with_regex_reference_wide(pattern: str, topic: str) -> None:
    assert matches(pattern, topic) == reference_matches(pattern, topic)


@given(data=st.data(), pattern=wide_patterns)
def test_instances_of_a_pattern_match_it(data: st.DataObject, pattern: str) -> None:
    """Fill each wildcard with generated segments: the result always matches."""
    parts: list[str] = []
    for seg in pattern.split("/"):
        if seg == "*":
            parts.append(data.draw(wide_segments))
        elif seg == "**":
            parts.extend(data.draw(st.lists(wide_segments, max_size=3)))
        else:
            parts.append(seg)
    if not parts:
        parts.append(data.draw(wide_segments))
    assert matches(pattern, "/".join(parts))


@given(topic=wide_topics)
def test_an_exact_topic_matches_only_itself(topic: str) -> None:
    assert matches(topic, topic)
    assert not matches(topic, topic + "x")
    assert not matches(topic, topic + "/x")
    assert not matches(topic + "/x", topic)


# --- covers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("reports/**", "reports/dist/*", True),
        ("reports/**", "reports/**", True),
        ("reports/**", "reports", True),
        ("reports/**", "reports/dist/Foo/1.0", True),
        ("reports/*", "reports/**", False),
        ("reports/*", "reports/dist", True),
        ("reports/*", "reports/*", True),
        ("reports/*", "reports", False),
        ("reports/dist/*", "reports/*", False),
        ("reports/dist", "reports/*", False),
        ("reports/dist", "reports/dist", True),
        ("reports/dist", "reports/other", False),
        ("**", "**", True),
        ("**", "a/*/b/**", True),
        ("a/**", "**", False),
        ("*", "**", False),
        ("*/*", "*", False),
        ("*/**", "a/**", True),
        ("*/**", "*", True),
        ("a/*/**", "a/**", False),
        ("a/*/**", "a/b/**", True),
        ("a/b/**", "a/*/**", False),
        ("a/*", "*/b", False),
        ("*/b", "a/b", True),
    ],
)
def test_covers_examples(outer: str, inner: str, expected: bool) -> None:
    assert covers(outer, inner) is expected


def test_pattern_matching_every_topic_covers_double_star() -> None:
    # ``*/**`` and ``**`` both match every topic (a topic has at least one segment).
    assert all(matches("*/**", t) for t in ("a", "a/b", "a/b/c"))
    assert covers("*/**", "**")
    assert covers("**", "*/**")


_FRESH = "zz"  # never drawn by the small strategies


def _witnesses(pattern: str, extra: int) -> list[str]:
    """Topics matched by ``pattern`` with every wildcard filled by a segment no pattern names.

    ``outer`` covers ``pattern`` exactly when it matches all of these (with ``extra`` at least
    the length of ``outer``): a fresh segment can only be matched by a wildcard, which would
    match any other segment in its place just as well.
    """
    fixed: list[str] = []
    for seg in pattern.split("/"):
        if seg == "**":
            return [t for n in range(extra + 1) if (t := "/".join(fixed + [_FRESH] * n))]
        fixed.append(_FRESH if seg == "*" else seg)
    return ["/".join(fixed)]


@given(outer=any_small_pattern, inner=any_small_pattern, topic=small_topics)
def test_covers_is_sound(outer: str, inner: str, topic: str) -> None:
    if covers(outer, inner) and matches(inner, topic):
        assert matches(outer, topic)


@given(outer=any_small_pattern, inner=any_small_pattern)
@example(outer="*/**", inner="**")
@example(outer="a/**", inner="a")
def test_covers_is_exact(outer: str, inner: str) -> None:
    expected = all(
        reference_matches(outer, t) for t in _witnesses(inner, len(outer.split("/")) + 1)
    )
    assert covers(outer, inner) == expected


@given(pattern=st.one_of(any_small_pattern, wide_patterns, wide_topics))
def test_covers_is_reflexive(pattern: str) -> None:
    assert covers(pattern, pattern)


@given(a=any_small_pattern, b=any_small_pattern, c=any_small_pattern)
def test_covers_is_transitive(a: str, b: str, c: str) -> None:
    if covers(a, b) and covers(b, c):
        assert covers(a, c)


@given(outer=any_small_pattern, topic=small_topics)
def test_covering_an_exact_topic_is_matching_it(outer: str, topic: str) -> None:
    assert covers(outer, topic) == matches(outer, topic)


@given(exact=small_topics, inner=any_small_pattern)
def test_an_exact_pattern_covers_only_itself(exact: str, inner: str) -> None:
    assert covers(exact, inner) == (exact == inner)


@given(topic=wide_topics)
def test_wildcards_cover_the_exact_topics_they_match(topic: str) -> None:
    segments = topic.split("/")
    assert covers("**", topic)
    assert covers("/".join(["*"] * len(segments)), topic)
    assert covers("/".join([*segments[:-1], "**"]), topic)
    assert not covers(topic, "/".join([*segments[:-1], "*"]))
    assert not covers(topic, topic + "/**")
