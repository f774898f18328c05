#!/usr/bin/env python3
"""The other API dialects against a running Plexus gateway, each with its official client and
its defaults: Anthropic Messages (`anthropic`), OpenAI Responses (`openai`'s
`client.responses.create`) and Ollama (`ollama`). The OpenAI chat answer to the same greedy
request is the reference: every dialect runs on the same engine path, so the text must match.

    python3 crates/plexus/tests/dialects_client.py http://127.0.0.1:PORT API_KEY PRICE [quick]

PRICE is the gateway's micro-PLX per completion token: one request of each dialect is
charged exactly its output tokens x PRICE, as a chat completion is (`GET /v1/account`).

- Anthropic: a greedy message equals the greedy chat completion; `system`; `stop_sequences`
  (`stop_reason: "stop_sequence"` naming the sequence, text cut before it); `max_tokens`
  (`stop_reason: "max_tokens"`, `usage`); the event stream (`message_start` ...
  `message_stop`, text deltas joined = the message); tools with `tool_choice` any / a named
  tool (a `tool_use` block whose `input` validates, `stop_reason: "tool_use"`), streamed
  (`input_json_delta`), and a tool-result turn answered with text; refusals in Anthropic's
  error shape naming the parameter (missing `max_tokens`, an unknown field, `thinking`,
  an image block), unknown model 404, wrong key 401.
- Responses: text, usage and status equal chat's; the event stream's deltas join to the
  text and `response.completed` carries the response; `tool_choice` required gives a
  `function_call` whose arguments validate (streamed too); `text.format` json_schema
  validates; a `function_call_output` turn is answered; refusals naming the parameter.
- Ollama: `/api/tags` lists the model; chat (with `options`) equals the chat completion, its
  counts and `done_reason`; streamed JSON lines join to the text; generate renders like chat;
  tools; `format` with a schema validates; `/api/show`; refusals (`options.num_ctx`,
  `keep_alive`) and 404.

`quick` (for the slower split network) keeps the greedy equality, the stream and the tool
call. Prints one line per check and `all dialect checks passed`; exits non-zero on the first
failure, 3 when a package is missing (pip install -r scripts/requirements-ci.txt).
"""

import json
import sys
import time
import urllib.request

try:
    import anthropic
    import jsonschema
    import ollama
    import openai
    from openai import OpenAI
except ImportError as e:
    print(f"{e}: install with `pip install -r scripts/requirements-ci.txt`", file=sys.stderr)
    sys.exit(3)

URL = sys.argv[1]
KEY = sys.argv[2]
PRICE = int(sys.argv[3])
QUICK = "quick" in sys.argv[4:]

SYSTEM = "You are a helpful assistant. Answer briefly."
QUESTION = "Name three colors of the rainbow."
WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def spent():
    """The key's spent total once no escrow is held."""
    for _ in range(200):
        req = urllib.request.Request(f"{URL}/v1/account", headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            a = json.load(r)
        if a["escrow"] == 0:
            return a["spent"]
        time.sleep(0.05)
    raise AssertionError(f"escrow still held: {a}")


def charged(what, tokens, before):
    after = spent()
    check(after - before == tokens * PRICE, f"{what}: charged {after - before} = {tokens} x {PRICE}")
    return after


oa = OpenAI(base_url=f"{URL}/v1", api_key=KEY)
model = oa.models.list().data[0].id
ref = oa.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
    max_tokens=24,
    temperature=0,
)
ref_text = ref.choices[0].message.content
check(ref_text, f"reference chat answer {ref_text!r}")

