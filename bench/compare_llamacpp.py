"""A real `refimpl compare`: llama.cpp's server (llama-cpp-python) on the default model's original
4-bit GGUF, against refimpl's float32 pass on the same converted weights.

Starts the server on a free loopback port, runs `refimpl compare` twice, with echo (the prompt's
log-probabilities too) and with --no-echo (generated tokens only), writes both reports next to
this file (compare-llamacpp*.json, not committed), and stops the server.

Usage: python bench/compare_llamacpp.py --server-python .venv-llamacpp/bin/python   (or `make compare-llamacpp`)
"""

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from refimpl.pull import fetch_gguf

HERE = Path(__file__).resolve().parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-python", required=True, help="a Python with llama-cpp-python[server] installed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([args.server_python, "-m", "llama_cpp.server", "--model", str(fetch_gguf()),
                               "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(args.threads),
                               "--n_ctx", "4096", "--model_alias", "smollm2-q4_1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                requests.get(f"{base}/models", timeout=5).raise_for_status()
                break
            except requests.RequestException:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"llama.cpp's server did not start (exit status {server.poll()})")
                time.sleep(0.5)
        for name, extra in (("compare-llamacpp.json", []), ("compare-llamacpp-no-echo.json", ["--no-echo"])):
            command = [sys.executable, "-m", "refimpl", "compare", "--server", base, "--json", str(HERE / name), *extra]
            print("$ refimpl compare --server URL" + "".join(f" {a}" for a in extra), flush=True)
            status = subprocess.run(command).returncode
            print(f"(exit status {status}; the report: {HERE / name})\n", flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
