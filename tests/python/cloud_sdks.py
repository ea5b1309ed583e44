"""End to end through llm-gatekeeper to the fake AWS Bedrock and fake Vertex AI with the official
Anthropic and OpenAI Python SDKs: Claude on both clouds in the Anthropic format (base_url
http://HOST/proxy/aws/claude, .../gcp/claude) and the OpenAI format (.../v1/chat/completions,
translated), plain and streamed; Mistral on Bedrock with the OpenAI SDK; and the error a client
sees when the operator's AWS secret is wrong.

Run by tests/e2e_cloud_sdks.rs with PROXY_URL, WRONG_PROXY_URL and USER_TOKEN set. Prints one
line per check and exits non-zero on the first mismatch.
"""

import os

import anthropic
import openai

URL = os.environ["PROXY_URL"]
TOKEN = os.environ["USER_TOKEN"]
MESSAGES = [{"role": "user", "content": "Say hello"}]


def check(name, got, want):
    assert got == want, f"{name}: got {got!r}, want {want!r}"
    print(f"ok {name}")


def anthropic_checks(cloud, model, text, plain_usage, stream_usage):
    client = anthropic.Anthropic(base_url=f"{URL}/proxy/{cloud}/claude", api_key=TOKEN, max_retries=0)
    msg = client.messages.create(model=model, max_tokens=100, messages=MESSAGES)
    check(f"anthropic {cloud} plain", msg.content[0].text, text)
    check(f"anthropic {cloud} plain usage", (msg.usage.input_tokens, msg.usage.output_tokens), plain_usage)
    with client.messages.stream(model=model, max_tokens=100, messages=MESSAGES) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    check(f"anthropic {cloud} stream", streamed, text)
    check(f"anthropic {cloud} stream usage", (final.usage.input_tokens, final.usage.output_tokens), stream_usage)


def openai_checks(name, base, model, text, plain_usage, stream_usage):
    client = openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0)
    out = client.chat.completions.create(model=model, messages=MESSAGES)
    check(f"openai {name} plain", out.choices[0].message.content, text)
    check(f"openai {name} plain usage", (out.usage.prompt_tokens, out.usage.completion_tokens), plain_usage)
    chunks = list(
        client.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(f"openai {name} stream", streamed, text)
    usage = [c.usage for c in chunks if c.usage]
    check(f"openai {name} stream usage", (usage[-1].prompt_tokens, usage[-1].completion_tokens), stream_usage)


def wrong_secret_check():
    client = anthropic.Anthropic(
        base_url=f"{os.environ['WRONG_PROXY_URL']}/proxy/aws/claude", api_key=TOKEN, max_retries=0
    )
    try:
        client.messages.create(model="claude-3-5-sonnet-20240620", max_tokens=100, messages=MESSAGES)
        raise AssertionError("a wrong AWS secret gave an answer")
    except anthropic.APIStatusError as e:
        check("wrong secret status", e.status_code, 503)
        assert "AWS_CREDENTIALS" in str(e), str(e)
        print("ok wrong secret message names AWS_CREDENTIALS")


anthropic_checks("aws", "claude-3-5-sonnet-20240620", "Hello from Bedrock", (13, 7), (17, 9))
anthropic_checks("gcp", "claude-3-5-sonnet-20240620", "Hello from Vertex", (21, 5), (23, 6))
openai_checks("aws claude", f"{URL}/proxy/aws/claude/v1", "claude-3-5-sonnet-20240620", "Hello from Bedrock", (13, 7), (17, 9))
openai_checks("gcp claude", f"{URL}/proxy/gcp/claude/v1", "claude-3-5-sonnet-v2@20241022", "Hello from Vertex", (21, 5), (23, 6))
openai_checks("aws mistral", f"{URL}/proxy/aws/mistral/v1", "mistral-large-latest", "Hello from Bedrock", (13, 7), (17, 9))
wrong_secret_check()
print("all cloud SDK checks passed")
