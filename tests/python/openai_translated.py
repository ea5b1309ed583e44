"""The official OpenAI SDK against the proxy's translated routes: .../google-ai/v1 (Gemini up)
and .../anthropic/v1 (Claude up), plain and streamed, with the usage the client sees.

Run by tests/e2e_google_ai.rs with PROXY_URL, API_KEY. The fakes behind the proxy answer
"Hello from the fake Gemini" (usage 11 prompt, 7 candidates + 3 thoughts) and "Hello from the
fake upstream" (Anthropic: 10 in / 5 out plain; 10 in / 3 out streamed).
"""

import os

import openai

URL = os.environ["PROXY_URL"]
KEY = os.environ["API_KEY"]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello"},
]


def check(name, got, want):
    assert got == want, f"{name}: got {got!r}, want {want!r}"
    print(f"ok {name}")


def run(name, base, model, text, plain_usage, stream_usage):
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=64)
    check(f"{name} plain text", plain.choices[0].message.content, text)
    check(f"{name} plain finish", plain.choices[0].finish_reason, "stop")
    check(
        f"{name} plain usage",
        (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens),
        plain_usage,
    )

    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(f"{name} stream text", got, text)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(f"{name} stream finish", finishes, ["stop"])
    last = chunks[-1]
    check(f"{name} stream usage chunk has no choices", last.choices, [])
    check(
        f"{name} stream usage",
        (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens),
        stream_usage,
    )

    # Without include_usage no chunk carries usage.
    quiet = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True))
    check(f"{name} stream without usage", [c.usage for c in quiet if c.usage], [])


if __name__ == "__main__":
    run(
        "gemini",
        f"{URL}/proxy/google-ai/v1",
        "gemini-2.5-flash",
        "Hello from the fake Gemini",
        (11, 10, 21),
        (11, 10, 21),
    )
    run(
        "claude",
        f"{URL}/proxy/anthropic/v1",
        "claude-3-5-haiku-latest",
        "Hello from the fake upstream",
        (10, 5, 15),
        (10, 3, 13),
    )
    models = openai.OpenAI(base_url=f"{URL}/proxy/google-ai/v1", api_key=KEY, max_retries=0)
    ids = [m.id for m in models.models.list()]
    check("gemini models via openai", "gemini-2.5-flash" in ids, True)
    print("all translated-route checks passed")
