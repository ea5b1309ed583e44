"""Smoke test of the official OpenAI and Anthropic Python SDKs against a running llm-gatekeeper.

Run by tests/e2e_python_sdk.rs with PROXY_URL (http://127.0.0.1:PORT) and PROXY_KEY set; the
proxy's upstream is the test's fake upstream, which answers "Hello from the fake upstream".
Exits non-zero (with the failed assertion) on any mismatch; prints one line per check.
"""

import os
import sys

import anthropic
import openai

URL = os.environ["PROXY_URL"]
KEY = os.environ["PROXY_KEY"]
EXPECTED = "Hello from the fake upstream"
MESSAGES = [{"role": "user", "content": "Say hello"}]


def check(name, got, want):
    assert got == want, f"{name}: got {got!r}, want {want!r}"
    print(f"ok {name}")


def openai_checks():
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key=KEY, max_retries=0)
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    check("openai plain", plain.choices[0].message.content, EXPECTED)

    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    check("openai stream", text, EXPECTED)

    # The compatibility alias of the original proxy.
    alias = openai.OpenAI(base_url=f"{URL}/proxy/openai", api_key=KEY, max_retries=0)
    via_alias = alias.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    check("openai alias", via_alias.choices[0].message.content, EXPECTED)

    wrong = openai.OpenAI(base_url=f"{URL}/v1", api_key="wrong-key", max_retries=0)
    try:
        wrong.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    except openai.AuthenticationError as e:
        check("openai wrong key refused", e.status_code, 401)
        assert "proxy key" in str(e), str(e)
    else:
        raise AssertionError("openai: a wrong key was accepted")


def anthropic_checks():
    client = anthropic.Anthropic(base_url=URL, api_key=KEY, max_retries=0)
    plain = client.messages.create(
        model="claude-3-5-haiku-latest", max_tokens=32, messages=MESSAGES
    )
    check("anthropic plain", plain.content[0].text, EXPECTED)

    with client.messages.stream(
        model="claude-3-5-haiku-latest", max_tokens=32, messages=MESSAGES
    ) as stream:
        text = "".join(stream.text_stream)
    check("anthropic stream", text, EXPECTED)

    raw = client.messages.create(
        model="claude-3-5-haiku-latest", max_tokens=32, messages=MESSAGES, stream=True
    )
    kinds = [event.type for event in raw]
    check("anthropic raw stream ends", kinds[-1], "message_stop")

    wrong = anthropic.Anthropic(base_url=URL, api_key="wrong-key", max_retries=0)
    try:
        wrong.messages.create(model="claude-3-5-haiku-latest", max_tokens=32, messages=MESSAGES)
    except anthropic.AuthenticationError as e:
        check("anthropic wrong key refused", e.status_code, 401)
    else:
        raise AssertionError("anthropic: a wrong key was accepted")


if __name__ == "__main__":
    openai_checks()
    anthropic_checks()
    print("all SDK checks passed")
    sys.exit(0)