# --- Anthropic Messages -------------------------------------------------------------------
an = anthropic.Anthropic(base_url=URL, api_key=KEY)
# This client version has no `temperature` parameter (the API dropped it); Plexus still takes
# it, as older clients send it, so greedy answers ask for it in the body.
GREEDY_AN = {"temperature": 0}
before = spent()
msg = an.messages.create(
    model=model,
    max_tokens=24,
    system=SYSTEM,
    messages=[{"role": "user", "content": QUESTION}],
    extra_body=GREEDY_AN,
)
check(msg.type == "message" and msg.role == "assistant", "anthropic: a message object")
check(
    len(msg.content) == 1 and msg.content[0].type == "text" and msg.content[0].text == ref_text,
    f"anthropic: greedy text equals the chat completion's ({msg.content[0].text!r})",
)
check(
    msg.usage.input_tokens == ref.usage.prompt_tokens
    and msg.usage.output_tokens == ref.usage.completion_tokens,
    f"anthropic: usage {msg.usage.input_tokens}/{msg.usage.output_tokens} = chat's",
)
charged("anthropic", msg.usage.output_tokens, before)
n = an.messages.count_tokens(
    model=model, system=SYSTEM, messages=[{"role": "user", "content": QUESTION}]
).input_tokens
check(n == msg.usage.input_tokens, f"anthropic: count_tokens {n} = the message's input_tokens")
check(
    msg.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[ref.choices[0].finish_reason],
    f"anthropic: stop_reason {msg.stop_reason}",
)

with an.messages.stream(
    model=model,
    max_tokens=24,
    system=SYSTEM,
    messages=[{"role": "user", "content": QUESTION}],
    extra_body=GREEDY_AN,
) as stream:
    streamed = "".join(stream.text_stream)
    final = stream.get_final_message()
check(streamed == ref_text, f"anthropic: streamed text equals ({streamed!r})")
check(
    final.stop_reason == msg.stop_reason and final.usage.output_tokens == msg.usage.output_tokens,
    "anthropic: the stream's final message has the stop reason and usage",
)
events = [
    e.type
    for e in an.messages.create(
        model=model,
        max_tokens=8,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body=GREEDY_AN,
        stream=True,
    )
]
check(
    events[0] == "message_start"
    and events[1] == "content_block_start"
    and events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    and set(events[2:-3]) == {"content_block_delta"},
    f"anthropic: event order {events[:3]} ... {events[-3:]}",
)


def weather_call(tool_choice, stream=False):
    kwargs = dict(
        model=model,
        max_tokens=64,
        tools=[WEATHER],
        tool_choice=tool_choice,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        extra_body=GREEDY_AN,
    )
    if stream:
        with an.messages.stream(**kwargs) as s:
            return s.get_final_message()
    return an.messages.create(**kwargs)


# One call each: with parallel calls allowed the small model keeps calling until max_tokens.
for choice, stream in [
    ({"type": "any", "disable_parallel_tool_use": True}, False),
    ({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}, True),
]:
    m = weather_call(choice, stream)
    uses = [b for b in m.content if b.type == "tool_use"]
    check(
        m.stop_reason == "tool_use" and len(uses) >= 1 and uses[0].name == "get_weather",
        f"anthropic: tool_choice {choice['type']} (stream={stream}) calls get_weather",
    )
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])
    check(uses[0].id.startswith("toolu_"), f"anthropic: tool input {uses[0].input} validates")

