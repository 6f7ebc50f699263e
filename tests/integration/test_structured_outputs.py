"""Structured outputs on the real engine (xgrammar) with the demo model.

The demo model writes code-shaped noise; left to itself it never produces JSON.
Every output below is valid only because the constraint made it so. The server
runs with compact JSON (`disable_any_whitespace`): otherwise this model fills the
space between two JSON tokens with whitespace until max_tokens.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import ServerProcess

MODEL = "codellama-serve-demo"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "line": {"type": "integer", "minimum": 0, "maximum": 9999},
        "kind": {"enum": ["def", "class"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "line", "kind", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "symbol", "schema": SCHEMA}}
REGEX = r"[a-z_]{2,12}\([a-z]{1,3}\) -> (int|str)"
CHOICES = ["def", "class", "import", "return"]
# EBNF (xgrammar's GBNF dialect): a one-line function header.
GRAMMAR = r"""root ::= "def " name "(" name "):"
name ::= [a-z] [a-z_]{0,8}"""
GRAMMAR_TEXT = r"def [a-z][a-z_]{0,8}\([a-z][a-z_]{0,8}\):"


@pytest.fixture(scope="module")
def structured(engine_features) -> ServerProcess:
    return engine_features  # xgrammar, compact JSON (n-gram speculation on too)


@pytest.fixture(scope="module")
def client(structured) -> openai.OpenAI:
    return openai.OpenAI(base_url=structured.openai_base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(structured):
    with httpx.Client(base_url=structured.base_url, timeout=120) as c:
        yield c


def completion_texts(http, body) -> list[str]:
    """The choices' texts, non-streamed or joined from the stream's chunks."""
    if not body.get("stream"):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return [c["text"] for c in r.json()["choices"]]
    texts: dict[int, list[str]] = {}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts.setdefault(c["index"], []).append(c["text"])
    return ["".join(texts[i]) for i in sorted(texts)]


def valid(text: str) -> dict:
    doc = json.loads(text)
    jsonschema.validate(doc, SCHEMA)
    return doc


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_on_completions(http, stream):
    body = {
        "prompt": "def parse(line):", "max_tokens": 200, "temperature": 0,
        "response_format": JSON_SCHEMA_FORMAT, "stream": stream,
    }  # fmt: skip
    (text,) = completion_texts(http, body)
    valid(text)


def test_json_schema_samples_all_valid(http):
    body = {
        "prompt": ["import os", "class Stack:"], "max_tokens": 200, "temperature": 1.0,
        "seed": 7, "n": 3, "structured_outputs": {"json": SCHEMA},
    }  # fmt: skip
    texts = completion_texts(http, body)
    assert len(texts) == 6
    docs = [valid(t) for t in texts]
    assert len({json.dumps(d) for d in docs}) > 1  # sampled, not one canned answer


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_with_the_openai_client_on_chat(client, stream):
    kwargs = dict(
        model=MODEL, messages=[{"role": "user", "content": "Describe a Python symbol."}],
        max_tokens=200, temperature=0, response_format=JSON_SCHEMA_FORMAT,
    )  # fmt: skip
    if stream:
        chunks = client.chat.completions.create(**kwargs, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].finish_reason == "stop"
        text = r.choices[0].message.content
    valid(text)


def test_response_format_with_the_openai_client_on_completions(client):
    # The client's completions.create has no response_format argument: vLLM's way.
    r = client.completions.create(
        model=MODEL, prompt="x = ", max_tokens=200, temperature=0,
        extra_body={"response_format": JSON_SCHEMA_FORMAT},
    )  # fmt: skip
    valid(r.choices[0].text)


@pytest.mark.parametrize("stream", [False, True])
def test_json_object(http, stream):
    # Any object will do; this model closes a string only by chance, so the prompt
    # is one where it may close the object at once. Unconstrained, it writes no JSON.
    body = {"prompt": "import json\ndata = json.loads('", "max_tokens": 64, "temperature": 0}
    (free,) = completion_texts(http, body)
    with pytest.raises(ValueError):
        json.loads(free)
    constrained = {**body, "response_format": {"type": "json_object"}, "stream": stream}
    (text,) = completion_texts(http, constrained)
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
        ({"choice": CHOICES}, lambda t: t in CHOICES),
        ({"grammar": GRAMMAR}, lambda t: re.fullmatch(GRAMMAR_TEXT, t)),
    ],
    ids=["regex", "choice", "grammar"],
)  # fmt: skip
def test_vllm_constraints(http, constraint, check, stream):
    body = {
        "prompt": "def f(x):", "max_tokens": 64, "temperature": 1.0, "seed": 3, "n": 4,
        "structured_outputs": constraint, "stream": stream,
    }  # fmt: skip
    texts = completion_texts(http, body)
    assert len(texts) == 4
    assert all(check(t) for t in texts), texts


def test_constraint_on_infill(http):
    body = {
        "prompt": "def area(r):\n    return ", "suffix": "\n", "max_tokens": 32,
        "temperature": 0, "structured_outputs": {"regex": r"[0-9]\.[0-9]{1,4} \* r \*\* 2"},
    }  # fmt: skip
    (text,) = completion_texts(http, body)
    assert re.fullmatch(r"[0-9]\.[0-9]{1,4} \* r \*\* 2", text), text


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"structured_outputs": {"regex": "[a-z"}}, "structured_outputs", "regex"),
        ({"structured_outputs": {"regex": "(?<=a)b"}}, "structured_outputs", "regex"),
        ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs",
         "undefined_rule"),
        ({"structured_outputs": {"grammar": 'root ::= "a" |'}}, "structured_outputs", "grammar"),
        ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": "str"}}}}},
         "structured_outputs", "properties/a/type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
          "schema": {"type": "string", "maxLength": "ten"}}}}, "response_format", "maxLength"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "grammar"}}, "response_format", ""),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
        ({"structured_outputs": {"regex": "a", "grammar": 'root ::= "a"'}}, "structured_outputs",
         "exactly one"),
        ({"guided_json": {"type": "object"}}, "guided_json", "structured_outputs.json"),
    ],
)  # fmt: skip
def test_invalid_constraints_are_400s(http, structured, body, param, fragment):
    for path, base in (
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ):
        for stream in (False, True):
            r = http.post(path, json={**base, **body, "max_tokens": 8, "stream": stream})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["param"] == param and fragment in error["message"], error
    assert structured.proc.poll() is None


async def test_constrained_and_free_requests_share_a_batch(structured):
    free = {"prompt": "def fib(n):", "max_tokens": 48, "temperature": 0}
    async with httpx.AsyncClient(base_url=structured.base_url, timeout=120) as c:
        alone = (await c.post("/v1/completions", json=free)).json()["choices"][0]["text"]
        constrained = {**free, "structured_outputs": {"json": SCHEMA}, "max_tokens": 200}
        rs = await asyncio.gather(
            *(c.post("/v1/completions", json=constrained) for _ in range(4)),
            *(c.post("/v1/completions", json=free) for _ in range(4)),
        )
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    for r in rs[:4]:
        valid(r.json()["choices"][0]["text"])
    # The unconstrained requests are untouched by their constrained neighbours.
    assert {r.json()["choices"][0]["text"] for r in rs[4:]} == {alone}
