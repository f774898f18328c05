#!/usr/bin/env python3
"""Drives a running `plexus gateway` with the official `openai` client.

    python3 crates/plexus/tests/openai_client.py http://127.0.0.1:PORT [API_KEY]

Checks chat completions (plain and streamed, which must agree for the same greedy request),
text completions, stop strings, the model list, and that bad requests raise the client's own
exception types. Prints one line per check; exits non-zero on the first failure. Exits 3 when
the `openai` package is missing (install: pip install -r scripts/requirements-ci.txt).
"""

import sys

try:
    import openai
    from openai import OpenAI
except ImportError:
    print(
        "the `openai` package is not importable; install it with "
        "`pip install -r scripts/requirements-ci.txt`",
        file=sys.stderr,
    )
    sys.exit(3)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def expect_error(kind, what, fn):
    try:
        fn()
    except kind as e:
        print(f"ok: {what} -> {type(e).__name__} {e.status_code}")
        return e
    except openai.APIError as e:
        raise AssertionError(f"{what}: expected {kind.__name__}, got {type(e).__name__}: {e}")
    raise AssertionError(f"{what}: expected {kind.__name__}, the request succeeded")


def main(url, api_key):
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=300)

    models = client.models.list()
    ids = [m.id for m in models.data]
    check(len(ids) == 1, f"one model listed, got {ids}")
    model = ids[0]
    check("SmolLM2" in model, f"model id {model}")
    print(f"ok: models.list -> {ids}")

    chat = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=24
    )
    text = chat.choices[0].message.content
    check(chat.object == "chat.completion", f"object {chat.object}")
    check(chat.choices[0].message.role == "assistant", "role")
    check(text and text.strip(), f"non-empty text, got {text!r}")
    check(chat.choices[0].finish_reason in ("stop", "length"), chat.choices[0].finish_reason)
    u = chat.usage
    check(u is not None and u.prompt_tokens > 0 and u.completion_tokens > 0, f"usage {u}")
    check(u.total_tokens == u.prompt_tokens + u.completion_tokens, f"usage sums {u}")
    print(f"ok: chat.completions -> {text!r} {u.prompt_tokens}+{u.completion_tokens} tokens")

    stream = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    streamed = "".join(pieces)
    check(roles == ["assistant"], f"one role delta, got {roles}")
    check(streamed == text, f"streamed text {streamed!r} != non-streamed {text!r}")
    check(finish == chat.choices[0].finish_reason, f"finish {finish}")
    check(usage is not None, "usage chunk")
    check(
        (usage.prompt_tokens, usage.completion_tokens) == (u.prompt_tokens, u.completion_tokens),
        f"stream usage {usage} != {u}",
    )
    print(f"ok: chat.completions stream -> {len(pieces)} pieces, same text and usage")

    # A stop string taken from the middle of the greedy answer cuts it there.
    mid = len(text) // 2
    stop = text[mid : mid + 3]
    if stop.strip():
        cut = client.chat.completions.create(
            model=model, messages=QUESTION, temperature=0, max_tokens=24, stop=[stop]
        )
        want = text[: text.find(stop)]
        got = cut.choices[0].message.content
        check(got == want, f"stop {stop!r}: got {got!r}, want {want!r}")
        check(cut.choices[0].finish_reason == "stop", cut.choices[0].finish_reason)
        print(f"ok: stop {stop!r} -> {got!r}")

    comp = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=16, temperature=0
    )
    ctext = comp.choices[0].text
    check(comp.object == "text_completion", comp.object)
    check(ctext and ctext.strip(), f"non-empty completion, got {ctext!r}")
    check(comp.usage.completion_tokens > 0, f"usage {comp.usage}")
    cstream = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True
    )
    cstreamed = "".join(c.choices[0].text for c in cstream if c.choices)
    check(cstreamed == ctext, f"streamed completion {cstreamed!r} != {ctext!r}")
    print(f"ok: completions (plain and streamed) -> {ctext!r}")

    expect_error(
        openai.NotFoundError,
        "unknown model",
        lambda: client.chat.completions.create(model="no-such-model", messages=QUESTION),
    )
    expect_error(
        openai.BadRequestError,
        "n=2",
        lambda: client.chat.completions.create(model=model, messages=QUESTION, n=2),
    )
    long = [{"role": "user", "content": "hello " * 9000}]
    e = expect_error(
        openai.BadRequestError,
        "context overflow",
        lambda: client.chat.completions.create(model=model, messages=long, max_tokens=8),
    )
    check(e.code == "context_length_exceeded", f"code {e.code}")
    expect_error(
        openai.BadRequestError,
        "prompt + max_tokens over the context",
        lambda: client.chat.completions.create(model=model, messages=QUESTION, max_tokens=9000),
    )
    print("all checks passed")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "unused")
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
