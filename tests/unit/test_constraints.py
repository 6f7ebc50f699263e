"""response_format / structured_outputs -> one OutputConstraint, or a 400 naming what
is wrong (the API's own checks; the engine's grammar checks run in tests/integration)."""

from __future__ import annotations

import pytest

from engine.api.constraints import output_constraint
from engine.api.errors import APIError
from engine.api.schemas import ChatCompletionRequest, CompletionRequest
from engine.llm import OutputConstraint

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def constraint(**fields):
    found = output_constraint(CompletionRequest(prompt="x", **fields))
    return found


def refused(**fields) -> APIError:
    with pytest.raises(APIError) as e:
        constraint(**fields)
    assert e.value.status == 400
    return e.value


def test_no_constraint_by_default_or_with_text_format():
    assert constraint() is None
    assert constraint(response_format={"type": "text"}) is None


@pytest.mark.parametrize(
    ("fields", "expected", "param"),
    [
        ({"response_format": {"type": "json_object"}}, OutputConstraint("json_object", True),
         "response_format"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
         OutputConstraint("json", SCHEMA), "response_format"),
        ({"structured_outputs": {"json": SCHEMA}}, OutputConstraint("json", SCHEMA),
         "structured_outputs"),
        ({"structured_outputs": {"json": '{"type": "integer"}'}},
         OutputConstraint("json", {"type": "integer"}), "structured_outputs"),
        ({"structured_outputs": {"regex": "[a-z]+"}}, OutputConstraint("regex", "[a-z]+"),
         "structured_outputs"),
        ({"structured_outputs": {"choice": ["yes", "no"]}},
         OutputConstraint("choice", ["yes", "no"]), "structured_outputs"),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}},
         OutputConstraint("grammar", 'root ::= "a"'), "structured_outputs"),
        ({"structured_outputs": {"json_object": True}}, OutputConstraint("json_object", True),
         "structured_outputs"),
    ],
)  # fmt: skip
def test_each_form_becomes_one_constraint(fields, expected, param):
    assert constraint(**fields) == (expected, param)


def test_chat_takes_the_same_fields():
    req = ChatCompletionRequest(
        messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"}
    )
    assert output_constraint(req) == (OutputConstraint("json_object", True), "response_format")


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs a 'json_schema'"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "a", "schema": {"type": "nonsense"}}}},
         "response_format", "invalid JSON schema at type: 'nonsense' is not valid"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "a", "schema": {
                                  "type": "object", "properties": {"a": {"minLength": -1}}}}}},
         "response_format", "at properties/a/minLength"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "not valid JSON"),
        ({"structured_outputs": {"json": "[1]"}}, "structured_outputs", "must be a JSON object"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one of"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
         "found: regex, choice"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty strings"),
        ({"structured_outputs": {"choice": ["a", ""]}}, "structured_outputs", "non-empty"),
        ({"structured_outputs": {"regex": "a\x00"}}, "structured_outputs", "NUL"),
        ({"structured_outputs": {"grammar": "   "}}, "structured_outputs", "empty"),
        ({"structured_outputs": {"json_object": False}}, "structured_outputs", "must be true"),
        ({"structured_outputs": {"regex": "a", "disable_any_whitespace": True}},
         "structured_outputs", "--structured-outputs-config"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "not supported"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
         "structured_outputs", "not both"),
        ({"guided_regex": "a+"}, "guided_regex", "use structured_outputs.regex"),
        ({"guided_json": SCHEMA}, "guided_json", "removed"),
        ({"guided_choice": ["a"]}, "guided_choice", "structured_outputs.choice"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400s_naming_the_field(fields, param, fragment):
    error = refused(**fields)
    assert error.param == param and error.code == "invalid_constraint"
    assert fragment in error.message, error.message


@pytest.mark.parametrize(
    "fields",
    [
        {"response_format": {"type": "yaml"}},
        {"response_format": "json"},
        {"structured_outputs": {"regexp": "a"}},  # a typo is not silently ignored
        {"structured_outputs": {"choice": "yes"}},
        {"structured_outputs": {"json_object": "true"}},
        {"structured_outputs": "regex"},
    ],
)
def test_malformed_fields_fail_schema_validation(fields):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", **fields)


def test_engine_messages_keep_the_reason_and_drop_native_noise():
    from engine.llm import _with_cause

    try:
        try:
            raise RuntimeError(
                "[09:46:02] /project/cpp/grammar_parser.cc:820: EBNF parser error at line 1, "
                'column 10: Rule "undefined_rule" is not defined\n'
            )
        except RuntimeError as native:
            raise ValueError("Invalid grammar specification.") from native
    except ValueError as e:
        message = _with_cause(e)
    assert message == (
        "Invalid grammar specification: EBNF parser error at line 1, column 10: "
        'Rule "undefined_rule" is not defined'
    )
