"""Serving benchmark: concurrent streaming clients against `refimpl serve` on loopback, alone or beside vLLM.

Alone (`make bench`): starts the real server (gunicorn, the default model) on a free loopback port, then
for each concurrency level every client streams --requests chat completions one after another. For each
level it prints aggregate completion tokens/s, time to first token p50/p95, inter-token latency p50/p95,
and the aggregate speed-up over one client. Tokens are counted from the usage that the stream's last
chunk reports (stream_options.include_usage); the gaps are between chunks that carry content.

Beside vLLM (`--peer vllm`, or `make bench-vllm`): also starts vLLM's CPU build from its own virtual
environment (--peer-python, see the Makefile) on the same converted model directory, in float32 with its
OpenMP threads bound to cores 0-1. At each level it runs alternated rounds (refimpl, vLLM, refimpl,
vLLM, ...), each the same as one level above, and prints per server the medians over the rounds of the
aggregate tokens/s, TTFT p50 and ITL p50, then the ratios refimpl/vLLM.
- Both servers get identical requests: the same prompts, temperature 0.8, seed 1, and a logit_bias of -100
  on <|im_end|> (id 2, this model's only stop token for both), so that every request generates exactly
  max_tokens. refimpl has no `ignore_eos` (vLLM's extension); the logit bias is the portable equivalent.
- Idle servers: measured on the 2-core machine, vLLM keeps one core busy (spin-waiting) for about 1 s
  after its last request and then about 2% of one; refimpl about 0.2 of one core for under 0.5 s, then
  nothing. So that no leftover spinning lands in the other's round, the server not being measured is
  frozen (SIGSTOP to its process group) and thawed (SIGCONT) before its own round, which begins with an
  uncounted warm-up request.

Usage: python bench/bench_serving.py [--levels 1 4 8 16] [--requests 2] [--max-tokens 64]   (or `make bench`)
       python bench/bench_serving.py --peer vllm [--rounds 3] [--levels 1 8] [--max-tokens 128]
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import requests

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
           "Describe the water cycle to a child.", "List some uses of a paperclip.",
           "What makes a good cup of tea?", "Tell me about the history of maps.",
           "How do bees make honey?", "Why do cats purr?"]
NO_EOS = {"logit_bias": {"2": -100}}  # <|im_end|> never sampled: every request runs to max_tokens


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_refimpl(port, max_seqs):
    cmd = [sys.executable, "-m", "refimpl", "serve", "--port", str(port), "--max-seqs", str(max_seqs)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def start_vllm(python, model_dir, port, max_seqs):
    """vLLM's OpenAI server as FACTS.md measured it: float32, 4 GiB of KV cache, OpenMP on cores 0-1."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--served-model-name", "default",
           "--max-num-seqs", str(max_seqs)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND="0-1")
    log = tempfile.NamedTemporaryFile(prefix="bench-vllm-", suffix=".log", delete=False)
    print(f"starting vLLM (about 150 s; log {log.name})", flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(server, port, timeout=600):
    """Wait until GET /health answers 200; its process group is the server's own (start_new_session)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy loading
            pass
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}: {' '.join(server.args)}")
        time.sleep(0.5)
    raise SystemExit(f"server did not become healthy within {timeout} s: {' '.join(server.args)}")


def stop(server):
    try:
        os.killpg(server.pid, signal.SIGCONT)  # a frozen server would not act on SIGTERM
    except ProcessLookupError:  # gone already, children and all
        return
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def stream_one(url, prompt, max_tokens, extra=None):
    """One streamed chat completion: (time to first token, [inter-token gaps], completion tokens)."""
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.8, "seed": 1, **(extra or {})}
    start, times, tokens = time.perf_counter(), [], 0
    with requests.post(url, json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                times.append(time.perf_counter())
            if chunk.get("usage"):  # the last chunk
                tokens = chunk["usage"]["completion_tokens"]
    if not times:
        return None, [], tokens
    return times[0] - start, [b - a for a, b in zip(times, times[1:])], tokens


def run_level(url, clients, requests_each, max_tokens, extra=None):
    """Every client streams requests_each completions in turn: (aggregate tok/s, [TTFT], [ITL], [tokens])."""
    ttft, itl, tokens = [], [], []
    lock = threading.Lock()

    def client(i):
        for j in range(requests_each):
            first, gaps, n = stream_one(url, PROMPTS[(i + j) % len(PROMPTS)], max_tokens, extra)
            with lock:
                if first is not None:
                    ttft.append(first)
                itl.extend(gaps)
                tokens.append(n)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens) / (time.perf_counter() - start), ttft, itl, tokens


def percentile(values, q):
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [0])[0]


def bench_alone(args):
    port = free_port()
    server = start_refimpl(port, max_seqs=max(args.levels))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        wait_healthy(server, port, timeout=300)
        stream_one(url, "warm up", 4)
        print(f"serving benchmark: default model, {os.cpu_count()} cores, {args.requests} streamed requests "
              f"per client, max_tokens {args.max_tokens}")
        print(f"{'clients':>7} {'agg tok/s':>10} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8} {'speed-up':>9}")
        single = None
        for clients in args.levels:
            rate, ttft, itl, _ = run_level(url, clients, args.requests, args.max_tokens)
            single = single or rate
            print(f"{clients:7d} {rate:10.1f} {percentile(ttft, 50):8.2f}s {percentile(ttft, 95):8.2f}s "
                  f"{percentile(itl, 50) * 1e3:6.0f}ms {percentile(itl, 95) * 1e3:6.0f}ms {rate / single:8.2f}x")
        print("target: at 8 clients, aggregate tokens/s >= 5x one client")
    finally:
        stop(server)


def bench_peer(args):
    from refimpl.pull import pull

    model_dir = pull()  # the converted HF-layout directory both servers load
    max_seqs = max(args.levels)
    ports = {"refimpl": free_port(), "vllm": free_port()}
    servers = {"refimpl": start_refimpl(ports["refimpl"], max_seqs)}
    try:
        servers["vllm"] = start_vllm(args.peer_python, model_dir, ports["vllm"], max_seqs)
        for name, server in servers.items():
            wait_healthy(server, ports[name])
        print(f"serving benchmark beside vLLM: {model_dir}, float32, {os.cpu_count()} cores, {args.rounds} "
              f"alternated rounds per level, {args.requests} streamed requests per client, {args.max_tokens} "
              f"tokens each (<|im_end|> masked by logit_bias on both)", flush=True)
        results = {}  # (server, clients) -> [(agg tok/s, TTFT p50, ITL p50) per round]
        short = 0  # requests that stopped before max_tokens
        for clients in args.levels:
            for _ in range(args.rounds):
                for name, other in [("refimpl", "vllm"), ("vllm", "refimpl")]:
                    os.killpg(servers[other].pid, signal.SIGSTOP)  # freeze the idle one (see the docstring)
                    os.killpg(servers[name].pid, signal.SIGCONT)
                    url = f"http://127.0.0.1:{ports[name]}/v1/chat/completions"
                    stream_one(url, "warm up", 4, NO_EOS)
                    rate, ttft, itl, tokens = run_level(url, clients, args.requests, args.max_tokens, NO_EOS)
                    short += sum(n < args.max_tokens for n in tokens)
                    results.setdefault((name, clients), []).append((rate, percentile(ttft, 50), percentile(itl, 50)))
                    print(f"  {name:8} {clients:2d} clients: {rate:6.1f} tok/s", flush=True)
        if short:
            print(f"warning: {short} requests stopped before max_tokens")

        print(f"{'server':8} {'clients':>7} {'agg tok/s':>10} {'TTFT p50':>9} {'ITL p50':>8}   (medians over rounds)")
        med = {key: [statistics.median(column) for column in zip(*rounds)] for key, rounds in results.items()}
        for clients in args.levels:
            for name in ("refimpl", "vllm"):
                rate, ttft, itl = med[(name, clients)]
                print(f"{name:8} {clients:7d} {rate:10.1f} {ttft:8.2f}s {itl * 1e3:6.0f}ms")
        for clients in args.levels:
            (rate_r, ttft_r, _), (rate_v, ttft_v, _) = med[("refimpl", clients)], med[("vllm", clients)]
            print(f"refimpl/vLLM at {clients} clients: aggregate tok/s {rate_r / rate_v:.2f}x (above 1: refimpl "
                  f"faster), TTFT p50 {ttft_r / ttft_v:.2f}x (below 1: refimpl answers sooner)")
    finally:
        for server in servers.values():
            stop(server)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", help="client counts (default 1 4 8 16; with --peer 1 8)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level (and round)")
    parser.add_argument("--max-tokens", type=int, help="per request (default 64; with --peer 128)")
    parser.add_argument("--peer", choices=["vllm"], help="also start this server and alternate rounds with it")
    parser.add_argument("--peer-python", default=".venv-vllm/bin/python", help="the Python that has vLLM")
    parser.add_argument("--rounds", type=int, default=3, help="with --peer: rounds per server at each level")
    args = parser.parse_args()
    args.levels = args.levels or ([1, 8] if args.peer else [1, 4, 8, 16])
    args.max_tokens = args.max_tokens or (128 if args.peer else 64)
    if args.peer:
        bench_peer(args)
    else:
        bench_alone(args)


if __name__ == "__main__":
    main()
