"""Schema migrations, one ordered list per backend.

A migration is a version number and the statements that bring the schema from the previous
version to it. Versions start at 1 and grow by one; a released migration is never edited, a
change is a new entry at the end. The store applies the missing ones at open, in one
transaction, and records each in the ``schema_version`` table.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Migration"]


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema: ``statements`` run in order inside the opening transaction."""

    version: int
    name: str
    statements: tuple[str, ...]
