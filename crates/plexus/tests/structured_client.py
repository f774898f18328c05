#!/usr/bin/env python3
"""Structured outputs and tool calling against a running Plexus gateway, with the official
`openai` client and `jsonschema` for validation.

    python3 crates/plexus/tests/structured_client.py http://127.0.0.1:PORT [API_KEY] [SAMPLED] [quick]

- `response_format` `json_schema` (strict) for a set of schemas (nested objects, arrays, enums,
  numbers with bounds, required and optional fields), greedy and SAMPLED (default 2) seeded
  samples each, plain and streamed: every answer must end by itself, parse, and validate;
  `json_object`; `chat.completions.parse` with a pydantic model.
- Tools: `tool_choice` "required" (every call's arguments validate against the function's
  schema), a named function, `parallel_tool_calls=False` (one call), streamed calls (name
  first, then `function.arguments` deltas), "none" (a plain answer), and a two-turn loop
  (the model calls, the client answers with a `tool` message, the model answers).
- Bad values (`{"type": "sound"}`, a schema the grammar engine refuses, an unknown
  `tool_choice` function) raise BadRequestError naming the parameter.

`quick` (for the slower split network) keeps the schemas (greedy and sampled), the refusals
and the required, named and streamed tool calls, and leaves out the streamed schemas,
`json_object`, `parse`, "none" and the loop.

Prints one line per check and `all structured checks passed`; exits non-zero on the first
failure, 3 when a package is missing (pip install -r scripts/requirements-ci.txt).
"""

import json
import sys

try:
    import jsonschema
    import openai
    from openai import OpenAI
    from pydantic import BaseModel, Field
except ImportError as e:
    print(f"{e}: install with `pip install -r scripts/requirements-ci.txt`", file=sys.stderr)
    sys.exit(3)

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 24},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    "shopping": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "item": {"type": "string", "maxLength": 16},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 12},
                    },
                    "required": ["item", "quantity"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 4,
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "shirt": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "in_stock": {"type": "boolean"},
        },
        "required": ["color", "size", "in_stock"],
        "additionalProperties": False,
    },
    "weather": {
        "type": "object",
        "properties": {
            "temperature": {"type": "number", "minimum": -50, "maximum": 60},
            "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
            "wind": {"type": "number", "exclusiveMinimum": 0, "maximum": 200},
        },
        "required": ["temperature", "humidity", "wind"],
        "additionalProperties": False,
    },
    "task": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 30},
            "priority": {"type": "integer", "enum": [1, 2, 3]},
            "done": {"type": "boolean"},
            "note": {"type": "string", "maxLength": 20},
            "subtasks": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
        },
        "required": ["title", "priority", "done"],
        "additionalProperties": False,
    },
}

PROMPTS = {
    "person": "Describe a person who lives in Paris as JSON.",
    "shopping": "Give me a short shopping list as JSON.",
    "shirt": "Pick a shirt for me as JSON.",
    "weather": "What is the weather like in London? Answer as JSON.",
    "task": "Write a to-do item as JSON.",
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}, "hours24": {"type": "boolean"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MAX_TOKENS = 200


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def expect_bad_request(what, param, fn):
    try:
        fn()
    except openai.BadRequestError as e:
        check(e.param == param, f"{what}: param {e.param!r}, want {param!r} ({e})")
        print(f"ok: {what} -> 400 naming {e.param!r}")
        return
    except openai.APIError as e:
        raise AssertionError(f"{what}: expected BadRequestError, got {type(e).__name__}: {e}")
    raise AssertionError(f"{what}: expected BadRequestError, the request succeeded")


def valid(text, schema, what):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{what}: not JSON ({e}): {text!r}")
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        raise AssertionError(f"{what}: does not validate ({e.message}): {text!r}")
    return value


def response_format(name):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def check_schemas(client, model, sampled, quick=False):
    outputs = 0
    for name, schema in SCHEMAS.items():
        messages = [{"role": "user", "content": PROMPTS[name]}]
        runs = [{"temperature": 0}] + [{"temperature": 1.0, "seed": s} for s in range(1, sampled + 1)]
        for run in runs:
            what = f"{name} {run}"
            r = client.chat.completions.create(
                model=model, messages=messages, max_tokens=MAX_TOKENS,
                response_format=response_format(name), **run,
            )
            c = r.choices[0]
            check(c.finish_reason == "stop", f"{what}: finish_reason {c.finish_reason}: {c.message.content!r}")
            valid(c.message.content, schema, what)
            outputs += 1
        if quick:
            print(f"ok: json_schema {name}: {len(runs)} answers validate: {c.message.content}")
            continue
        # Streamed: the same greedy answer, in pieces.
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
            response_format=response_format(name), stream=True,
        )
        text, finish = "", None
        for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        check(finish == "stop", f"{name} streamed: finish {finish}")
        value = valid(text, schema, f"{name} streamed")
        outputs += 1
        print(f"ok: json_schema {name}: {len(runs) + 1} answers validate, e.g. {json.dumps(value)}")
    return outputs


