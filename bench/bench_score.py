"""Data-set scoring speed: `refimpl score --input` in one process, and with `--ray local` on the
machine's CPUs (one worker per CPU, each with the model loaded once), in alternated rounds.

The data set: --lines texts of 20 to 160 words cut from golden/long_prompt.txt, written once to
bench/score-set.jsonl (not committed). Each round scores it from scratch into a new file; the
figure is tokens scored per second of the whole command (model loading and Ray's start included:
what a user waits for), the median over --rounds, and the two output files must be the same bytes.

Usage: python bench/bench_score.py [--lines 96] [--rounds 3]   (or `make bench-score`)
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LONG_PROMPT = Path(__file__).resolve().parent.parent / "golden" / "long_prompt.txt"


def data_set(path, lines):
    words = LONG_PROMPT.read_text().split()
    with open(path, "w", encoding="utf-8") as f:
        for k in range(lines):
            start, length = (k * 131) % (len(words) - 160), 20 + (k * 47) % 141
            f.write(json.dumps({"id": k, "text": " ".join(words[start:start + length])}) + "\n")


def run(input_path, output_path, *extra):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "refimpl", "score", "--input", str(input_path), "--output",
                    str(output_path), *extra], check=True, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(json.loads(line)["token_ids"]) for line in open(output_path, encoding="utf-8"))
    return tokens / elapsed, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    input_path = Path(__file__).with_name("score-set.jsonl")
    data_set(input_path, args.lines)
    single, ray = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            one, tokens = run(input_path, Path(tmp, f"single{r}.jsonl"))
            many, _ = run(input_path, Path(tmp, f"ray{r}.jsonl"), "--ray", "local")
            same = Path(tmp, f"single{r}.jsonl").read_bytes() == Path(tmp, f"ray{r}.jsonl").read_bytes()
            print(f"round {r + 1}: {tokens} tokens; single process {one:.1f} tok/s, Ray {many:.1f} tok/s; "
                  f"outputs {'identical' if same else 'DIFFER'}")
            single.append(one)
            ray.append(many)
    print(f"median of {args.rounds}: refimpl score --input {statistics.median(single):.1f} tok/s, "
          f"--ray local {statistics.median(ray):.1f} tok/s ({statistics.median(ray) / statistics.median(single):.2f}x)")


if __name__ == "__main__":
    main()
