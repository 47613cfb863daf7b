"""Single-stream speed of refimpl's forward pass on the default model, beside transformers.

Prefill: one 512-token prompt (the opening of golden/long_prompt.txt), logits for the last
position only, as generation needs. Decode: 128 greedy steps with the KV cache, one token each.
Each figure is the median of --repeats runs, after one warm-up run, refimpl's and transformers'
runs interleaved so that both meet the same load on a shared machine. When torch and transformers
are installed (`pip install -e '.[golden]'`), the same figures are measured for transformers
(float32, CPU, the same converted weights, the same prompt) in the same run, with the ratio.

Usage: python bench/bench_forward.py [--repeats 5]   (or `make bench`)
"""

import argparse
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

from refimpl.models import forward, load_model
from refimpl.pull import pull
from refimpl.tokenizer import Tokenizer

PROMPT_TOKENS, DECODE_TOKENS = 512, 128
LONG_PROMPT = Path(__file__).resolve().parent.parent / "golden" / "long_prompt.txt"


def refimpl_run(model, ids):
    """One prefill of ids and DECODE_TOKENS greedy decode steps; returns their durations (s)."""
    cache = model.new_cache(len(ids) + DECODE_TOKENS, len(ids))  # after the prompt, rows decode
    t0 = time.perf_counter()
    logits = forward(model, [ids], [cache])
    t1 = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        logits = forward(model, [[int(np.argmax(logits[0]))]], [cache])
    return t1 - t0, time.perf_counter() - t1


def transformers_runner(model_dir):
    """A function like refimpl_run for transformers, or None when it is not installed."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, DynamicCache
    except ImportError:
        return None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # transformers 5.24 renames past_key_values to cache; the old name works in every version.
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)

    @torch.inference_mode()
    def run(ids):
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
        return t1 - t0, time.perf_counter() - t1

    return run, f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def measure(runners, ids, repeats):
    """Median prefill and decode tokens/s of each runner, their runs interleaved.

    The machine is shared and noisy: running A, B, A, B, ... lets both see the same conditions,
    and the ratio is the median of the per-round ratios.
    """
    for run in runners:
        run(ids)  # warm-up: first-touch page faults, thread pools, allocator
    rounds = [[run(ids) for run in runners] for _ in range(repeats)]  # [repeats][runner] -> (prefill s, decode s)
    speeds = [[(PROMPT_TOKENS / p, DECODE_TOKENS / d) for p, d in r] for r in rounds]
    medians = [tuple(statistics.median(s[i][j] for s in speeds) for j in range(2)) for i in range(len(runners))]
    ratios = tuple(statistics.median(s[0][j] / s[1][j] for s in speeds) for j in range(2)) if len(runners) > 1 else None
    return medians, ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model_dir = pull()
    ids = Tokenizer.from_dir(model_dir).encode(LONG_PROMPT.read_text())[:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}; "
          f"default model, {PROMPT_TOKENS}-token prefill, {DECODE_TOKENS}-token greedy decode, "
          f"median of {args.repeats} interleaved rounds")
    model = load_model(model_dir)
    labels, runners = ["refimpl (numpy float32)"], [lambda i: refimpl_run(model, i)]
    peer = transformers_runner(model_dir)
    if peer:
        runners.append(peer[0])
        labels.append(peer[1])
    medians, ratios = measure(runners, ids, args.repeats)
    print(f"{'':48} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for label, (prefill, decode) in zip(labels, medians):
        print(f"{label:48} {prefill:14.1f} {decode:13.1f}")
    if ratios:
        print(f"{'ratio refimpl / transformers':48} {ratios[0]:13.2f}x {ratios[1]:12.2f}x"
              "   (targets: prefill >= 0.8x, decode >= 1.0x)")
    else:
        print("transformers not installed: `pip install -e '.[golden]'` to measure it beside refimpl")


if __name__ == "__main__":
    main()
