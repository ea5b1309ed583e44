"""Validates the fake AWS Bedrock and fake Vertex AI (tests/common/cloud.rs) against the official
clients talking to them directly: boto3's bedrock-runtime client (invoke_model,
invoke_model_with_response_stream, SigV4 with the right and a wrong secret) and the Anthropic
SDK's AnthropicVertex (google-auth's service-account JWT grant at the fake token endpoint).

Run by tests/cloud_fakes_official_clients.rs with the fakes' URLs and credentials in the
environment. Prints one line per check and exits non-zero on the first mismatch.
"""

import json
import os

import boto3
import botocore.config
import botocore.exceptions
from anthropic import AnthropicVertex
from google.oauth2 import service_account

E = os.environ
MESSAGES = [{"role": "user", "content": "Say hello"}]


def check(name, got, want):
    assert got == want, f"{name}: got {got!r}, want {want!r}"
    print(f"ok {name}")


def bedrock(key_id, secret):
    return boto3.client(
        "bedrock-runtime",
        region_name=E["AWS_REGION_NAME"],
        endpoint_url=E["BEDROCK_URL"],
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=botocore.config.Config(retries={"max_attempts": 1}),
    )


def body(messages=MESSAGES):
    return json.dumps(
        {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50, "messages": messages}
    )


def bedrock_checks():
    model = "anthropic.claude-3-5-sonnet-20240620-v1:0"
    c = bedrock(E["AWS_KEY_ID"], E["AWS_SECRET"])
    r = c.invoke_model(modelId=model, body=body(), contentType="application/json", accept="application/json")
    out = json.loads(r["body"].read())
    check("boto3 invoke_model text", out["content"][0]["text"], E["BEDROCK_TEXT"])
    check("boto3 invoke_model usage", out["usage"], {"input_tokens": 13, "output_tokens": 7})

    s = c.invoke_model_with_response_stream(modelId=model, body=body(), contentType="application/json")
    events = [json.loads(e["chunk"]["bytes"]) for e in s["body"]]
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    check("boto3 stream text", text, E["BEDROCK_TEXT"])
    check("boto3 stream last event", events[-1]["type"], "message_stop")

    # An exception frame mid-stream reaches boto3 as the typed error.
    s = c.invoke_model_with_response_stream(
        modelId=model, body=body([{"role": "user", "content": "please fail mid-stream"}])
    )
    try:
        for _ in s["body"]:
            pass
        raise AssertionError("the mid-stream exception was not raised")
    except botocore.exceptions.EventStreamError as e:
        check("boto3 stream exception", e.response["Error"]["Code"], "modelStreamErrorException")

    for name, key_id, secret, code in [
        ("wrong secret", E["AWS_KEY_ID"], "not-the-secret", "InvalidSignatureException"),
        ("unknown key", "AKIAUNKNOWN000000000", "x", "UnrecognizedClientException"),
    ]:
        try:
            bedrock(key_id, secret).invoke_model(modelId=model, body=body())
            raise AssertionError(f"{name}: the fake accepted it")
        except botocore.exceptions.ClientError as e:
            check(f"boto3 {name}", (e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]), (code, 403))

    # What the key checker calls: STS GetCallerIdentity (signed for `sts`), Bedrock's logging
    # configuration, and an invalid invoke that only a credential with model access gets a
    # validation error for.
    sts = boto3.client(
        "sts",
        region_name="us-east-1",
        endpoint_url=E["BEDROCK_URL"],
        aws_access_key_id=E["AWS_KEY_ID"],
        aws_secret_access_key=E["AWS_SECRET"],
        config=botocore.config.Config(retries={"max_attempts": 1}),
    )
    check("boto3 sts get_caller_identity", sts.get_caller_identity()["Account"], "123456789012")
    try:
        boto3.client(
            "sts",
            region_name="us-east-1",
            endpoint_url=E["BEDROCK_URL"],
            aws_access_key_id="AKIAUNKNOWN000000000",
            aws_secret_access_key="x",
            config=botocore.config.Config(retries={"max_attempts": 1}),
        ).get_caller_identity()
        raise AssertionError("sts: the fake accepted an unknown key")
    except botocore.exceptions.ClientError as e:
        check("boto3 sts unknown key", e.response["Error"]["Code"], "InvalidClientTokenId")
    control = boto3.client(
        "bedrock",
        region_name=E["AWS_REGION_NAME"],
        endpoint_url=E["BEDROCK_URL"],
        aws_access_key_id=E["AWS_KEY_ID"],
        aws_secret_access_key=E["AWS_SECRET"],
        config=botocore.config.Config(retries={"max_attempts": 1}),
    )
    logging = control.get_model_invocation_logging_configuration()
    check("boto3 logging configuration (none)", logging.get("loggingConfig"), None)
    try:
        c.invoke_model(
            modelId=model,
            body=json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": -1, "messages": MESSAGES}),
        )
        raise AssertionError("max_tokens -1 was accepted")
    except botocore.exceptions.ClientError as e:
        check("boto3 invalid probe", (e.response["Error"]["Code"], "max_tokens" in e.response["Error"]["Message"]), ("ValidationException", True))


def vertex_client(pem):
    creds = service_account.Credentials.from_service_account_info(
        {
            "type": "service_account",
            "project_id": E["GCP_PROJECT"],
            "private_key_id": "test-only",
            "private_key": pem,
            "client_email": E["GCP_EMAIL"],
            "client_id": "1",
            "token_uri": E["GCP_TOKEN_URL"],
        },
        scopes=["https://www.googleapis.com/auth/cloud-platform"],
    )
    return AnthropicVertex(
        region=E["GCP_REGION"],
        project_id=E["GCP_PROJECT"],
        credentials=creds,
        base_url=E["GCP_VERTEX_URL"] + "/v1",
        max_retries=0,
    )


def vertex_checks():
    with open(E["GCP_KEY_PATH"]) as f:
        client = vertex_client(f.read())
    msg = client.messages.create(model="claude-3-5-sonnet@20240620", max_tokens=50, messages=MESSAGES)
    check("AnthropicVertex text", msg.content[0].text, E["VERTEX_TEXT"])
    check("AnthropicVertex usage", (msg.usage.input_tokens, msg.usage.output_tokens), (21, 5))
    with client.messages.stream(model="claude-3-5-sonnet-v2@20241022", max_tokens=50, messages=MESSAGES) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    check("AnthropicVertex stream text", text, E["VERTEX_TEXT"])
    check("AnthropicVertex stream usage", (final.usage.input_tokens, final.usage.output_tokens), (23, 6))

    with open(E["WRONG_KEY_PATH"]) as f:
        wrong = vertex_client(f.read())
    try:
        wrong.messages.create(model="claude-3-5-sonnet@20240620", max_tokens=50, messages=MESSAGES)
        raise AssertionError("a JWT signed with another key was accepted")
    except Exception as e:  # google.auth.exceptions.RefreshError
        check("AnthropicVertex wrong key refused", type(e).__name__, "RefreshError")


bedrock_checks()
vertex_checks()
print("all cloud fake checks passed")
