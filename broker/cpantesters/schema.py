"""A small JSON Schema validator for the subset that Swagger 2.0 documents use.

Supported keywords: ``$ref`` (local pointers such as ``#/definitions/Report`` or
``#/paths/~1release/get/responses/200``), ``type`` (one name or a list), ``required``,
``properties``, ``additionalProperties`` (a schema or ``false``), ``items`` (one schema),
``enum``, ``pattern`` (searched, not anchored, ASCII ``\\d`` and ``\\w``), ``minLength``,
``maxLength``, ``minimum``, ``maximum``, ``minItems``, ``maxItems``, ``format: date-time``
(RFC 3339), ``allOf``, ``anyOf``, ``oneOf`` and Swagger's ``discriminator``. Other keywords
(``title``, ``description``, ``x-...``) are ignored, as JSON Schema asks.

``discriminator`` follows Swagger 2.0: when an object is validated against a schema that names
a discriminator property, the value of that property names the definition the object must
match (``"name": "Perl 5"`` selects ``#/definitions/Perl 5``, which includes the base schema
through ``allOf``). A value that names no definition is checked against the base schema alone.

Errors carry the JSON pointer of the offending value and a message worded like Perl's
JSON::Validator (``Missing property.``, ``Expected string - got number.``, ``String does not
match ^5\\.\\d+\\.\\d+.``), because clients of the CPAN Testers API match on those words.

Schemas are compiled once into closures, so checking a 10 kB report costs a few hundred
microseconds. At most ``max_errors`` errors are collected; checking stops there. A ``$ref``
that does not resolve, or a keyword with a value of the wrong kind, raises
:class:`SchemaDefinitionError` when first used: that is a fault of the document, not of the
value checked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from protocol.errors import UsageError

__all__ = ["SchemaDefinitionError", "SchemaError", "Validator", "pointer_escape"]


class SchemaDefinitionError(UsageError):
    """The schema document itself is wrong (a dangling ``$ref``, a malformed keyword)."""


@dataclass(frozen=True, slots=True)
class SchemaError:
    """One way a value fails its schema: where (a JSON pointer) and why."""

    path: str
    message: str

    def to_api(self) -> dict[str, str]:
        """As an item of the API's ``errors`` list."""
        return {"message": self.message, "path": self.path}


def pointer_escape(key: str) -> str:
    """One JSON pointer segment (RFC 6901 section 3): ``~`` → ``~0``, ``/`` → ``~1``."""
    return key.replace("~", "~0").replace("/", "~1")


def _pointer_unescape(segment: str) -> str:
    return segment.replace("~1", "/").replace("~0", "~")


# (value, JSON pointer, errors, the object whose discriminator is being applied right now)
_Check = Callable[[Any, str, list[SchemaError], object], None]

_DATE_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})\Z", re.ASCII
)


