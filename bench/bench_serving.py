"""Serving benchmark: 1, 4, 8 and 16 concurrent streaming clients against `refimpl serve` on loopback.

Starts the real server (gunicorn, the default model) on a free loopback port, then for each
concurrency level every client streams --requests chat completions one after another. For each
level it prints aggregate completion tokens/s, time to first token p50/p95, inter-token latency
p50/p95, and the aggregate speed-up over one client. Tokens are counted as streamed chunks that
carry content (one per generated token with this engine).

Usage: python bench/bench_serving.py [--levels 1 4 8 16] [--requests 2] [--max-tokens 64]   (or `make bench`)
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import requests

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
           "Describe the water cycle to a child.", "List some uses of a paperclip.",
           "What makes a good cup of tea?", "Tell me about the history of maps.",
           "How do bees make honey?", "Why do cats purr?"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port, max_seqs):
    cmd = [sys.executable, "-m", "refimpl", "serve", "--port", str(port), "--max-seqs", str(max_seqs)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return server
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy loading
            pass
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}: {' '.join(cmd)}")
        time.sleep(0.5)
    server.kill()
    raise SystemExit("server did not become healthy within 300 s")


def stream_one(url, prompt, max_tokens):
    """One streamed chat completion: (time to first token, [inter-token gaps], tokens)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0.8, "seed": 1}
    start, times = time.perf_counter(), []
    with requests.post(url, json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                times.append(time.perf_counter())
    if not times:
        return None, [], 0
    return times[0] - start, [b - a for a, b in zip(times, times[1:])], len(times)


def run_level(url, clients, requests_each, max_tokens):
    ttft, itl, tokens = [], [], [0]
    lock = threading.Lock()

    def client(i):
        for j in range(requests_each):
            first, gaps, n = stream_one(url, PROMPTS[(i + j) % len(PROMPTS)], max_tokens)
            with lock:
                if first is not None:
                    ttft.append(first)
                itl.extend(gaps)
                tokens[0] += n

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0] / (time.perf_counter() - start), ttft, itl


def percentile(values, q):
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [0])[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    port = free_port()
    server = start_server(port, max_seqs=max(args.levels))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        stream_one(url, "warm up", 4)
        print(f"serving benchmark: default model, {os.cpu_count()} cores, {args.requests} streamed requests "
              f"per client, max_tokens {args.max_tokens}")
        print(f"{'clients':>7} {'agg tok/s':>10} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8} {'speed-up':>9}")
        single = None
        for clients in args.levels:
            rate, ttft, itl = run_level(url, clients, args.requests, args.max_tokens)
            single = single or rate
            print(f"{clients:7d} {rate:10.1f} {percentile(ttft, 50):8.2f}s {percentile(ttft, 95):8.2f}s "
                  f"{percentile(itl, 50) * 1e3:6.0f}ms {percentile(itl, 95) * 1e3:6.0f}ms {rate / single:8.2f}x")
        print("target: at 8 clients, aggregate tokens/s >= 5x one client")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
