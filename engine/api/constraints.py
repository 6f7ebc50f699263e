"""Structured outputs: `response_format` (OpenAI) and `structured_outputs` (vLLM's
extension), turned into one `OutputConstraint` for the engine, or a 400 that says
what is wrong, before the request is admitted.

The fields and their names are vLLM 0.32's: `response_format` {"type": "text" |
"json_object" | "json_schema"} and `structured_outputs` {json | regex | choice |
grammar | json_object}. vLLM removed the older `guided_*` fields and now ignores
them, so a client still sending them gets unconstrained text without a word; here
they are refused with the name to use instead.
"""

from __future__ import annotations

from typing import Any, Literal

from jsonschema import SchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from engine.api.errors import APIError, bad_request
from engine.llm import OutputConstraint

MAX_CHOICES = 1024

# vLLM's removed guided-decoding fields -> what replaced them.
REMOVED_GUIDED_FIELDS = {
    "guided_json": "structured_outputs.json (or response_format json_schema)",
    "guided_regex": "structured_outputs.regex",
    "guided_choice": "structured_outputs.choice",
    "guided_grammar": "structured_outputs.grammar",
    "guided_decoding_backend": "--structured-outputs-config backend (engine-wide)",
    "guided_whitespace_pattern": "--structured-outputs-config disable_any_whitespace",
}


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # `schema` in the wire format; pydantic models have a `schema` method of their own.
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (its `StructuredOutputsParams`): exactly one constraint."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON Schema.")
    regex: str | None = Field(None, description="A regular expression the output matches.")
    choice: list[str] | None = Field(
        None, max_length=MAX_CHOICES, description="The output is one of these strings."
    )
    grammar: str | None = Field(None, description="A context-free grammar (EBNF or Lark).")
    json_object: StrictBool | None = Field(None, description="Any JSON object.")
    # Accepted as vLLM's protocol does, but vLLM 0.32 reads them engine-wide only
    # (--structured-outputs-config): a request setting them is refused, not ignored.
    disable_any_whitespace: StrictBool = False
    disable_additional_properties: StrictBool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None


class StructuredOutputFields(BaseModel):
    """The request fields of structured outputs (completions and chat alike)."""

    model_config = ConfigDict(extra="ignore")
    response_format: ResponseFormat | None = Field(
        None, description='{"type": "json_object"} or {"type": "json_schema", "json_schema": ...}'
    )
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's constraints: one of json, regex, choice, grammar, json_object."
    )
    # vLLM's removed fields, kept only to refuse them (see REMOVED_GUIDED_FIELDS).
    guided_json: Any = Field(None, description="Removed in vLLM: use structured_outputs.json.")
    guided_regex: Any = Field(None, description="Removed in vLLM: use structured_outputs.regex.")
    guided_choice: Any = Field(None, description="Removed in vLLM: use structured_outputs.choice.")
    guided_grammar: Any = Field(
        None, description="Removed in vLLM: use structured_outputs.grammar."
    )
    guided_decoding_backend: Any = Field(None, description="Removed in vLLM.")
    guided_whitespace_pattern: Any = Field(None, description="Removed in vLLM.")


def invalid(message: str, param: str) -> APIError:
    """A 400 for a constraint that cannot be used (the code vLLM-facing checks share)."""
    return bad_request(message, param=param, code="invalid_constraint")


def output_constraint(req: StructuredOutputFields) -> tuple[OutputConstraint, str] | None:
    """The request's constraint and the field it came from, or None; a 400 if invalid."""
    for name, instead in REMOVED_GUIDED_FIELDS.items():
        if getattr(req, name) is not None:
            raise invalid(
                f"'{name}' was removed from vLLM's API (vLLM now ignores it, leaving the "
                f"output unconstrained); use {instead}",
                param=name,
            )
    fmt = req.response_format
    constrained_format = fmt is not None and fmt.type != "text"
    if constrained_format and req.structured_outputs is not None:
        raise invalid(
            "use either response_format or structured_outputs, not both",
            param="structured_outputs",
        )
    if fmt is not None and constrained_format:
        return _from_response_format(fmt), "response_format"
    if req.structured_outputs is not None:
        return _from_structured_outputs(req.structured_outputs), "structured_outputs"
    return None


def _from_response_format(fmt: ResponseFormat) -> OutputConstraint:
    if fmt.type == "json_object":
        return OutputConstraint("json_object", True)
    if fmt.json_schema is None:
        raise invalid(
            "response_format type 'json_schema' needs a 'json_schema' object with a 'schema'",
            param="response_format",
        )
    return OutputConstraint("json", checked_schema(fmt.json_schema.json_schema, "response_format"))


def _from_structured_outputs(so: StructuredOutputs) -> OutputConstraint:
    param = "structured_outputs"
    for option in ("disable_any_whitespace", "disable_additional_properties"):
        if getattr(so, option):
            raise invalid(
                f"structured_outputs.{option} applies to the whole engine in vLLM: "
                f"start the server with --structured-outputs-config '{{\"{option}\": true, ...}}'",
                param=param,
            )
    if so.whitespace_pattern is not None:
        raise invalid(
            "structured_outputs.whitespace_pattern is not used by vLLM's grammar backends",
            param=param,
        )
    if so.structural_tag is not None:
        raise invalid(
            "structured_outputs.structural_tag (tool-call tags) is not supported: "
            "Code Llama has no tool-calling format",
            param=param,
        )
    given = {
        kind: value
        for kind, value in (
            ("json", so.json_), ("regex", so.regex), ("choice", so.choice),
            ("grammar", so.grammar), ("json_object", so.json_object),
        )
        if value is not None
    }  # fmt: skip
    if len(given) != 1:
        found = ", ".join(given) or "none"
        raise invalid(
            "structured_outputs needs exactly one of json, regex, choice, grammar, json_object "
            f"(found: {found})",
            param=param,
        )
    ((kind, value),) = given.items()
    return _checked(kind, value, param)


def _checked(kind: str, value: Any, param: str) -> OutputConstraint:
    if kind == "json":
        return OutputConstraint("json", checked_schema(value, param))
    if kind == "json_object" and value is not True:
        raise invalid("structured_outputs.json_object must be true if set", param=param)
    if kind == "choice" and (not value or any(not c for c in value)):
        raise invalid("structured_outputs.choice needs non-empty strings", param=param)
    if kind in ("regex", "grammar") and (not value.strip() or "\x00" in value):
        raise invalid(f"structured_outputs.{kind} is empty or holds a NUL", param=param)
    return OutputConstraint(kind, value)  # type: ignore[arg-type]


def checked_schema(schema: Any, param: str) -> dict[str, Any]:
    """`schema` as a dict if it is a valid JSON Schema (by its own `$schema` draft,
    2020-12 if none), else a 400 naming the offending keyword."""
    if isinstance(schema, str):
        import json

        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise invalid(f"the JSON schema is not valid JSON: {e}", param=param) from None
    if not isinstance(schema, dict):
        raise invalid("the JSON schema must be a JSON object", param=param)
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise invalid(f"invalid JSON schema at {where}: {e.message}", param=param) from None
    return schema
