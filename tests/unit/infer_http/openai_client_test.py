#!/usr/bin/env python3
"""The official `openai` Python client (PyPI) against loom's OpenAI-compatible server.

    openai_client_test.py --url http://127.0.0.1:8080 [--api-key K]   # a running `loom serve`
    openai_client_test.py --fake-server build/.../infer_http_fake_server  # the scripted service

Checks what an editor plugin or script relies on: /v1/models, non-streaming and streaming
completions (text, finish_reason, usage, include_usage, [DONE] handled by the client), n > 1,
logprobs, echo, and that errors arrive as the client's typed exceptions (BadRequestError,
NotFoundError, AuthenticationError) with the server's message. Greedy (temperature 0) streaming
and non-streaming must give the same text, which holds for the scripted service and for loom's
deterministic engine alike.

Exit status: 0 pass, 1 fail, 77 SKIP (the openai package is not importable here).
"""
import argparse
import os
import signal
import subprocess
import sys

try:
    import openai
except ImportError as e:  # visible skip, never a pass
    print(f"SKIP: the openai package is not importable ({e}); pip install openai")
    sys.exit(77)

failures = []


def check(cond, what):
    if cond:
        print(f"ok    {what}")
    else:
        print(f"FAIL  {what}")
        failures.append(what)


def expect_error(exc_type, what, fn, in_message=""):
    try:
        fn()
    except exc_type as e:
        msg = str(e)
        check(in_message in msg, f"{what}: {exc_type.__name__} ({msg[:100]})")
        return
    except Exception as e:  # wrong kind of error
        check(False, f"{what}: expected {exc_type.__name__}, got {type(e).__name__}: {e}")
        return
    check(False, f"{what}: expected {exc_type.__name__}, got success")


def run(base_url, api_key):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key or "none", max_retries=0,
                           timeout=120)
    models = client.models.list()
    ids = [m.id for m in models.data]
    check(len(ids) == 1, f"/v1/models lists one model: {ids}")
    model = ids[0]
    prompt = "def fibonacci(n):\n"

    r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                  seed=1)
    check(r.object == "text_completion", "object is text_completion")
    check(r.id.startswith("cmpl-"), f"id {r.id}")
    check(len(r.choices) == 1 and isinstance(r.choices[0].text, str), "one text choice")
    check(r.choices[0].finish_reason in ("stop", "length"),
          f"finish_reason {r.choices[0].finish_reason}")
    u = r.usage
    check(u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens,
          f"usage {u.prompt_tokens}+{u.completion_tokens}={u.total_tokens}")
    check(u.completion_tokens <= 12, "completion_tokens <= max_tokens")
    greedy = r.choices[0].text

    stream = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                       seed=1, stream=True,
                                       stream_options={"include_usage": True})
    text, finish, usage, ids = "", None, None, set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.text
            if c.finish_reason is not None:
                finish = c.finish_reason
    check(text == greedy, f"stream text equals non-stream text ({text!r} vs {greedy!r})")
    check(finish == r.choices[0].finish_reason, f"stream finish_reason {finish}")
    check(usage is not None and usage.completion_tokens == u.completion_tokens,
          f"stream include_usage: {usage}")
    check(len(ids) == 1, "one id across the stream")

    r = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0.8,
                                  seed=7, n=2, logprobs=2)
    check([c.index for c in r.choices] == [0, 1], "n=2 gives choices 0 and 1")
    lp = r.choices[0].logprobs
    check(lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
          == len(lp.text_offset), "logprobs arrays have one entry per token")
    check(all(len(t) <= 2 for t in lp.top_logprobs), "top_logprobs has at most 2 entries each")
    check(all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs),
          "token_logprobs are log-probabilities")

    r = client.completions.create(model=model, prompt=prompt, max_tokens=3, echo=True)
    check(r.choices[0].text.startswith(prompt), "echo=True starts with the prompt")

    r = client.completions.create(model=model, prompt=[prompt, "int main() {"], max_tokens=3)
    check(len(r.choices) == 2, "a list of two prompts gives two choices")

    expect_error(openai.BadRequestError, "max_tokens=-1 is a 400",
                 lambda: client.completions.create(model=model, prompt="x", max_tokens=-1),
                 "max_tokens")
    expect_error(openai.NotFoundError, "an unknown model is a 404",
                 lambda: client.completions.create(model="no-such-model", prompt="x"),
                 "no-such-model")
    expect_error(openai.BadRequestError, "suffix is a 400 that says why",
                 lambda: client.completions.create(model=model, prompt="x", suffix="}"),
                 "fill-in-the-middle")
    expect_error(openai.BadRequestError, "a prompt beyond the context is a 400",
                 lambda: client.completions.create(model=model, prompt="x " * 200000,
                                                   max_tokens=16),
                 "")
    if api_key:
        bad = openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0)
        expect_error(openai.AuthenticationError, "a wrong API key is a 401",
                     lambda: bad.completions.create(model=model, prompt="x", max_tokens=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8080")
    ap.add_argument("--api-key", default=os.environ.get("LOOM_API_KEY", ""))
    ap.add_argument("--fake-server", help="start this infer_http_fake_server binary instead")
    args = ap.parse_args()
    proc = None
    if args.fake_server:
        key = args.api_key or "test-key"
        proc = subprocess.Popen([args.fake_server, "--api-key", key], stdout=subprocess.PIPE,
                                text=True)
        line = proc.stdout.readline().split()
        assert line and line[0] == "PORT", f"fake server said {line}"
        args.url, args.api_key = f"http://127.0.0.1:{line[1]}", key
    if not args.url:
        ap.error("give --url or --fake-server")
    try:
        run(args.url.rstrip("/"), args.api_key)
    finally:
        if proc:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
            check(rc == 0, f"server exits 0 on SIGTERM (got {rc})")
    print(f"{'FAIL' if failures else 'PASS'}: {len(failures)} failed checks (openai "
          f"{openai.__version__})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
