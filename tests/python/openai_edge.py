"""The official OpenAI SDK against the mesh's HTTP edge (run by
tests/tests/http_edge/openai.rs against a running mesh).

Streams a chat completion, gets a whole one and a legacy completion,
lists models, and checks the exceptions a bad key and a tenant over its
limit raise. Prints one JSON object with what it saw; exits non-zero on
the first check that fails.
"""

import argparse
import json
import sys

import openai

MESSAGES = [{"role": "user", "content": "Name three colors."}]


def client(base_url, key):
    # max_retries=0: a 429 must reach the caller, not be retried by the SDK.
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)


def streamed_chat(c, model, max_tokens):
    text, chunks, usage, finish = "", 0, None, None
    stream = c.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            chunks += 1
    assert usage is not None, "include_usage gave no usage chunk"
    assert 0 < usage.completion_tokens <= max_tokens, usage
    assert finish in ("stop", "length"), finish
    return text, chunks, usage.prompt_tokens, finish


def rate_limited(c, model):
    """Requests until the tenant's limit refuses one; returns its Retry-After."""
    for _ in range(10):
        try:
            c.completions.create(model=model, prompt="Hi", max_tokens=1, temperature=0)
        except openai.RateLimitError as e:
            return e.response.headers.get("retry-after"), e.body
    raise AssertionError("10 requests at once never hit the tenant's limit")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", default="chat")
    p.add_argument("--key", required=True)
    p.add_argument("--limited-key", required=True)
    p.add_argument("--max-tokens", type=int, default=16)
    a = p.parse_args()
    c = client(a.base_url, a.key)

    models = [m.id for m in c.models.list()]
    assert a.model in models, models
    streamed, chunks, prompt_tokens, finish = streamed_chat(c, a.model, a.max_tokens)
    whole = c.chat.completions.create(model=a.model, messages=MESSAGES, max_tokens=a.max_tokens, temperature=0)
    assert whole.choices[0].message.content == streamed, (whole, streamed)
    assert whole.choices[0].finish_reason == finish, (whole, finish)
    legacy = c.completions.create(model=a.model, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert legacy.usage.completion_tokens == 8, legacy

    try:
        client(a.base_url, "not-a-key").chat.completions.create(model=a.model, messages=MESSAGES, max_tokens=1)
        raise AssertionError("a bad key was served")
    except openai.AuthenticationError as e:
        auth_status = e.status_code
    retry_after, limit_body = rate_limited(client(a.base_url, a.limited_key), a.model)

    print(json.dumps({
        "models": models, "streamed": streamed, "chunks": chunks, "prompt_tokens": prompt_tokens,
        "whole_id": whole.id, "legacy": legacy.choices[0].text, "auth_status": auth_status,
        "retry_after": retry_after, "limit_error": limit_body,
    }))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"check failed: {e!r}", file=sys.stderr)
        sys.exit(1)
