"""The official `openai` SDK with Azure OpenAI: `AzureOpenAI` directly against the fake Azure
(MODE=direct: shows the fake speaks Azure's protocol: deployment path, api-version, api-key),
and the plain `OpenAI` client through llm-gatekeeper's /proxy/azure/openai/v1 route
(MODE=proxy), as the original proxy's users call it. Plain and streamed chat, with and without
stream usage; the content-filter annotations must not disturb the client.

Environment: MODE, URL (direct: the fake's resource endpoint; proxy: the proxy's base URL),
API_KEY, DEPLOYMENT, and API_VERSION (direct). Prints one line per check and, last,
`usage PROMPT COMPLETION` summed over the answers whose usage the client saw.
"""

import os

import openai

MODE = os.environ["MODE"]
URL = os.environ["URL"]
KEY = os.environ["API_KEY"]
DEPLOYMENT = os.environ["DEPLOYMENT"]
EXPECTED = "Hello from Azure fake"
MESSAGES = [{"role": "user", "content": "Say hello"}]


def check(name, got, want):
    assert got == want, f"{name}: got {got!r}, want {want!r}"
    print(f"ok {name}")


if MODE == "direct":
    client = openai.AzureOpenAI(
        azure_endpoint=URL, api_key=KEY, api_version=os.environ["API_VERSION"], max_retries=0
    )
else:
    client = openai.OpenAI(base_url=URL, api_key=KEY, max_retries=0)

prompt = completion = 0

plain = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
check(f"{MODE} plain", plain.choices[0].message.content, EXPECTED)
prompt += plain.usage.prompt_tokens
completion += plain.usage.completion_tokens

# Streamed, the client asking for usage: it gets the usage chunk.
text, usage = "", None
for chunk in client.chat.completions.create(
    model=DEPLOYMENT, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
):
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage is not None:
        usage = chunk.usage
check(f"{MODE} stream with usage", text, EXPECTED)
assert usage is not None, "no usage chunk although the client asked"
prompt += usage.prompt_tokens
completion += usage.completion_tokens

# Streamed without asking: no usage chunk reaches the client.
text, seen_usage = "", False
for chunk in client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True):
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage is not None:
        seen_usage = True
check(f"{MODE} stream without usage", text, EXPECTED)
check(f"{MODE} no usage chunk unasked", seen_usage, False)

# Images from the DALL-E deployment (the client names the deployment as its model).
if os.environ.get("IMAGE_DEPLOYMENT"):
    image = client.images.generate(
        model=os.environ["IMAGE_DEPLOYMENT"], prompt="A lighthouse", n=1, size="1024x1024"
    )
    check(f"{MODE} image", image.data[0].url.startswith("https://"), True)

print(f"usage {prompt} {completion}")