def check_json_object(client, model):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Give me a JSON object with a name and an age."}],
        max_tokens=MAX_TOKENS, temperature=0, response_format={"type": "json_object"},
    )
    c = r.choices[0]
    check(c.finish_reason == "stop", f"json_object: finish {c.finish_reason}: {c.message.content!r}")
    value = json.loads(c.message.content)
    check(isinstance(value, dict), f"json_object gave {value!r}")
    print(f"ok: json_object -> {c.message.content}")


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=100_000_000)


def check_parse(client, model):
    r = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Tell me about Paris."}],
        max_tokens=MAX_TOKENS, temperature=0, response_format=City,
    )
    city = r.choices[0].message.parsed
    check(isinstance(city, City), f"parse gave {city!r}")
    print(f"ok: chat.completions.parse(response_format=City) -> {city!r}")


def calls_of(r, what):
    c = r.choices[0]
    check(c.finish_reason == "tool_calls", f"{what}: finish_reason {c.finish_reason}: {c.message}")
    calls = c.message.tool_calls or []
    check(calls, f"{what}: no tool_calls: {c.message}")
    for call in calls:
        check(call.type == "function" and call.id, f"{what}: call {call}")
        check(call.function.name in SCHEMA_OF, f"{what}: unknown function {call.function.name}")
        valid(call.function.arguments, SCHEMA_OF[call.function.name], f"{what}: {call.function.name} arguments")
    return calls


def check_tools(client, model, sampled, quick=False):
    ask = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
    runs = [{"temperature": 0}] + [{"temperature": 1.0, "seed": s} for s in range(1, sampled + 1)]
    n = 0
    for run in runs:
        r = client.chat.completions.create(
            model=model, messages=ask, tools=TOOLS, tool_choice="required", max_tokens=MAX_TOKENS, **run,
        )
        n += len(calls_of(r, f"required {run}"))
    print(f"ok: tool_choice=required: {n} calls over {len(runs)} answers, all arguments validate")

    r = client.chat.completions.create(
        model=model, messages=ask, tools=TOOLS, max_tokens=MAX_TOKENS, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False,
    )
    calls = calls_of(r, "named get_time")
    check(len(calls) == 1 and calls[0].function.name == "get_time", f"named: {calls}")
    print(f"ok: named function, one call -> get_time({calls[0].function.arguments})")

    # Streamed: each call's id, type and name come first, then its arguments in deltas.
    stream = client.chat.completions.create(
        model=model, messages=ask, tools=TOOLS, tool_choice="required", max_tokens=MAX_TOKENS,
        temperature=0, stream=True,
    )
    calls, finish, arg_chunks = {}, None, 0
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.index not in calls:
                    check(d.id and d.type == "function" and d.function.name, f"first delta of a call: {d}")
                    calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    check(d.id is None and not d.function.name, f"later delta repeats the head: {d}")
                    calls[d.index]["arguments"] += d.function.arguments or ""
                    arg_chunks += 1
    check(finish == "tool_calls", f"streamed finish {finish}")
    check(calls and arg_chunks > 0, f"streamed calls {calls}, {arg_chunks} argument deltas")
    plain = calls_of(r_required_greedy(client, model, ask), "greedy required")
    for i, call in calls.items():
        valid(call["arguments"], SCHEMA_OF[call["name"]], f"streamed {call['name']}")
        check(call["name"] == plain[i].function.name and call["arguments"] == plain[i].function.arguments,
              f"streamed call {call} != plain {plain[i].function}")
    print(f"ok: streamed tool calls ({arg_chunks} argument deltas) equal the plain answer")
    if quick:
        return

    r = client.chat.completions.create(
        model=model, messages=ask, tools=TOOLS, tool_choice="none", max_tokens=16, temperature=0,
    )
    check(not r.choices[0].message.tool_calls and r.choices[0].message.content, f"none: {r.choices[0].message}")
    print(f"ok: tool_choice=none -> {r.choices[0].message.content!r}")


