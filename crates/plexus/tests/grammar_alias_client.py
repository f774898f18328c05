#!/usr/bin/env python3
"""llama-server's `grammar` (GBNF) and `--alias` against a running `plexus gateway --alias
ALIAS`, with the official `openai` client.

    python3 crates/plexus/tests/grammar_alias_client.py http://127.0.0.1:PORT ALIAS FILE_NAME

- `/v1/models` lists ALIAS; chat and completions accept it as `model` and answer under it; the
  file's own name (FILE_NAME) is accepted too; an unknown model is a 404 naming it.
- `grammar` via `extra_body` on chat and completions, greedy and seeded sampled, plain and
  streamed: every answer matches the language of the grammar exactly (a Python regex of it).
- A grammar that does not parse, a grammar beside `response_format`, and a non-string grammar
  raise BadRequestError naming `grammar`.

Prints one line per check and `all grammar checks passed`; exits non-zero on the first failure,
3 when a package is missing (pip install -r scripts/requirements-ci.txt).
"""

import re
import sys

try:
    import openai
    from openai import OpenAI
except ImportError as e:
    print(f"{e}: install with `pip install -r scripts/requirements-ci.txt`", file=sys.stderr)
    sys.exit(3)

URL, ALIAS, FILE_NAME = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=URL + "/v1", api_key="unused", max_retries=0, timeout=300)

# A GBNF grammar and the same language as a Python regex.
GRAMMARS = [
    (
        'root ::= answer "." \nanswer ::= "yes" | "no" | "maybe"',
        r"(yes|no|maybe)\.",
    ),
    (
        # A date, digits by class and repetition, a comment and a rule over lines.
        "# ISO date\nroot ::= year \"-\" two \"-\" two\nyear ::= [12] [0-9]{3}\n"
        "two ::=\n  [0-9] [0-9]",
        r"[12][0-9]{3}-[0-9][0-9]-[0-9][0-9]",
    ),
    (
        # A small JSON-ish list of one to three lower-case words (bounded, so that a small
        # model cannot repeat a word until max_tokens).
        'root ::= "[" ws word ("," ws word){0,2} ws "]"\nword ::= "\\"" [a-z]{1,12} "\\""\nws ::= [ ]?',
        r'\[ ?"[a-z]{1,12}"(, ?"[a-z]{1,12}"){0,2} ?\]',
    ),
    (
        # Token references: the model's end-of-turn token by its text, after "ok" and one
        # letter (what `!<[ID]>` and `<[ID]>` mask is checked token by token in gbnf.rs's tests).
        'root ::= "ok " [a-z] <|im_end|>',
        r"ok [a-z]",
    ),
]


def check(name, ok, detail=""):
    if not ok:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


ids = [m.id for m in client.models.list().data]
check("models lists the alias", ALIAS in ids, ids)

r = client.chat.completions.create(
    model=ALIAS, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0
)
check("chat under the alias", r.model == ALIAS and r.choices[0].message.content, r)
r = client.completions.create(model=FILE_NAME, prompt="Hello", max_tokens=4, temperature=0)
check("the file's name is accepted too", r.choices[0].text is not None, r)
try:
    client.chat.completions.create(
        model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    check("unknown model refused", False, "accepted")
except openai.NotFoundError as e:
    check("unknown model refused", "no-such-model" in str(e), e)

for i, (gbnf, pattern) in enumerate(GRAMMARS):
    for label, sampling in [("greedy", {"temperature": 0}), ("sampled", {"temperature": 1.0, "seed": 7})]:
        r = client.chat.completions.create(
            model=ALIAS,
            messages=[{"role": "user", "content": "Answer in the required format."}],
            max_tokens=64,
            extra_body={"grammar": gbnf},
            **sampling,
        )
        text = r.choices[0].message.content
        check(
            f"chat grammar {i} {label}",
            r.choices[0].finish_reason == "stop" and re.fullmatch(pattern, text),
            (r.choices[0].finish_reason, text),
        )
        r = client.completions.create(
            model=ALIAS, prompt="Q: answer.\nA:", max_tokens=64, extra_body={"grammar": gbnf}, **sampling
        )
        text = r.choices[0].text
        check(
            f"completions grammar {i} {label}",
            r.choices[0].finish_reason == "stop" and re.fullmatch(pattern, text),
            (r.choices[0].finish_reason, text),
        )
    stream = client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "user", "content": "Answer."}],
        max_tokens=64,
        temperature=0,
        stream=True,
        extra_body={"grammar": gbnf},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    check(f"streamed chat grammar {i}", re.fullmatch(pattern, text), text)

for label, extra in [
    ("unparsable grammar", {"grammar": 'root ::= "a'}),
    ("no root", {"grammar": 'start ::= "a"'}),
    ("unknown token", {"grammar": 'root ::= "a" <no-such-token>'}),
    ("grammar beside response_format", {"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}),
    ("grammar not a string", {"grammar": ["root"]}),
]:
    try:
        client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body=extra
        )
        check(label, False, "accepted")
    except openai.BadRequestError as e:
        check(label, e.body.get("param") == "grammar", e.body)

print("all grammar checks passed")