if not QUICK:
    call = weather_call({"type": "any", "disable_parallel_tool_use": True})
    use = [b for b in call.content if b.type == "tool_use"]
    check(len(use) == 1 and len(call.content) == 1, "anthropic: disable_parallel_tool_use gives one call")
    answer = an.messages.create(
        model=model,
        max_tokens=32,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": call.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use[0].id, "content": "Sunny, 21 C"}
                ],
            },
        ],
        extra_body=GREEDY_AN,
    )
    check(
        answer.content[0].type == "text"
        and answer.content[0].text
        and answer.stop_reason in ("end_turn", "max_tokens"),
        f"anthropic: answers the tool result in text ({answer.content[0].text!r})",
    )

    words = ref_text.split()
    stop = words[len(words) // 2] if len(words) > 2 else None
    if stop:
        s = an.messages.create(
            model=model,
            max_tokens=24,
            system=SYSTEM,
            messages=[{"role": "user", "content": QUESTION}],
            extra_body=GREEDY_AN,
            stop_sequences=[stop, "never-there"],
        )
        check(
            s.stop_reason == "stop_sequence"
            and s.stop_sequence == stop
            and s.content[0].text == ref_text[: ref_text.index(stop)],
            f"anthropic: stop_sequences {stop!r} -> {s.content[0].text!r}",
        )

    def refused(what, param, exc=anthropic.BadRequestError, **kwargs):
        args = dict(model=model, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        args.update(kwargs)
        try:
            an.messages.create(**args)
        except exc as e:
            body = e.body
            check(
                body["type"] == "error" and param in body["error"]["message"],
                f"anthropic: {what} refused ({e.status_code} {body['error']['type']}: "
                f"{body['error']['message'][:70]})",
            )
            return
        check(False, f"anthropic: {what} was accepted")

    refused("a missing max_tokens", "max_tokens", max_tokens=anthropic.omit, timeout=60)
    refused("an unknown field", "frequency_penalty", extra_body={"frequency_penalty": 1})
    refused("thinking", "thinking", thinking={"type": "enabled", "budget_tokens": 1024})
    refused(
        "an image block",
        "messages[0].content[0].type",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}
                ],
            }
        ],
    )
    refused("an unknown model", "no-such-model", exc=anthropic.NotFoundError, model="no-such-model")
    try:
        anthropic.Anthropic(base_url=URL, api_key="wrong-key", max_retries=0).messages.create(
            model=model, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        check(False, "anthropic: a wrong key was accepted")
    except anthropic.AuthenticationError as e:
        check(
            e.body["error"]["type"] == "authentication_error",
            "anthropic: a wrong key gets 401 authentication_error",
        )

# --- OpenAI Responses ---------------------------------------------------------------------
before = spent()
r = oa.responses.create(
    model=model, instructions=SYSTEM, input=QUESTION, max_output_tokens=24, temperature=0
)
charged("responses", r.usage.output_tokens, before)
check(r.object == "response" and r.output_text == ref_text, f"responses: text equals ({r.output_text!r})")
check(
    r.usage.input_tokens == ref.usage.prompt_tokens
    and r.usage.output_tokens == ref.usage.completion_tokens,
    "responses: usage equals chat's",
)
check(
    r.status == ("incomplete" if ref.choices[0].finish_reason == "length" else "completed"),
    f"responses: status {r.status}",
)
deltas, final = [], None
for e in oa.responses.create(
    model=model, instructions=SYSTEM, input=QUESTION, max_output_tokens=24, temperature=0, stream=True
):
    if e.type == "response.output_text.delta":
        deltas.append(e.delta)
    elif e.type in ("response.completed", "response.incomplete"):
        final = e.response
check("".join(deltas) == ref_text, "responses: streamed deltas join to the text")
check(final is not None and final.output_text == ref_text, "responses: the last event has the response")
WEATHER_FN = {
    "type": "function",
    "name": "get_weather",
    "description": WEATHER["description"],
    "parameters": WEATHER["input_schema"],
    "strict": True,
}
for stream in [False, True] if not QUICK else [False]:
    kwargs = dict(
        model=model,
        input="What is the weather in Paris?",
        tools=[WEATHER_FN],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=64,
        temperature=0,
    )
    if stream:
        got = None
        for e in oa.responses.create(stream=True, **kwargs):
            if e.type in ("response.completed", "response.incomplete"):
                got = e.response
    else:
        got = oa.responses.create(**kwargs)
    calls = [o for o in got.output if o.type == "function_call"]
    check(
        got.status == "completed" and len(calls) == 1 and calls[0].name == "get_weather",
        f"responses: one function call (stream={stream})",
    )
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["input_schema"])
    check(True, f"responses: arguments {calls[0].arguments} validate")