def r_required_greedy(client, model, ask):
    return client.chat.completions.create(
        model=model, messages=ask, tools=TOOLS, tool_choice="required", max_tokens=MAX_TOKENS, temperature=0,
    )


def check_loop(client, model):
    """The agent loop: the model calls a function, the client runs it and returns a `tool`
    message, and so on while the model calls (at most 3 rounds with `tool_choice` "auto", one
    call a round); then, if it still calls, a last round with "none" asks for the answer."""
    messages = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
    choice, rounds = "required", 0
    while True:
        r = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
            max_tokens=64, temperature=0,
        )
        c = r.choices[0]
        rounds += 1
        if choice == "none" or c.finish_reason != "tool_calls":
            break
        calls = calls_of(r, f"loop round {rounds}")
        check(len(calls) == 1, f"parallel_tool_calls=False gave {len(calls)} calls")
        messages.append(c.message)
        args = json.loads(calls[0].function.arguments)
        result = {"city": args.get("city", args.get("zone")), "temperature": 21, "sky": "sunny"}
        messages.append({"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps(result)})
        choice = "auto" if rounds < 3 else "none"
    check(c.message.content and not c.message.tool_calls, f"loop answer: {c}")
    check(c.finish_reason in ("stop", "length"), f"loop finish {c.finish_reason}")
    print(f"ok: tool loop: {rounds - 1} call(s), answer after round {rounds} "
          f"(tool_choice {choice}): {c.message.content!r}")


def check_refusals(client, model):
    ask = [{"role": "user", "content": "hi"}]
    expect_bad_request("response_format sound", "response_format", lambda: client.chat.completions.create(
        model=model, messages=ask, max_tokens=4, response_format={"type": "sound"}))
    bad_schema = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}},
        "required": ["n"]}}}
    expect_bad_request("unsatisfiable schema", "response_format", lambda: client.chat.completions.create(
        model=model, messages=ask, max_tokens=4, response_format=bad_schema))
    expect_bad_request("unknown tool_choice function", "tool_choice", lambda: client.chat.completions.create(
        model=model, messages=ask, max_tokens=4, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "nope"}}))
    expect_bad_request("tool message without tool_call_id", "messages[1].tool_call_id",
                       lambda: client.chat.completions.create(
                           model=model, max_tokens=4,
                           messages=ask + [{"role": "tool", "content": "{}"}]))


def main(url, api_key, sampled, quick):
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    check_refusals(client, model)
    n = check_schemas(client, model, sampled, quick)
    check_tools(client, model, sampled, quick)
    if not quick:
        check_json_object(client, model)
        check_parse(client, model)
        check_loop(client, model)
    print(f"ok: {n} schema answers, 100% valid")
    print("all structured checks passed")


if __name__ == "__main__":
    args = sys.argv[1:]
    quick = "quick" in args
    args = [a for a in args if a != "quick"]
    if len(args) not in (1, 2, 3):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        main(args[0], args[1] if len(args) >= 2 else "unused",
             int(args[2]) if len(args) == 3 else 2, quick)
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
