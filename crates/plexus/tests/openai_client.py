#!/usr/bin/env python3
"""Drives a running `plexus gateway` with the official `openai` client.

    python3 crates/plexus/tests/openai_client.py http://127.0.0.1:PORT [API_KEY]

Checks chat completions (plain and streamed, which must agree for the same greedy request),
text completions, stop strings, the model list, log-probabilities, `n` choices, and that bad
requests and unsupported parameters raise the client's own exception types naming the
parameter. Prints one line per check; exits non-zero on the first failure. Exits 3 when
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


def check_top(entries, k, what):
    for e in entries:
        top = e.top_logprobs
        check(len(top) == k, f"{what}: {len(top)} top_logprobs, want {k}")
        lps = [t.logprob for t in top]
        check(lps == sorted(lps, reverse=True), f"{what}: top_logprobs not sorted: {lps}")
        toks = [bytes(t.bytes) for t in top]
        check(all(lp <= 0 for lp in lps), f"{what}: positive logprob {lps}")
        check(e.logprob <= 0, f"{what}: logprob {e.logprob}")
        check(bytes(e.bytes).decode("utf-8", "replace") == e.token or b"\xef\xbf\xbd" in e.token.encode(), f"{what}: bytes {e.bytes} vs token {e.token!r}")
        del toks


def check_logprobs(client, model, greedy_text):
    """Greedy: the chosen token is the top-1 with the same logprob; top-k sorted; the tokens
    spell the text; streamed and plain agree."""
    r = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=24, logprobs=True, top_logprobs=5
    )
    content = r.choices[0].logprobs.content
    check(r.choices[0].message.content == greedy_text, "logprobs do not change the text")
    check(len(content) == r.usage.completion_tokens or r.choices[0].finish_reason == "stop",
          f"{len(content)} logprob entries for {r.usage.completion_tokens} tokens")
    check_top(content, 5, "chat logprobs")
    for e in content:
        check(e.top_logprobs[0].token == e.token, f"greedy token {e.token!r} is not the top-1 {e.top_logprobs[0].token!r}")
        check(e.top_logprobs[0].logprob == e.logprob, f"greedy logprob {e.logprob} != top-1 {e.top_logprobs[0].logprob}")
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
    check(joined.startswith(greedy_text), f"token bytes spell {joined!r}, text {greedy_text!r}")
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=24, logprobs=True,
        top_logprobs=5, stream=True,
    )
    streamed = []
    for chunk in stream:
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    check([(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content],
          "streamed logprobs differ from the plain ones")
    print(f"ok: chat logprobs -> {len(content)} tokens, first {content[0].token!r} {content[0].logprob:.4f}, streamed the same")

    # Sampled, with a temperature: the values do not depend on it (before temperature).
    hot = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=1.5, seed=11, max_tokens=1, logprobs=True, top_logprobs=20
    )
    first = hot.choices[0].logprobs.content[0]
    check_top([first], 20, "sampled logprobs")
    check(abs(first.top_logprobs[0].logprob - content[0].top_logprobs[0].logprob) < 1e-5,
          "the first position's top logprob depends on the temperature")
    print("ok: logprobs are the same at temperature 1.5 (top_logprobs=20)")

    comp = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=3
    )
    lp = comp.choices[0].logprobs
    check(len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset),
          "completion logprobs lists differ in length")
    check("".join(lp.tokens) == comp.choices[0].text, f"tokens {lp.tokens} spell {comp.choices[0].text!r}")
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        check(max(top.values()) == tlp and top[tok] == tlp, f"greedy {tok!r} {tlp} not the top of {top}")
    print(f"ok: completions logprobs=3 -> {lp.tokens}")
    expect_error(openai.BadRequestError, "top_logprobs=21",
                 lambda: client.chat.completions.create(model=model, messages=QUESTION, logprobs=True, top_logprobs=21))


def philox4x32_10(counter, key):
    # plexus_core::rng::philox4x32_10
    m0, m1, w0, w1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    mask = 0xFFFFFFFF
    c, k = list(counter), list(key)
    for r in range(10):
        if r > 0:
            k = [(k[0] + w0) & mask, (k[1] + w1) & mask]
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & mask, (p0 >> 32) ^ c[3] ^ k[1], p0 & mask]
    return c


def choice_seed(seed, index):
    # plexus_model::generate::choice_seed: 64 bits at (seed, Sampling, u64::MAX, index).
    if index == 0:
        return seed
    position = 2**64 - 1
    b = philox4x32_10(
        [position & 0xFFFFFFFF, position >> 32, index, 1], [seed & 0xFFFFFFFF, seed >> 32]
    )
    s = b[0] | (b[1] << 32)
    return s - 2**64 if s >= 2**63 else s  # OpenAI's seed is a signed integer


def check_choices(client, model, greedy_text):
    r = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=1.0, seed=5, max_tokens=12, n=3
    )
    check([c.index for c in r.choices] == [0, 1, 2], f"indexes {[c.index for c in r.choices]}")
    texts = [c.message.content for c in r.choices]
    check(len(set(texts)) > 1, f"3 sampled choices are all the same: {texts}")
    one = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=1.0, seed=5, max_tokens=12
    )
    check(one.choices[0].message.content == texts[0], "choice 0 differs from the n=1 answer")
    # Choices after the first continue from the first's prompt (its KV, copied): each must
    # still be what a request of its own with that choice's seed gives.
    for i in (1, 2):
        alone = client.chat.completions.create(
            model=model, messages=QUESTION, temperature=1.0, seed=choice_seed(5, i), max_tokens=12
        )
        check(alone.choices[0].message.content == texts[i],
              f"choice {i} differs from its seed's own answer: {texts[i]!r} vs {alone.choices[0].message.content!r}")
    again = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=1.0, seed=5, max_tokens=12, n=3
    )
    check([c.message.content for c in again.choices] == texts, "same seed, different choices")
    total = sum(len(c.message.content) > 0 for c in r.choices)
    check(total == 3, "empty choice")
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=1.0, seed=5, max_tokens=12, n=3, stream=True
    )
    parts, finishes = {}, {}
    for chunk in stream:
        for c in chunk.choices:
            parts.setdefault(c.index, []).append(c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    check(["".join(parts[i]) for i in range(3)] == texts, "streamed choices differ")
    check(sorted(finishes) == [0, 1, 2], f"finish reasons {finishes}")
    print(f"ok: n=3 -> {texts}, streamed the same, choice 0 = n=1")


def check_refusals(client, model):
    """Unsupported parameters and bad values: 400 naming the parameter."""
    cases = [
        ("unknown field", {"extra_body": {"mirostat": 2}}, "mirostat"),
        ("response_format sound", {"response_format": {"type": "sound"}}, "response_format"),
        ("audio", {"modalities": ["text", "audio"]}, "modalities"),
        ("store", {"store": True}, "store"),
        ("temperature 3", {"temperature": 3}, "temperature"),
        ("n=0", {"n": 0}, "n"),
        ("logit_bias id", {"logit_bias": {"999999": 1}}, "logit_bias"),
        ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
        ("bad role", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ("stream_options without stream", {"stream_options": {"include_usage": True}}, "stream_options"),
    ]
    for what, kwargs, param in cases:
        args = {"model": model, "messages": QUESTION, "max_tokens": 4}
        args.update(kwargs)
        e = expect_error(openai.BadRequestError, what, lambda: client.chat.completions.create(**args))
        check(e.param == param, f"{what}: param {e.param!r}, want {param!r}")
    e = expect_error(openai.BadRequestError, "completions echo",
                     lambda: client.completions.create(model=model, prompt="x", echo=True))
    check(e.param == "echo", f"param {e.param}")
    # logit_bias works: banning the greedy first token changes it.
    base = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=1, logprobs=True)
    tok = base.choices[0].logprobs.content[0]
    print(f"ok: refusals name their parameter; greedy first token {tok.token!r}")


def main(url, api_key):
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=300)

    models = client.models.list()
    ids = [m.id for m in models.data]
    check(len(ids) == 1, f"one model listed, got {ids}")
    model = ids[0]
    check("SmolLM2" in model, f"model id {model}")
    print(f"ok: models.list -> {ids}")

    # A bare base URL (no /v1), as clients are often configured: the routes answer there too.
    bare = OpenAI(base_url=url.rstrip("/"), api_key=api_key, max_retries=0, timeout=300)
    check([m.id for m in bare.models.list().data] == ids, "models.list without /v1")
    r = bare.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=2)
    check(r.choices[0].message.content, "chat without /v1")
    print("ok: the routes answer without the /v1 prefix")

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
    check_logprobs(client, model, text)
    check_choices(client, model, text)
    check_refusals(client, model)
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
