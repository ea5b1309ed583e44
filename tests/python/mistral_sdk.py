"""The official `mistralai` SDK against a Mistral AI endpoint: plain and streamed chat, and the
model list. Run by tests/e2e_providers.rs twice: directly against the fake Mistral (to show the
fake speaks the real protocol) and through llm-gatekeeper's /proxy/mistral-ai route.

Environment: SERVER_URL (the SDK's server_url: the base the SDK appends /v1/... to), API_KEY.
Prints one line per check and, last, `usage PROMPT COMPLETION` summed over both answers.
"""

import os

from mistralai.client import Mistral

URL = os.environ["SERVER_URL"]
KEY = os.environ["API_KEY"]
EXPECTED = "Bonjour from the Mistral fake"
MESSAGES = [{"role": "user", "content": "Say hello in French"}]


def check(name, got, want):
    assert got == want, f"{name}: got {got!r}, want {want!r}"
    print(f"ok {name}")


client = Mistral(api_key=KEY, server_url=URL)
prompt = completion = 0

plain = client.chat.complete(model="mistral-large-latest", messages=MESSAGES, max_tokens=64)
check("mistral plain", plain.choices[0].message.content, EXPECTED)
prompt += plain.usage.prompt_tokens
completion += plain.usage.completion_tokens

text = ""
usage = None
for event in client.chat.stream(model="mistral-large-latest", messages=MESSAGES):
    chunk = event.data
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage is not None:
        usage = chunk.usage
check("mistral stream", text, EXPECTED)
assert usage is not None, "the stream carried no usage"
prompt += usage.prompt_tokens
completion += usage.completion_tokens

models = client.models.list()
check("mistral models", "mistral-large-latest" in [m.id for m in models.data], True)

print(f"usage {prompt} {completion}")
