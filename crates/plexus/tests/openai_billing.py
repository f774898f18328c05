#!/usr/bin/env python3
"""Checks a running Plexus gateway's accounts with the official `openai` client.

    python3 crates/plexus/tests/openai_billing.py URL FUNDED_KEY POOR_KEY PRICE

FUNDED_KEY has funds, POOR_KEY too little for a 64-token request, PRICE is micro-PLX per
completion token. Checks: `GET /v1/account`; a completion is charged exactly its
completion tokens x price; a streamed request cancelled midway is charged only for what was
produced and leaves no escrow; a short key gets 402 `insufficient_quota` in OpenAI's error
body; a missing or unknown key gets 401 `invalid_api_key`. Exits non-zero on the first
failure.
"""

import json
import sys
import time
import urllib.request

import urllib.error
import openai
from openai import OpenAI

QUESTION = [{"role": "user", "content": "Tell me a long story about a dragon."}]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def account(url, key):
    req = urllib.request.Request(url + "/v1/account", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = json.load(r)
    check(set(body) == {"account", "available", "escrow", "spent"}, f"account keys {body}")
    return body


def settled(url, key):
    """The account once no escrow is held (settlement of a cancelled stream lands when the
    engine notices the client left)."""
    for _ in range(200):
        a = account(url, key)
        if a["escrow"] == 0:
            return a
        time.sleep(0.05)
    raise AssertionError(f"escrow still held: {a}")


def main(url, key, poor, price):
    url = url.rstrip("/")
    client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    before = account(url, key)
    check(before["escrow"] == 0 and before["available"] > 0, f"funded account {before}")
    total = before["available"] + before["spent"]
    print(f"ok: /v1/account -> {before}")

    chat = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=12
    )
    n = chat.usage.completion_tokens
    after = account(url, key)
    check(after["spent"] - before["spent"] == n * price, f"charged {after} for {n} tokens")
    check(after["available"] == before["available"] - n * price, f"available {after}")
    check(after["escrow"] == 0, f"escrow released {after}")
    print(f"ok: {n} completion tokens charged {n * price} micro-PLX exactly")

    # Streamed, cancelled after a few pieces: charged for what was produced, never the hold.
    before = after
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=1000, stream=True
    )
    pieces = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
        if pieces >= 3:
            break
    stream.close()
    after = settled(url, key)
    charged = after["spent"] - before["spent"]
    check(charged % price == 0, f"whole tokens {charged}")
    produced = charged // price
    check(3 <= produced < 1000, f"a cancelled stream charged for {produced} tokens")
    check(after["available"] + after["spent"] == total, f"nothing lost {after}")
    print(f"ok: cancelled stream charged {produced} tokens (of max 1000), escrow released")

    poor_client = OpenAI(base_url=url + "/v1", api_key=poor, max_retries=0, timeout=60)
    try:
        poor_client.chat.completions.create(model=model, messages=QUESTION, max_tokens=64)
        raise AssertionError("a short account was served")
    except openai.APIStatusError as e:
        check(e.status_code == 402, f"status {e.status_code}")
        check(e.code == "insufficient_quota", f"code {e.code}")
        check(e.type == "insufficient_quota", f"type {e.type}")
        print(f"ok: short key -> {e.status_code} {e.code}: {e.message[:80]}")
    p = account(url, poor)
    check(p["escrow"] == 0 and p["spent"] == 0, f"short account untouched {p}")

    bad = OpenAI(base_url=url + "/v1", api_key="plx-not-a-key", max_retries=0, timeout=60)
    try:
        bad.chat.completions.create(model=model, messages=QUESTION, max_tokens=4)
        raise AssertionError("an unknown key was served")
    except openai.AuthenticationError as e:
        check(e.status_code == 401 and e.code == "invalid_api_key", f"{e.status_code} {e.code}")
        print(f"ok: unknown key -> 401 {e.code}")
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps({"model": model, "messages": QUESTION}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(req, timeout=60)
        raise AssertionError("a request without a key was served")
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        check(e.code == 401, f"no key: {e.code}")
        check(json.loads(body)["error"]["code"] == "invalid_api_key", body)
    print("ok: missing key -> 401 invalid_api_key")
    print("all billing checks passed")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