def type_name(value: Any) -> str:
    """The JSON type of a decoded value, as messages name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_type(value: Any, name: str) -> bool:
    if name == "string":
        return isinstance(value, str)
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list | tuple)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    if name == "file":  # Swagger 2.0 form parameters; never a JSON value
        return False
    raise SchemaDefinitionError(f"unknown type {name!r} in schema")


_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "object": (dict,),
    "array": (list, tuple),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
    "file": (),
}


def _python_types(names: tuple[str, ...]) -> tuple[type, ...]:
    """The Python types of decoded JSON values of the given JSON types."""
    out: list[type] = []
    for name in names:
        out += _PYTHON_TYPES[name]
    return tuple(out)


class _Enough(Exception):
    """Raised inside a check once ``max_errors`` errors are collected."""


class Validator:
    """Validates decoded JSON values against the schemas of one Swagger/JSON Schema document.

    ``document`` is the whole document (``$ref`` pointers are resolved inside it). Thread-safe
    after construction only in the sense that compiling is idempotent; use it from one event
    loop.
    """

    def __init__(self, document: Mapping[str, Any], *, max_errors: int = 20) -> None:
        if max_errors < 1:
            raise UsageError("max_errors must be at least 1")
        self.document = document
        self.max_errors = max_errors
        self._by_ref: dict[str, _Check] = {}
        self._by_id: dict[int, tuple[Any, _Check]] = {}
        self._plain_by_id: dict[int, tuple[Any, _Check]] = {}

    # --- public API -----------------------------------------------------------------------------

    def resolve(self, ref: str) -> Any:
        """The part of the document a local ``$ref`` points to (``#/definitions/Name``)."""
        if not ref.startswith("#"):
            raise SchemaDefinitionError(f"only local $ref pointers are supported, not {ref!r}")
        node: Any = self.document
        for raw in ref[1:].split("/")[1:]:
            key = _pointer_unescape(raw)
            if isinstance(node, Mapping) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                raise SchemaDefinitionError(f"$ref {ref!r} does not resolve")
        return node

    def validate(
        self, value: Any, schema: Mapping[str, Any] | str, path: str = ""
    ) -> list[SchemaError]:
        """Every error of ``value`` against ``schema`` (a schema or a ``$ref`` string), up to
        ``max_errors``, in document order. ``path`` prefixes every error's pointer (for example
        ``/report`` for a request body named ``report``). An empty list means valid."""
        check = self._ref(schema) if isinstance(schema, str) else self._compile(schema)
        errors: list[SchemaError] = []
        try:
            check(value, path, errors, None)
        except _Enough:
            pass
        return errors

    def is_valid(self, value: Any, schema: Mapping[str, Any] | str) -> bool:
        """True when ``value`` matches ``schema``."""
        return not self.validate(value, schema)

    # --- compiling --------------------------------------------------------------------------------

    def _ref(self, ref: str) -> _Check:
        check = self._by_ref.get(ref)
        if check is not None:
            return check
        target: list[_Check] = []

        def lazy(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
            # Resolved on first use so that recursive definitions compile.
            if not target:
                target.append(self._compile(self.resolve(ref)))
            target[0](value, path, errors, active)

        self._by_ref[ref] = lazy
        return lazy

    def _compile(self, schema: Any, *, plain: bool = False) -> _Check:
        """A check for ``schema``; ``plain`` ignores its ``discriminator`` (used while the
        discriminated definition, which includes this schema, is being applied)."""
        cache = self._plain_by_id if plain else self._by_id
        hit = cache.get(id(schema))
        if hit is not None and hit[0] is schema:
            return hit[1]
        if not isinstance(schema, Mapping):
            raise SchemaDefinitionError(f"a schema must be an object, not {type_name(schema)}")
        if "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str):
                raise SchemaDefinitionError("$ref must be a string")
            check = self._ref(ref)
        else:
            check = self._build(schema, plain)
        cache[id(schema)] = (schema, check)
        return check

    def _build(self, schema: Mapping[str, Any], plain: bool) -> _Check:
        steps: list[_Check] = []
        types = self._types(schema)
        if "enum" in schema:
            steps.append(self._enum(schema["enum"]))
        steps += self._string_steps(schema)
        steps += self._number_steps(schema)
        steps += self._array_steps(schema)
        steps += self._object_steps(schema)
        steps += self._combinators(schema)
        discriminator = None if plain else schema.get("discriminator")
        base = steps
        max_errors = self.max_errors

        if types is None:

            def run(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
                for step in base:
                    step(value, path, errors, active)

        else:
            expected = "/".join(types)
            accept = _python_types(types)
            bool_ok = "boolean" in types

            def run(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
                # bool is an int in Python but never a JSON number.
                if not isinstance(value, accept) or (
                    (value is True or value is False) and not bool_ok
                ):
                    _add(errors, max_errors, path, f"Expected {expected} - got {type_name(value)}.")
                    return
                for step in base:
                    step(value, path, errors, active)

        if discriminator is None:
            return run
        if not isinstance(discriminator, str):
            raise SchemaDefinitionError("discriminator must be a property name")
        definitions = self.document.get("definitions") or {}
        plain_check = self._compile(schema, plain=True)

        def discriminate(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
            if active is value or not isinstance(value, dict):
                plain_check(value, path, errors, active)
                return
            name = value.get(discriminator)
            if isinstance(name, str) and name in definitions:
                self._ref("#/definitions/" + pointer_escape(name))(value, path, errors, value)
            else:
                plain_check(value, path, errors, value)

        return discriminate

    @staticmethod
    def _types(schema: Mapping[str, Any]) -> tuple[str, ...] | None:
        raw = schema.get("type")
        if raw is None:
            return None
        types = (raw,) if isinstance(raw, str) else tuple(raw)
        for t in types:
            _is_type(None, t)  # raises for an unknown type name
        return types

    def _enum(self, allowed: Any) -> _Check:
        if not isinstance(allowed, list) or not allowed:
            raise SchemaDefinitionError("enum must be a non-empty list")
        listed = ", ".join(str(v) for v in allowed)
        max_errors = self.max_errors

        def check(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
            for candidate in allowed:
                if value == candidate and type_name(value) == type_name(candidate):
                    return
            _add(errors, max_errors, path, f"Not in enum list: {listed}.")

        return check

    def _string_steps(self, schema: Mapping[str, Any]) -> list[_Check]:
        steps: list[_Check] = []
        max_errors = self.max_errors
        if "pattern" in schema:
            source = schema["pattern"]
            try:
                regex = re.compile(source, re.ASCII)
            except (re.error, TypeError) as exc:
                raise SchemaDefinitionError(f"pattern {source!r} is not a regex: {exc}") from None

            def pattern(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
                if isinstance(value, str) and regex.search(value) is None:
                    _add(errors, max_errors, path, f"String does not match {source}.")

            steps.append(pattern)
        low, high = schema.get("minLength"), schema.get("maxLength")
        if low is not None or high is not None:

            def length(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
                if not isinstance(value, str):
                    return
                if low is not None and len(value) < low:
                    _add(errors, max_errors, path, f"String is too short: {len(value)}/{low}.")
                if high is not None and len(value) > high:
                    _add(errors, max_errors, path, f"String is too long: {len(value)}/{high}.")

            steps.append(length)
        fmt = schema.get("format")
        if fmt == "date-time":

            def date_time(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
                if isinstance(value, str) and _DATE_TIME.match(value) is None:
                    _add(errors, max_errors, path, "Does not match date-time format.")

            steps.append(date_time)
        return steps

    def _number_steps(self, schema: Mapping[str, Any]) -> list[_Check]:
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is None and high is None:
            return []
        max_errors = self.max_errors

        def bounds(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                return
            if low is not None and value < low:
                _add(errors, max_errors, path, f"{value} < minimum({low})")
            if high is not None and value > high:
                _add(errors, max_errors, path, f"{value} > maximum({high})")

        return [bounds]

    def _array_steps(self, schema: Mapping[str, Any]) -> list[_Check]:
        steps: list[_Check] = []
        max_errors = self.max_errors
        if "items" in schema:
            if not isinstance(schema["items"], Mapping):
                raise SchemaDefinitionError("items must be one schema (tuple form unsupported)")
            item_check = self._compile(schema["items"])

            def items(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
                if isinstance(value, list | tuple):
                    for i, item in enumerate(value):
                        item_check(item, f"{path}/{i}", errors, None)

            steps.append(items)
        low, high = schema.get("minItems"), schema.get("maxItems")
        if low is not None or high is not None:

            def count(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
                if not isinstance(value, list | tuple):
                    return
                if low is not None and len(value) < low:
                    _add(errors, max_errors, path, f"Not enough items: {len(value)}/{low}.")
                if high is not None and len(value) > high:
                    _add(errors, max_errors, path, f"Too many items: {len(value)}/{high}.")

            steps.append(count)
        return steps

    def _object_steps(self, schema: Mapping[str, Any]) -> list[_Check]:
        steps: list[_Check] = []
        max_errors = self.max_errors
        required = schema.get("required")
        if required is not None:
            if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
                raise SchemaDefinitionError("required must be a list of property names")
            names = tuple((name, "/" + pointer_escape(name)) for name in required)

            def need(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
                if isinstance(value, dict):
                    for name, segment in names:
                        if name not in value:
                            _add(errors, max_errors, path + segment, "Missing property.")

            steps.append(need)
        properties = schema.get("properties")
        compiled: dict[str, _Check] = {}
        if properties is not None:
            if not isinstance(properties, Mapping):
                raise SchemaDefinitionError("properties must be an object")
            compiled = {name: self._compile(sub) for name, sub in properties.items()}
            table = [("/" + pointer_escape(name), name, check) for name, check in compiled.items()]

            def props(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
                if isinstance(value, dict):
                    for segment, name, check in table:
                        if name in value:
                            check(value[name], path + segment, errors, None)

            steps.append(props)
        extra = schema.get("additionalProperties")
        if extra is False:

            def closed(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
                if isinstance(value, dict):
                    unknown = sorted(k for k in value if k not in compiled)
                    if unknown:
                        _add(
                            errors,
                            max_errors,
                            path,
                            f"Properties not allowed: {', '.join(unknown)}.",
                        )

            steps.append(closed)
        elif isinstance(extra, Mapping):
            extra_check = self._compile(extra)

            def others(value: Any, path: str, errors: list[SchemaError], active: object) -> None:
                if isinstance(value, dict):
                    for name, item in value.items():
                        if name not in compiled:
                            extra_check(item, f"{path}/{pointer_escape(name)}", errors, None)

            steps.append(others)
        elif extra not in (None, True):
            raise SchemaDefinitionError("additionalProperties must be a schema or a boolean")
        return steps

    def _combinators(self, schema: Mapping[str, Any]) -> list[_Check]:
        steps: list[_Check] = []
        max_errors = self.max_errors
        for keyword in ("allOf", "anyOf", "oneOf"):
            subs = schema.get(keyword)
            if subs is None:
                continue
            if not isinstance(subs, list) or not subs:
                raise SchemaDefinitionError(f"{keyword} must be a non-empty list of schemas")
            checks = [self._compile(sub) for sub in subs]
            if keyword == "allOf":

                def all_of(
                    value: Any,
                    path: str,
                    errors: list[SchemaError],
                    active: object,
                    checks: list[_Check] = checks,
                ) -> None:
                    for check in checks:
                        check(value, path, errors, active)

                steps.append(all_of)
                continue

            def some_of(
                value: Any,
                path: str,
                errors: list[SchemaError],
                active: object,
                checks: list[_Check] = checks,
                keyword: str = keyword,
            ) -> None:
                matched = 0
                for check in checks:
                    scratch: list[SchemaError] = []
                    try:
                        check(value, path, scratch, active)
                    except _Enough:
                        pass
                    if not scratch:
                        matched += 1
                if matched == 0:
                    _add(errors, max_errors, path, f"None of the {keyword} rules match.")
                elif matched > 1 and keyword == "oneOf":
                    _add(errors, max_errors, path, "More than one of the oneOf rules match.")

            steps.append(some_of)
        return steps


def _add(errors: list[SchemaError], max_errors: int, path: str, message: str) -> None:
    errors.append(SchemaError(path or "/", message))
    if len(errors) >= max_errors:
        raise _Enough
