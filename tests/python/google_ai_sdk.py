"""The official google-genai SDK against a Gemini endpoint: the fake upstream directly (to show
the fake speaks the real protocol) or the proxy's /google-ai route (end to end).

Run by tests/e2e_google_ai.rs with BASE_URL (where the SDK's base_url points), API_KEY, and
BAD_STATUS (the HTTP status a wrong key gets: 400 from Google, 401 from the proxy). Prints one
line per check and "all google-genai checks passed"; exits non-zero on any mismatch.
"""

import os

from google import genai
from google.genai import errors, types

BASE_URL = os.environ["BASE_URL"]
API_KEY = os.environ["API_KEY"]
BAD_STATUS = int(os.environ["BAD_STATUS"])
TEXT = "Hello from the fake Gemini"
MODEL = os.environ.get("MODEL", "gemini-2.5-flash")


def check(name, got, want):
    assert got == want, f"{name}: got {got!r}, want {want!r}"
    print(f"ok {name}")


def client(api_version, key=API_KEY):
    return genai.Client(
        api_key=key,
        http_options=types.HttpOptions(base_url=BASE_URL, api_version=api_version),
    )


def generation_checks(api_version):
    c = client(api_version)
    plain = c.models.generate_content(
        model=MODEL,
        contents="Say hello",
        config=types.GenerateContentConfig(max_output_tokens=64, system_instruction="Be brief."),
    )
    check(f"{api_version} plain text", plain.text, TEXT)
    check(f"{api_version} plain prompt tokens", plain.usage_metadata.prompt_token_count, 11)
    check(f"{api_version} plain candidate tokens", plain.usage_metadata.candidates_token_count, 7)
    check(f"{api_version} plain thought tokens", plain.usage_metadata.thoughts_token_count, 3)

    chunks = list(c.models.generate_content_stream(model=MODEL, contents="Say hello"))
    check(f"{api_version} stream text", "".join(ch.text or "" for ch in chunks), TEXT)
    check(f"{api_version} stream chunks", len(chunks), 3)
    check(f"{api_version} stream final candidates", chunks[-1].usage_metadata.candidates_token_count, 7)
    check(f"{api_version} stream finish", chunks[-1].candidates[0].finish_reason, types.FinishReason.STOP)


def list_checks():
    c = client("v1beta")  # kept alive: the pager reads through the client lazily
    names = [m.name for m in c.models.list()]
    check("models list", "models/gemini-2.5-flash" in names, True)


def wrong_key_checks():
    c = client("v1beta", key="wrong-key")
    try:
        c.models.generate_content(model=MODEL, contents="hi")
    except errors.ClientError as e:
        check("wrong key refused", e.code, BAD_STATUS)
    else:
        raise AssertionError("a wrong key was accepted")


if __name__ == "__main__":
    generation_checks("v1beta")
    generation_checks("v1")
    list_checks()
    wrong_key_checks()
    print("all google-genai checks passed")
