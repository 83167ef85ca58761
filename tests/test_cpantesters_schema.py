"""The JSON Schema validator and the shipped v3 specification: pure functions, no server."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from broker.cpantesters.schema import SchemaDefinitionError, SchemaError, Validator
from broker.cpantesters.spec import (
    document,
    parse_date_time,
    query_parameters,
    response_schema,
    validator,
)

FIXTURES = Path(__file__).parent / "data" / "cpantesters"
NEW_REPORT = "#/definitions/NewReport"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def errors_of(value: Any, schema: Any = NEW_REPORT, path: str = "/report") -> list[SchemaError]:
    return validator().validate(value, schema, path)


# --- the shared fixtures ----------------------------------------------------------------------


def test_valid_fixtures_pass() -> None:
    assert errors_of(fixture("perl5-valid.v3.json")) == []
    assert errors_of(fixture("perl6-valid.v3.json")) == []


def test_invalid_version_fixture_gives_the_pointer_the_original_api_gives() -> None:
    errors = errors_of(fixture("perl5-invalid-version-v.json"))
    assert len(errors) == 1
    assert errors[0].path == "/report/environment/language/version"
    assert errors[0].message.startswith("String does not match")
    assert errors[0].to_api() == {"message": errors[0].message, "path": errors[0].path}


def test_the_perl5_pattern_is_reached_only_through_the_discriminator() -> None:
    report = fixture("perl6-valid.v3.json")
    report["environment"]["language"]["version"] = "v6.c"
    assert errors_of(report) == []  # Perl 6 has no version pattern
    report["environment"]["language"]["name"] = "Perl 5"
    [error] = errors_of(report)
    assert error.path == "/report/environment/language/version"


def test_unknown_language_name_is_an_enum_error_not_a_crash() -> None:
    report = fixture("perl5-valid.v3.json")
    report["environment"]["language"]["name"] = "Perl 7"
    [error] = errors_of(report)
    assert error.path == "/report/environment/language/name"
    assert error.message == "Not in enum list: Perl 5, Perl 6."


def test_many_errors_are_reported_in_document_order() -> None:
    report = fixture("perl5-valid.v3.json")
    del report["reporter"]["email"]
    report["result"]["grade"] = "PASS"
    report["result"]["tests"] = -1
    report["distribution"]["prerequisites"][2]["need"] = 3
    report["environment"]["system"]["variables"]["PATH"] = ["/bin"]
    got = [(e.path, e.message) for e in errors_of(report)]
    assert got == [
        ("/report/reporter/email", "Missing property."),
        ("/report/environment/system/variables/PATH", "Expected string - got array."),
        ("/report/distribution/prerequisites/2/need", "Expected string - got integer."),
        ("/report/result/grade", "Not in enum list: pass, fail, na, unknown."),
        ("/report/result/tests", "-1 < minimum(0)"),
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "Expected object - got array."),
        ("report", "Expected object - got string."),
        (None, "Expected object - got null."),
        (1.5, "Expected object - got number."),
    ],
)
def test_a_body_that_is_not_an_object(value: Any, message: str) -> None:
    assert [(e.path, e.message) for e in errors_of(value)] == [("/report", message)]


def test_missing_top_level_parts_each_named() -> None:
    paths = [e.path for e in errors_of({})]
    assert paths == [f"/report/{k}" for k in ("reporter", "environment", "distribution", "result")]


# --- the validator's keywords ----------------------------------------------------------------


def test_types_are_strict_about_booleans_and_floats() -> None:
    v = Validator({})
    assert v.validate(True, {"type": "integer"})[0].message == "Expected integer - got boolean."
    assert v.validate(1.0, {"type": "integer"})[0].message == "Expected integer - got number."
    assert v.validate(False, {"type": "number"})
    assert v.validate(3, {"type": "number"}) == []
    assert v.validate(True, {"type": ["boolean", "null"]}) == []
    assert v.validate(None, {"type": ["boolean", "null"]}) == []
    assert v.validate("x", {"type": ["boolean", "null"]})[0].message == (
        "Expected boolean/null - got string."
    )


def test_pointers_escape_slash_and_tilde_in_keys() -> None:
    schema = {"type": "object", "additionalProperties": {"type": "string"}}
    errors = Validator({}).validate({"a/b": 1, "c~d": 2}, schema, "/x")
    assert sorted(e.path for e in errors) == ["/x/a~1b", "/x/c~0d"]


def test_items_closed_objects_lengths_and_formats() -> None:
    v = Validator({})
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "minLength": 2}, "maxItems": 3},
            "when": {"type": "string", "format": "date-time"},
            "n": {"type": "integer", "maximum": 10},
        },
    }
    value = {"tags": ["ok", "x", "yes", "no"], "when": "yesterday", "n": 11, "extra": 1, "z": 2}
    got = [(e.path, e.message) for e in v.validate(value, schema)]
    assert got == [
        ("/tags/1", "String is too short: 1/2."),
        ("/tags", "Too many items: 4/3."),
        ("/when", "Does not match date-time format."),
        ("/n", "11 > maximum(10)"),
        ("/", "Properties not allowed: extra, z."),
    ]
    good = {"tags": ["ok"], "when": "2017-04-24T12:34:56Z", "n": 3}
    assert v.validate(good, schema) == []
    assert v.validate({"when": "2017-04-24T12:34:56.25+02:00"}, schema) == []


def test_combinators() -> None:
    v = Validator({"definitions": {"S": {"type": "string"}, "N": {"type": "number"}}})
    one_of = {"oneOf": [{"$ref": "#/definitions/S"}, {"$ref": "#/definitions/N"}]}
    assert v.validate("a", one_of) == [] and v.validate(2, one_of) == []
    assert v.validate([], one_of)[0].message == "None of the oneOf rules match."
    overlapping = {"oneOf": [{"type": "integer"}, {"type": "number"}]}
    assert v.validate(2, overlapping)[0].message == "More than one of the oneOf rules match."
    assert v.validate(2, {"anyOf": [{"type": "integer"}, {"type": "number"}]}) == []
    all_of = {"allOf": [{"required": ["a"]}, {"required": ["b"]}]}
    assert [e.path for e in v.validate({}, all_of)] == ["/a", "/b"]


def test_error_count_is_bounded() -> None:
    v = Validator({}, max_errors=3)
    schema = {"type": "array", "items": {"type": "string"}}
    assert len(v.validate(list(range(100)), schema)) == 3


def test_recursive_definitions_compile() -> None:
    doc = {
        "definitions": {
            "Tree": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/definitions/Tree"}}},
            }
        }
    }
    v = Validator(doc)
    tree = {"kids": [{"kids": [{"kids": "no"}]}]}
    assert [e.path for e in v.validate(tree, "#/definitions/Tree")] == ["/kids/0/kids/0/kids"]


def test_document_faults_raise_schema_definition_error() -> None:
    v = Validator({"definitions": {}})
    with pytest.raises(SchemaDefinitionError):
        v.validate(1, "#/definitions/Missing")
    with pytest.raises(SchemaDefinitionError):
        v.validate(1, {"type": "integr"})
    with pytest.raises(SchemaDefinitionError):
        v.validate("a", {"pattern": "("})
    with pytest.raises(SchemaDefinitionError):
        v.validate(1, "http://example.com/schema#/x")


# --- the specification as shipped -------------------------------------------------------------


def test_the_shipped_spec_is_the_public_one() -> None:
    doc = document()
    assert doc["swagger"] == "2.0" and doc["basePath"] == "/v3"
    assert "NewReport" in doc["definitions"]


def test_every_get_operation_has_a_200_schema_and_refs_resolve() -> None:
    for path, item in document()["paths"].items():
        for method in item:
            if method != "get":
                continue
            schema = response_schema(path, method, 200)
            assert schema is not None, path
            # Compiling the whole response schema resolves every $ref in it.
            validator().validate(None, schema)


def test_query_parameters_come_from_the_spec() -> None:
    names = [p.name for p in query_parameters("/summary/{dist}/{version}")]
    assert names == ["since", "grade", "perl", "osname", "perl_maturity"]
    assert [p.name for p in query_parameters("/release/dist/{dist}")] == [
        "since",
        "limit",
        "maturity",
    ]
    by_name = {p.name: p for p in query_parameters("/summary/{dist}")}
    assert by_name["perl"].multi and not by_name["grade"].multi
    assert by_name["perl"].parse(["5.24.1", "5.26.0"]) == (["5.24.1", "5.26.0"], [])
    value, errors = by_name["grade"].parse(["PASS"])
    assert errors[0].path == "/grade" and errors[0].message.startswith("Not in enum list")
    value, errors = by_name["since"].parse(["2017-01-01T00:00:00Z"])
    assert errors == [] and value == parse_date_time("2017-01-01T00:00:00Z")
    assert by_name["since"].parse(["last week"])[1][0].path == "/since"
    limit = {p.name: p for p in query_parameters("/upload")}["limit"]
    assert limit.parse(["10"]) == (10, [])
    assert limit.parse(["ten"])[1] == [SchemaError("/limit", "Expected integer - got string.")]


def test_date_times() -> None:
    assert parse_date_time("1970-01-01T00:01:00Z") == 60.0
    assert parse_date_time("1970-01-01T01:01:00+01:00") == 60.0
    assert parse_date_time("1970-01-01T00:01:00") == 60.0
    with pytest.raises(ValueError):
        parse_date_time("soon")


def test_validation_leaves_the_value_alone() -> None:
    report = fixture("perl5-valid.v3.json")
    before = copy.deepcopy(report)
    errors_of(report)
    assert report == before
