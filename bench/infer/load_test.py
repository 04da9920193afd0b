#!/usr/bin/env python3
"""Load test for an OpenAI-compatible /v1/completions server (stdlib only: threads + http.client).

    load_test.py --url http://127.0.0.1:8080 --clients 32 --requests 200 --max-tokens 64
    load_test.py --fake-server build/tests/unit/infer_http/infer_http_fake_server   # self-check

Phase 1 (single client): --single-requests streaming requests one after another; its tokens/s is
what one editor user sees. Phase 2 (load): --clients threads, each with its own keep-alive
connection, share --requests streaming requests. Every request asks for stream_options
include_usage, so tokens are the server's own completion_tokens count.

Prints one JSON line: aggregate tokens/s (completion tokens of all successful requests / wall
time of the phase), single-client tokens/s, latency p50/p99 (request sent -> [DONE]), time to
first token p50/p99, inter-token gap p50, and counts of successes and failures by HTTP status
(429 is expected when --clients exceeds the server's queue; the clients retry after the
Retry-After seconds, up to --max-retries times, and the retries are counted).
"""
import argparse
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.parse


def percentile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100.0 * (len(xs) - 1)))))
    return xs[k]


class Client:
    """One keep-alive connection; stream() runs one streaming completion."""

    def __init__(self, url, api_key, timeout):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port or 80
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.conn = None

    def _connection(self):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.conn

    def stream(self, body):
        """Returns (status, result dict); result has latency, ttft, gaps, tokens, retry_after."""
        t0 = time.perf_counter()
        try:
            conn = self._connection()
            conn.request("POST", "/v1/completions", json.dumps(body), self.headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            self.conn = None
            return "connection_error", {"error": str(e)}
        if resp.status != 200:
            data = resp.read()
            retry = resp.getheader("Retry-After")
            return resp.status, {"error": data[:200].decode("utf-8", "replace"),
                                 "retry_after": float(retry) if retry else None}
        ttft, last, gaps, tokens, chunks, error = None, None, [], None, 0, None
        try:
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    break
                msg = json.loads(payload)
                if "error" in msg:
                    error = msg["error"].get("message")
                    continue
                if msg.get("usage"):
                    tokens = msg["usage"]["completion_tokens"]
                if msg.get("choices"):
                    now = time.perf_counter()
                    chunks += 1
                    if ttft is None:
                        ttft = now - t0
                    elif last is not None:
                        gaps.append(now - last)
                    last = now
            resp.read()
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.conn = None
            return "stream_error", {"error": str(e)}
        if error:
            return "stream_error", {"error": error}
        return 200, {"latency": time.perf_counter() - t0, "ttft": ttft, "gaps": gaps,
                     "tokens": tokens if tokens is not None else chunks}


def run_phase(url, api_key, clients, requests, body, timeout, max_retries, time_limit):
    lock = threading.Lock()
    stop_at = time.perf_counter() + time_limit
    next_index = [0]
    results, statuses, retries = [], {}, [0]

    def worker():
        c = Client(url, api_key, timeout)
        while True:
            with lock:
                if next_index[0] >= requests or time.perf_counter() > stop_at:
                    return
                next_index[0] += 1
            for attempt in range(max_retries + 1):
                status, r = c.stream(body)
                if status == 429 and attempt < max_retries:
                    with lock:
                        retries[0] += 1
                    time.sleep(r.get("retry_after") or 1.0)
                    continue
                break
            with lock:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status == 200:
                    results.append(r)
                elif len(statuses) < 5:
                    print(f"request failed: {status} {r.get('error')}", file=sys.stderr)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    not_started = requests - next_index[0]
    tokens = sum(r["tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    ms = lambda x: None if x is None else round(x * 1000.0, 2)
    return {
        "clients": clients, "requests": requests, "ok": len(results), "statuses": statuses,
        "not_started_time_limit": not_started,
        "retries_after_429": retries[0], "wall_s": round(wall, 3), "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "latency_ms_p50": ms(percentile([r["latency"] for r in results], 50)),
        "latency_ms_p99": ms(percentile([r["latency"] for r in results], 99)),
        "ttft_ms_p50": ms(percentile([r["ttft"] for r in results if r["ttft"] is not None], 50)),
        "ttft_ms_p99": ms(percentile([r["ttft"] for r in results if r["ttft"] is not None], 99)),
        "inter_token_ms_p50": ms(percentile(gaps, 50)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--fake-server", help="start this infer_http_fake_server binary (self-check)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--single-requests", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="def quicksort(xs):\n")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--model", default=None, help="model field (default: the server's first)")
    ap.add_argument("--timeout", type=float, default=600.0, help="socket timeout per request, s")
    ap.add_argument("--max-retries", type=int, default=20, help="retries of a 429 per request")
    ap.add_argument("--time-limit", type=float, default=900.0,
                    help="seconds per phase; requests not started by then count as failures")
    ap.add_argument("--min-speedup", type=float, default=0.0,
                    help="fail unless aggregate tokens/s >= this x single-client tokens/s "
                         "(the issue asks for 3)")
    args = ap.parse_args()

    proc = None
    if args.fake_server:
        proc = subprocess.Popen([args.fake_server, "--step-ms", "2"], stdout=subprocess.PIPE,
                                text=True)
        line = proc.stdout.readline().split()
        assert line and line[0] == "PORT", f"fake server said {line}"
        args.url = f"http://127.0.0.1:{line[1]}"
    if not args.url:
        ap.error("give --url or --fake-server")
    try:
        u = urllib.parse.urlparse(args.url)
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        conn.request("GET", "/v1/models", headers=headers)
        resp = conn.getresponse()
        models = json.loads(resp.read())
        if resp.status != 200:
            sys.exit(f"GET /v1/models: HTTP {resp.status}: {models}")
        model = args.model or models["data"][0]["id"]
        body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens,
                "temperature": args.temperature, "stream": True,
                "stream_options": {"include_usage": True}}
        single = run_phase(args.url, args.api_key, 1, args.single_requests, body, args.timeout,
                           args.max_retries, args.time_limit)
        load = run_phase(args.url, args.api_key, args.clients, args.requests, body,
                         args.timeout, args.max_retries, args.time_limit)
    finally:
        if proc:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    out = {"bench": "infer_http_load", "url": args.url, "model": model,
           "max_tokens": args.max_tokens, "prompt_chars": len(args.prompt),
           "aggregate_tokens_per_s": load["tokens_per_s"],
           "single_client_tokens_per_s": single["tokens_per_s"],
           "speedup": (round(load["tokens_per_s"] / single["tokens_per_s"], 2)
                       if load["tokens_per_s"] and single["tokens_per_s"] else None),
           "latency_ms_p50": load["latency_ms_p50"], "latency_ms_p99": load["latency_ms_p99"],
           "single": single, "load": load}
    print(json.dumps(out))
    failed = load["ok"] < load["requests"] or single["ok"] < single["requests"]
    if failed:
        print("FAIL: not every request succeeded (see statuses)", file=sys.stderr)
    if args.min_speedup and (out["speedup"] or 0) < args.min_speedup:
        print(f"FAIL: speedup {out['speedup']} < --min-speedup {args.min_speedup}",
              file=sys.stderr)
        failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