if not QUICK:
    schema = {
        "type": "object",
        "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    }
    r = oa.responses.create(
        model=model,
        input="Pick a color.",
        text={"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}},
        max_output_tokens=32,
        temperature=0,
    )
    jsonschema.validate(json.loads(r.output_text), schema)
    check(True, f"responses: text.format json_schema validates ({r.output_text})")
    follow = oa.responses.create(
        model=model,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
             "arguments": calls[0].arguments},
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"},
        ],
        tools=[WEATHER_FN],
        tool_choice="none",
        max_output_tokens=24,
        temperature=0,
    )
    check(follow.output_text, f"responses: answers the function output ({follow.output_text!r})")
    for what, param, kwargs in [
        ("previous_response_id", "previous_response_id", {"previous_response_id": "resp_1"}),
        ("store", "store", {"store": True}),
        ("a web search tool", "tools[0].type", {"tools": [{"type": "web_search"}]}),
        ("reasoning", "reasoning", {"reasoning": {"effort": "low"}}),
    ]:
        try:
            oa.responses.create(model=model, input="hi", max_output_tokens=4, **kwargs)
            check(False, f"responses: {what} was accepted")
        except openai.BadRequestError as e:
            check(e.body["param"] == param, f"responses: {what} refused naming {param}")

# --- Ollama -------------------------------------------------------------------------------
ol = ollama.Client(host=URL, headers={"Authorization": f"Bearer {KEY}"})
names = [m.model for m in ol.list().models]
check(model in names, f"ollama: /api/tags lists {names}")
GREEDY = {"temperature": 0, "num_predict": 24, "repeat_penalty": 1.0}
before = spent()
c = ol.chat(
    model=model,
    messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
    options=GREEDY,
)
charged("ollama", c.eval_count, before)
check(c.message.content == ref_text and c.done, f"ollama: chat text equals ({c.message.content!r})")
check(
    c.prompt_eval_count == ref.usage.prompt_tokens
    and c.eval_count == ref.usage.completion_tokens
    and c.done_reason == ref.choices[0].finish_reason,
    f"ollama: counts {c.prompt_eval_count}/{c.eval_count}, done_reason {c.done_reason}",
)
parts = list(
    ol.chat(
        model=model,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        options=GREEDY,
        stream=True,
    )
)
check(
    "".join(p.message.content for p in parts) == ref_text and parts[-1].done and not parts[0].done,
    f"ollama: {len(parts)} streamed lines join to the text",
)
g = ol.generate(model=model, system=SYSTEM, prompt=QUESTION, options=GREEDY)
check(g.response == ref_text, "ollama: generate renders the chat template like chat")
t = ol.chat(
    model=model,
    messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    tools=[{"type": "function", "function": {"name": "get_weather", "description": "The weather",
            "parameters": WEATHER["input_schema"]}}],
    options={"temperature": 0, "num_predict": 64},
)
if t.message.tool_calls:
    jsonschema.validate(dict(t.message.tool_calls[0].function.arguments), WEATHER["input_schema"])
    check(True, f"ollama: tool call {t.message.tool_calls[0].function.name} validates")
else:
    check(t.message.content, f"ollama: with tools (auto) the model answered in text {t.message.content!r}")
if not QUICK:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    j = ol.chat(model=model, messages=[{"role": "user", "content": "A number?"}], format=schema,
                options={"temperature": 0, "num_predict": 32})
    jsonschema.validate(json.loads(j.message.content), schema)
    check(True, f"ollama: format schema validates ({j.message.content})")
    check(ol.show(model).modelinfo["general.context_length"] > 0, "ollama: /api/show")
    for what, param, kwargs in [
        ("num_ctx", "options.num_ctx", {"options": {"num_ctx": 4096}}),
        ("keep_alive", "keep_alive", {"keep_alive": "5m"}),
    ]:
        try:
            ol.chat(model=model, messages=[{"role": "user", "content": "hi"}], **kwargs)
            check(False, f"ollama: {what} was accepted")
        except ollama.ResponseError as e:
            check(e.status_code == 400 and param in e.error, f"ollama: {what} refused ({e.error[:60]})")
    try:
        ol.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        check(False, "ollama: an unknown model was accepted")
    except ollama.ResponseError as e:
        check(e.status_code == 404, "ollama: an unknown model gets 404")

print("all dialect checks passed")
