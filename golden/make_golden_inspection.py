"""Make the golden attention weights and logit lens that refimpl/inspection.py is tested against.

Run by `make golden` (or `python golden/make_golden_inspection.py [--only <name> ...]`), after
make_golden_logprobs.py, whose tiny models it reads; never edit the output. Hugging Face's
implementation, on the CPU in float32 with the plain "eager" attention, is the reference: one
forward pass with `output_attentions=True, output_hidden_states=True` per model.

It writes, into golden/inspection/:
  smollm2-135m-instruct.json   the default model, loaded by transformers straight from the GGUF
                               file and dequantized to float32 (as make_golden_logprobs.py does);
                               one chat-templated conversation (system, user question, assistant
                               answer); the attention weights of a few (layer, head) pairs only
                               (ATTENTION_LAYERS x ATTENTION_HEADS), to keep the file small.
  <tiny name>.json             every tiny random model in golden/tiny/ (every family, every
                               window layout); one random prompt of PROMPT_LENGTH tokens, longer
                               than any of their sliding windows (16, 24 and 32 positions), so that
                               windowed rows have zeros; the attention weights of every
                               (layer, head) pair.

Each file records, for its prompt input_ids[0..T) and L = num_hidden_layers:
  attention           [{"layer", "head", "rows"}]: row t holds the t + 1 softmax weights of query
                      t over keys 0..t (exactly 0 outside a sliding window), to 8 significant digits.
                      Heads are query heads, as transformers' `attentions[layer][0, head]`.
  lens                per position t and layer l = 0..L, the distribution over the token after t
                      read off the residual stream entering block l (l = L: the model's output):
    top_ids, top_logprobs   [T][L + 1][TOP + 1] the TOP + 1 most likely ids, descending (ties to the
                            lower id); the test compares TOP, the extra one says whether the last
                            of them is a near-tie with the next
    next_logprob, next_rank [T][L + 1] of input_ids[t + 1] (rank 1: the most likely); null at t = T-1
    next_gap                [T][L + 1] how far (nats) the next token's logprob is from its nearest
                            other token's: below the tests' near-tie margin its rank is a coin toss
    entropy                 [T][L + 1] -sum p log p, in nats, summed in float64
  Log-probabilities are log_softmax of float32 logits, rounded to 6 decimals (float32 keeps ~7
  significant digits, and the tests' tolerance is 1e-4).

What transformers' hidden_states holds (transformers 5.24, checked numerically by
check_hidden_states on every model, each run): a tuple of L + 1 [1, T, D] arrays, captured by
hooks on the decoder layers.
  hidden_states[0]        the input of the first decoder layer: the token embeddings (Gemma: already
                          multiplied by its normalizer sqrt(D); GPT-2: token + position embeddings).
  hidden_states[l], 0<l<L the output of block l - 1, the residual stream entering block l.
  hidden_states[L]        NOT the residual stream after the last block: `capture_outputs` replaces
                          the last entry by `last_hidden_state`, which has already gone through the
                          final norm (model.norm / transformer.ln_f). The output head applied to it
                          gives the logits exactly; norm + head applied to it again is off by ~1 nat.
So layers 0..L-1 of the lens are lm_head(final_norm(hidden_states[l])) (then Gemma's final logit
soft cap), log_softmax'ed, and layer L is log_softmax of the model's own logits, as refimpl's.
The residual after the last block, taken by a hook on the last decoder layer, through the same
norm and head gives those logits bit for bit (checked too).
"""

import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from make_golden_logprobs import made_by  # golden/ is the script's folder, first on sys.path

GOLDEN = Path(__file__).resolve().parent
OUT = GOLDEN / "inspection"
SCRIPT = "golden/make_golden_inspection.py"
TOP = 5  # logit-lens candidates the tests compare (one more is written)
PROMPT_LENGTH = 48  # tokens of the tiny models' random prompts: longer than every window (at most 32)
ATTENTION_LAYERS = (0, 14, 29)  # the default model's pairs: first, middle and last of 30 layers
ATTENTION_HEADS = (0, 4, 8)  # of 9 query heads (3 key/value heads: one of each group)

CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the boiling point of water at sea level?"},
    {"role": "assistant", "content": "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level."},
]


# ---------------------------------------------------------------- the parts of a model the lens needs

def decoder_layers(model):
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.h  # GPT-2: transformer.h


def final_norm(model):
    base = model.base_model
    return base.norm if hasattr(base, "norm") else base.ln_f  # GPT-2: transformer.ln_f


def output_head(model, x):
    """The logits the model would give for final-normalised rows x: lm_head, then Gemma's soft cap."""
    logits = model.lm_head(x)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def embeddings(model, ids):
    """What the first block reads: the family's embedding of ids [1, T], written out independently."""
    base = model.base_model
    if model.config.model_type == "gpt2":
        return base.wte(ids) + base.wpe(torch.arange(ids.shape[1])[None, :])
    x = torch.nn.functional.embedding(ids, base.embed_tokens.weight)
    if model.config.model_type.startswith("gemma"):
        x = x * torch.tensor(model.config.hidden_size ** 0.5, dtype=x.dtype)
    return x


@torch.inference_mode()
def run(model, ids):
    """One forward pass: the outputs with attentions and hidden states, and the raw residual stream
    after the last block (a hook on the last decoder layer)."""
    captured = []
    hook = decoder_layers(model)[-1].register_forward_hook(
        lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
    try:
        out = model(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
    return out, captured[0]


@torch.inference_mode()
def check_hidden_states(model, ids, out, last_residual):
    """What the docstring says of hidden_states, asserted on this model."""
    L = model.config.num_hidden_layers
    hs = out.hidden_states
    assert len(hs) == L + 1 and len(out.attentions) == L, (len(hs), len(out.attentions), L)
    diff = float((hs[0] - embeddings(model, torch.tensor([ids]))).abs().max())
    assert diff < 1e-6, f"hidden_states[0] is not the embedding output ({diff})"
    norm = final_norm(model)
    assert torch.equal(hs[-1], norm(last_residual)), "hidden_states[-1] is not the final-normalised residual"
    assert torch.equal(output_head(model, hs[-1]), out.logits), "the head on hidden_states[-1] is not the logits"
    assert torch.equal(output_head(model, norm(last_residual)), out.logits)
    twice = float((output_head(model, norm(hs[-1])) - out.logits).abs().max())
    assert twice > 1e-2, f"norm(hidden_states[-1]) gives the logits too ({twice}): the last entry is un-normalised"
    return twice


# ---------------------------------------------------------------- what one file holds

def r6(x):
    return round(float(x), 6)


def sig8(x):
    """8 significant digits: a weight that is not exactly 0 stays not 0, however small."""
    return float(f"{float(x):.8g}")


def lens_of(logprobs, ids):
    """The lens fields of one layer from its log-probabilities [T, V] (float32)."""
    T = len(ids)
    values, order = torch.sort(logprobs, dim=-1, descending=True, stable=True)
    lp = logprobs.double()
    entropy = -(lp.exp() * lp).sum(-1)  # [T]
    rows = {"top_ids": order[:, :TOP + 1].tolist(),
            "top_logprobs": [[r6(v) for v in row] for row in values[:, :TOP + 1]],
            "entropy": [r6(e) for e in entropy],
            "next_logprob": [], "next_rank": [], "next_gap": []}
    for t in range(T):
        if t + 1 == T:
            for key in ("next_logprob", "next_rank", "next_gap"):
                rows[key].append(None)
            continue
        row, nxt = logprobs[t], ids[t + 1]
        mine = row[nxt]
        others = torch.cat([row[:nxt], row[nxt + 1:]])
        rows["next_logprob"].append(r6(mine))
        rows["next_rank"].append(int((row > mine).sum()) + 1)
        rows["next_gap"].append(float(f"{float((others - mine).abs().min()):.3g}"))
    return rows


@torch.inference_mode()
def make_file(model, ids, pairs, name, source, extra=None):
    """Run the model once over ids, check what hidden_states holds, and write golden/inspection/<name>.json."""
    start = time.perf_counter()
    L = model.config.num_hidden_layers
    out, last_residual = run(model, ids)
    twice = check_hidden_states(model, ids, out, last_residual)
    norm = final_norm(model)
    layers = []  # [L + 1] lens fields, each [T]
    for layer in range(L + 1):
        logits = out.logits[0] if layer == L else output_head(model, norm(out.hidden_states[layer][0]))
        layers.append(lens_of(torch.log_softmax(logits.float(), dim=-1), ids))
    lens = {key: [[layers[layer][key][t] for layer in range(L + 1)] for t in range(len(ids))] for key in layers[0]}

    attention = []
    for layer, head in pairs:
        weights = out.attentions[layer][0, head]  # [T, T]
        assert float((weights.sum(-1) - 1).abs().max()) < 1e-5 and not torch.triu(weights, 1).any()
        attention.append({"layer": layer, "head": head,
                          "rows": [[sig8(w) for w in weights[t, :t + 1]] for t in range(len(ids))]})
    causal = torch.tril(torch.ones(len(ids), len(ids), dtype=torch.bool))
    zeros = sum(int(((a[0] == 0) & causal).sum()) for a in out.attentions)

    data = {"made_by": made_by(source, SCRIPT), "model": name, **(extra or {}),
            "input_ids": list(ids), "num_hidden_layers": L, "num_attention_heads": model.config.num_attention_heads,
            "top": TOP, "attention": attention, "lens": lens}
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{Path(name).name.lower()}.json"
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"  wrote {path.relative_to(GOLDEN.parent)} ({path.stat().st_size / 1e3:.0f} kB): {len(ids)} tokens, "
          f"{L} layers, {len(pairs)} heads; {zeros} zero weights at or before the diagonal (all heads); "
          f"norm applied twice to hidden_states[-1] moves the logits by {twice:.2g}; "
          f"{time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------- the models

def make_default_model():
    from refimpl.pull import fetch_gguf, sha256_of

    path = fetch_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert 40 <= len(ids) <= 60, len(ids)
    pairs = [(layer, head) for layer in ATTENTION_LAYERS for head in ATTENTION_HEADS]
    assert max(ATTENTION_LAYERS) < model.config.num_hidden_layers
    assert max(ATTENTION_HEADS) < model.config.num_attention_heads
    make_file(model, ids, pairs, "SmolLM2-135M-Instruct", f"{path.name} sha256:{sha256_of(path)}",
              {"text": text, "messages": CONVERSATION})


def make_tiny_model(name):
    folder = GOLDEN / "tiny" / name
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = model.config
    windows = [w for w in (getattr(cfg, "sliding_window", None),) if w]
    assert all(w < PROMPT_LENGTH for w in windows), (name, windows)
    seed = zlib.crc32(name.encode())  # a prompt of its own per model, the same every run
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=PROMPT_LENGTH).tolist()
    pairs = [(layer, head) for layer in range(cfg.num_hidden_layers) for head in range(cfg.num_attention_heads)]
    make_file(model, ids, pairs, f"tiny/{name}", f"golden/tiny/{name} (make_golden_logprobs.py), "
              f"prompt: {PROMPT_LENGTH} ids from numpy default_rng({seed})")


def tiny_models():
    return sorted(p.name for p in (GOLDEN / "tiny").iterdir() if (p / "model.safetensors").exists())


def main():
    start = time.perf_counter()
    only = set(sys.argv[2:]) if sys.argv[1:2] == ["--only"] else None  # e.g. --only gpt2-tiny smollm2
    print("tiny random models:")
    for name in tiny_models():
        if not only or name in only:
            make_tiny_model(name)
    if not only or "smollm2" in only:
        print("default model:")
        make_default_model()
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
