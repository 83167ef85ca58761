"""The CPAN Testers API v3 specification, shipped with the package, and checks built from it.

``v3.json`` is the public Swagger 2.0 document of the CPAN Testers API (base path ``/v3``),
copied unchanged. Request bodies and query parameters are checked against it, and the tests
check every response against its response schemas, so the document is the contract.

Query parameters: each operation's parameters (``since``, ``limit``, ``maturity``, ``grade``,
``perl``, ``osname``, ``perl_maturity``) are read from the document, converted from text
(``integer``; ``array`` with ``collectionFormat: multi`` from repeated keys) and validated with
the same validator; a failure is reported with the pointer ``/<name>``. Unknown query
parameters are ignored.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from .schema import SchemaError, Validator

__all__ = [
    "BASE_PATH",
    "QueryParameter",
    "document",
    "parse_date_time",
    "query_parameters",
    "response_schema",
    "validator",
]

BASE_PATH = "/v3"


@cache
def document() -> Mapping[str, Any]:
    """The specification as loaded from the package (read once)."""
    text = resources.files(__package__).joinpath("v3.json").read_text(encoding="utf-8")
    doc: Mapping[str, Any] = json.loads(text)
    return doc


@cache
def validator() -> Validator:
    """The validator over the specification's definitions."""
    return Validator(document())


def response_schema(path: str, method: str, status: int) -> Mapping[str, Any] | None:
    """The schema of a response, with ``$ref`` responses followed; None when the document gives
    the status no schema. ``path`` is the template without the base path (``/release/dist/{dist}``).
    Raises KeyError for an operation or status the document does not have."""
    v = validator()
    responses = document()["paths"][path][method.lower()]["responses"]
    response = responses[str(status)] if str(status) in responses else responses["default"]
    while "$ref" in response:
        response = v.resolve(response["$ref"])
    schema: Mapping[str, Any] | None = response.get("schema")
    return schema


@dataclass(frozen=True, slots=True)
class QueryParameter:
    """One query parameter of an operation, as the document defines it."""

    name: str
    schema: Mapping[str, Any]
    multi: bool

    def parse(self, values: Sequence[str]) -> tuple[Any, list[SchemaError]]:
        """The typed value of the raw query values, and the errors (pointer ``/<name>``)."""
        path = "/" + self.name
        if self.multi:
            value: Any = list(values)
        else:
            raw = values[-1]
            value = raw
            if self.schema.get("type") == "integer":
                try:
                    value = int(raw, 10)
                except ValueError:
                    return None, [SchemaError(path, "Expected integer - got string.")]
            elif self.schema.get("type") == "number":
                try:
                    value = float(raw)
                except ValueError:
                    return None, [SchemaError(path, "Expected number - got string.")]
        errors = validator().validate(value, self.schema, path)
        if not errors and self.schema.get("format") == "date-time":
            try:
                value = parse_date_time(value)
            except ValueError:
                errors = [SchemaError(path, "Does not match date-time format.")]
        return value, errors


@cache
def query_parameters(path: str, method: str = "get") -> tuple[QueryParameter, ...]:
    """The query parameters of one operation, in document order."""
    v = validator()
    operation = document()["paths"][path][method]
    out: list[QueryParameter] = []
    for param in operation.get("parameters", ()):
        while "$ref" in param:
            param = v.resolve(param["$ref"])
        if param.get("in") != "query":
            continue
        schema = {
            k: param[k]
            for k in ("type", "format", "enum", "items", "minimum", "maximum", "pattern")
            if k in param
        }
        out.append(
            QueryParameter(
                name=param["name"],
                schema=schema,
                multi=param.get("type") == "array" and param.get("collectionFormat") == "multi",
            )
        )
    return tuple(out)


def parse_date_time(text: str) -> float:
    """Unix seconds of an RFC 3339 / ISO 8601 date-time; no zone means UTC. ValueError when
    the text is not one."""
    stamp = datetime.datetime.fromisoformat(text.replace("z", "Z"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    return stamp.timestamp()


def format_date_time(ts: float) -> str:
    """``2017-04-24T12:34:56Z``: whole seconds, UTC, as the API writes dates."""
    return datetime.datetime.fromtimestamp(int(ts), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
