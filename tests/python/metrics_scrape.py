"""End to end: Prometheus's own Python parser reads llm-gatekeeper's /metrics.

Run by tests/e2e_metrics_python.rs with PROXY_URL, ADMIN_KEY and METRICS_KEY set; the proxy
(GATEKEEPER=user_token, one OpenAI key) talks to the test's fake upstream. Creates a user through
the admin API, sends one chat request with the official OpenAI SDK and one with a wrong token,
scrapes /metrics and parses it with prometheus_client's text parser. Exits non-zero (with the
failed assertion) on any mismatch; prints one line per check.
"""

import json
import os
import time
import urllib.error
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

URL = os.environ["PROXY_URL"]
ADMIN_KEY = os.environ["ADMIN_KEY"]
METRICS_KEY = os.environ["METRICS_KEY"]
UPSTREAM_KEY = os.environ["UPSTREAM_KEY"]
MESSAGES = [{"role": "user", "content": "Say hello"}]


def check(name, ok, detail=""):
    assert ok, f"{name}: {detail}"
    print(f"ok {name}")


def request(method, path, key, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{URL}{path}", data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def scrape():
    status, headers, text = request("GET", "/metrics", METRICS_KEY)
    assert status == 200, f"/metrics answered {status}: {text}"
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers["Content-Type"]
    # The parser raises on anything that is not valid exposition text.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return text, families


def value(families, name, sample_name, **labels):
    fam = families.get(name)
    if fam is None:
        return None
    for s in fam.samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def main():
    status, _, body = request("POST", "/admin/users", ADMIN_KEY, {"type": "normal"})
    check("user created", status == 200, body)
    token = json.loads(body)["token"]

    client = openai.OpenAI(base_url=f"{URL}/v1", api_key=token, max_retries=0)
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    check("chat served", bool(answer.choices[0].message.content))

    wrong = openai.OpenAI(base_url=f"{URL}/v1", api_key="wrong-user-token", max_retries=0)
    try:
        wrong.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        check("wrong token refused", False, "no error")
    except openai.AuthenticationError:
        check("wrong token refused", True)

    status, _, body = request("GET", "/metrics", "not-the-metrics-key")
    check("wrong metrics key is 401", status == 401, f"{status} {body}")
    check("401 is JSON", "error" in json.loads(body), body)

    # The usage is settled (and the latency recorded) as the response ends: wait for it.
    deadline = time.monotonic() + 20
    while True:
        text, families = scrape()
        # prometheus_client names a counter family without its `_total` suffix.
        tokens = value(families, "gatekeeper_tokens", "gatekeeper_tokens_total",
                       family="turbo", kind="output")
        latency = value(families, "gatekeeper_upstream_latency_seconds",
                        "gatekeeper_upstream_latency_seconds_count", provider="openai")
        if (tokens or 0) > 0 and (latency or 0) >= 1:
            break
        assert time.monotonic() < deadline, f"no tokens or latency recorded:\n{text}"
        time.sleep(0.05)

    check("families typed",
          families["gatekeeper_requests"].type == "counter"
          and families["gatekeeper_upstream_ttfb_seconds"].type == "histogram"
          and families["gatekeeper_keys"].type == "gauge",
          {n: f.type for n, f in families.items()})
    served = value(families, "gatekeeper_requests", "gatekeeper_requests_total",
                   provider="openai", family="turbo", status="200")
    check("one request served", served == 1.0, text)
    check("input tokens counted",
          (value(families, "gatekeeper_tokens", "gatekeeper_tokens_total",
                 family="turbo", kind="input") or 0) > 0, text)
    check("auth refusals counted",
          (value(families, "gatekeeper_refusals", "gatekeeper_refusals_total",
                 reason="auth") or 0) >= 2, text)
    check("working key", value(families, "gatekeeper_keys", "gatekeeper_keys",
                               provider="openai", state="working") == 1.0, text)
    check("ttfb observed", value(families, "gatekeeper_upstream_ttfb_seconds",
                                 "gatekeeper_upstream_ttfb_seconds_count",
                                 provider="openai") == 1.0, text)
    check("store lag reported",
          value(families, "gatekeeper_store_flush_lag_seconds",
                "gatekeeper_store_flush_lag_seconds", backend="memory") is not None, text)

    secrets = [token, "wrong-user-token", ADMIN_KEY, METRICS_KEY, UPSTREAM_KEY, "127.0.0.1"]
    for fam in families.values():
        for s in fam.samples:
            for k, v in s.labels.items():
                for secret in secrets:
                    check_ok = secret not in v
                    assert check_ok, f"{s.name}{{{k}={v}}} holds a secret or address"
    check("no secret or address in any label", True)
    print("all metrics checks passed")


if __name__ == "__main__":
    main()
