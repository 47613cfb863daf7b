"""Where the time of one decoding step goes: 8 sequences of the default model, about 300 positions each.

Times the parts of `forward()` for a step that decodes one token for each of 8 sequences, median
over --steps steps: the blocks' matrix products (each row alone, batching.py), the output head,
attention (cache writes included), everything else in the forward pass (norms, RoPE, activations,
Python), and the sampling of 8 rows on the host. Then the same products as one plain [8, K] @ W
BLAS call per matrix, which is faster but not batch-invariant: the difference is what invariance
costs in products.

Usage: python bench/bench_step.py [--seqs 8] [--steps 10]   (part of `make bench`)
"""

import argparse
import statistics
import sys
import time
from contextlib import contextmanager

import numpy as np

import refimpl.batching as batching
from refimpl.generate import load
from refimpl.models import forward
from refimpl.pull import pull
from refimpl.sampling import SamplingParams, sample

spent = {}


@contextmanager
def timed(part):
    start = time.perf_counter()
    try:
        yield
    finally:
        spent[part] = spent.get(part, 0.0) + time.perf_counter() - start


def instrument(vocab_size):
    """Wrap the batching module's entry points with timers (the family code calls them by name)."""
    products, attend, logits = batching.Products.matmul, batching.attend, batching.Batch.logits

    def timed_products(self, x, w):
        if w.shape[1] == vocab_size:  # the output head's product: timed as the head
            return products(self, x, w)
        with timed("block products"):
            return products(self, x, w)

    def timed_head(self, x, lm_head, all_logits):
        with timed("output head"):
            return logits(self, x, lm_head, all_logits)

    def timed_attend(*args, **kwargs):
        with timed("attention"):
            return attend(*args, **kwargs)

    batching.Products.matmul, batching.Batch.logits = timed_products, timed_head
    for module in [m for m in sys.modules.values() if getattr(m, "attend", None) is attend]:
        module.attend = timed_attend


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    model, tokenizer, _ = load(pull())
    rng = np.random.default_rng(0)
    caches = []
    for _ in range(args.seqs):
        prompt = [int(t) for t in rng.integers(100, 40000, 300)]
        caches.append(model.new_cache(300 + args.steps + 2, len(prompt)))
        forward(model, [prompt], [caches[-1]])
    instrument(model.config.vocab_size)
    rows, totals, parts = [[5]] * args.seqs, [], []
    params = SamplingParams(temperature=0.8)  # as bench_serving.py asks
    generators = [np.random.default_rng(i) for i in range(args.seqs)]
    for _ in range(args.steps):
        spent.clear()
        start = time.perf_counter()
        logits = np.asarray(forward(model, rows, caches))
        with timed("sampling on the host"):
            for row, generator in zip(logits, generators):
                sample(row, params, generator)
        totals.append(time.perf_counter() - start)
        parts.append(dict(spent))
    step = statistics.median(totals)
    print(f"one decoding step of {args.seqs} sequences (default model, ~300 positions each), median of {args.steps}:")
    print(f"  {'all':<32} {step * 1e3:7.1f} ms   ({args.seqs / step:.0f} tokens/s)")
    measured = 0.0
    for part in ("block products", "output head", "attention", "sampling on the host"):
        ms = statistics.median(p.get(part, 0.0) for p in parts) * 1e3
        measured += ms
        print(f"  {part:<32} {ms:7.1f} ms")
    print(f"  {'the rest (norms, RoPE, Python)':<32} {step * 1e3 - measured:7.1f} ms")

    x = rng.standard_normal((args.seqs, 1536), dtype=np.float32)
    weights = [w for layer in model.weights.layers for w in layer.values() if w.ndim == 2]

    def each_alone():
        for w in weights:
            batching.Products.of(model.xp, np.arange(args.seqs), np.ones(args.seqs, bool)).matmul(x[:, :w.shape[0]], w)

    def plain():
        for w in weights:
            x[:, :w.shape[0]] @ w

    for name, f in (("block products, each row alone", each_alone), ("the same as one plain BLAS call", plain)):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        print(f"  {name:<32} {statistics.median(times) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
