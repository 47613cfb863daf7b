"""Make the golden log-probabilities that refimpl's forward pass is tested against.

Run by `make golden`. This script (with its sibling tokenizer script) is the only code in
the project that imports torch and transformers: Hugging Face's implementation, run on the
CPU in float32 with the plain "eager" attention, is the reference.

It writes:
  golden/smollm2-135m-instruct.json   the default model, loaded by transformers straight from
                                      the GGUF file and dequantized to float32; raw and
                                      chat-templated prompts, one of them over 1,000 tokens
                                      (golden/long_prompt.txt).
  golden/tiny/<name>/                 one tiny, randomly initialised model per set of
                                      architecture flags: config.json, model.safetensors,
                                      generation_config.json and reference.json.

Each case records, for its prompt input_ids[0..T):
  token_logprobs[i]   log p(input_ids[i] | input_ids[:i])   (entry 0 is null)
  top_ids/top_logprobs[i]   the 20 most likely next tokens after input_ids[:i+1], descending
  greedy_ids/greedy_logprobs   32 greedy steps after the whole prompt (argmax, ties to the
                               lowest id, not stopping at end-of-sequence)
Log-probabilities are log_softmax of the model's float32 logits.

The tiny models are re-drawn after construction with larger weights than Hugging Face's
default initialisation (std 0.02, zero biases, unit norms), which gives near-uniform logits
and zero biases and so would test nothing. Two of them are stored in 16-bit floats on disk;
their reference is computed in float32 from the rounded weights, reloaded from disk, so an
exact 16-bit -> float32 conversion reproduces it.
"""

import datetime
import json
import math
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig,
                          Qwen2Config)

GOLDEN = Path(__file__).resolve().parent
TOP_K = 20
GREEDY_STEPS = 32
MIN_GREEDY_GAP = 1e-3  # nats between the best and second-best token at each greedy step
SCRIPT = "golden/make_golden_logprobs.py"


# ---------------------------------------------------------------- one case, any model

@torch.inference_mode()
def logprobs_of(model, ids):
    """Log-probabilities of the next token at every position of one sequence."""
    logits = model(torch.tensor([ids])).logits[0]  # [T, V]
    return torch.log_softmax(logits.float(), dim=-1)  # [T, V]


def top_k(logprobs, k=TOP_K):
    """The k most likely ids per row, descending; a stable sort breaks ties toward the lower id."""
    values, ids = torch.sort(logprobs, dim=-1, descending=True, stable=True)
    return ids[:, :k], values[:, :k]  # [T, k], [T, k]


@torch.inference_mode()
def greedy(model, ids, steps=GREEDY_STEPS):
    """Greedy continuation with the KV cache; returns ids, their logprobs and the top-2 gaps."""
    out = model(torch.tensor([ids]), use_cache=True)
    out_ids, out_logprobs, gaps = [], [], []
    for _ in range(steps):
        logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # [V]
        best = int(torch.argmax(logprobs))  # first maximum, i.e. the lowest id on a tie
        top2 = torch.topk(logprobs, 2).values
        out_ids.append(best)
        out_logprobs.append(float(logprobs[best]))
        gaps.append(float(top2[0] - top2[1]))
        out = model(torch.tensor([[best]]), cache=out.cache, use_cache=True)  # formerly past_key_values
    return out_ids, out_logprobs, gaps


def check_greedy_by_full_pass(model, ids, greedy_ids, greedy_logprobs):
    """The cached greedy loop must agree with one uncached pass over prompt + continuation."""
    logprobs = logprobs_of(model, ids + greedy_ids[:-1])[len(ids) - 1:]  # [32, V]
    assert torch.argmax(logprobs, dim=-1).tolist() == greedy_ids, "cached greedy differs from a full pass"
    full = logprobs[torch.arange(len(greedy_ids)), torch.tensor(greedy_ids)]
    diff = float((full - torch.tensor(greedy_logprobs)).abs().max())
    assert diff < 1e-4, f"cached greedy logprobs differ from a full pass by {diff}"


def make_case(model, name, kind, ids, text=None, messages=None):
    """Everything the tests compare for one prompt; also returns the smallest greedy gap."""
    logprobs = logprobs_of(model, ids)  # [T, V]
    top_ids, top_values = top_k(logprobs)
    token = [None] + [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    greedy_ids, greedy_logprobs, gaps = greedy(model, ids)
    check_greedy_by_full_pass(model, ids, greedy_ids, greedy_logprobs)
    assert math.isclose(greedy_logprobs[0], float(top_values[-1, 0]), abs_tol=1e-5)
    case = {
        "name": name, "kind": kind, "text": text, "messages": messages,
        "input_ids": list(ids),
        "token_logprobs": token,
        "top_ids": top_ids.tolist(),
        "top_logprobs": [[float(x) for x in row] for row in top_values],
        "greedy_ids": greedy_ids,
        "greedy_logprobs": greedy_logprobs,
    }
    return case, min(gaps)


def smallest_top_gap(case):
    """Closest pair of neighbours within any top-20 row: below ~1e-5 their order is a coin toss."""
    rows = np.array(case["top_logprobs"])  # [T, 20], descending
    return float((rows[:, :-1] - rows[:, 1:]).min())


def made_by(source, script=SCRIPT):
    """Provenance written at the top of every golden file (make_golden_inspection.py's too)."""
    return {
        "command": "make golden", "script": script,
        "python": platform.python_version(),
        "torch": torch.__version__, "transformers": version("transformers"),
        "numpy": np.__version__, "gguf": version("gguf"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu", "dtype": "float32", "attn_implementation": "eager",
        "source": source,
    }


def write_json(path, made, model_name, cases):
    path.write_text(json.dumps({"made_by": made, "model": model_name, "cases": cases}) + "\n")
    print(f"wrote {path.relative_to(GOLDEN.parent)} ({path.stat().st_size / 1e6:.2f} MB)")


# ---------------------------------------------------------------- A. the default model

SYSTEM = "You are a careful assistant who answers in one short paragraph."

RAW_PROMPTS = {
    "raw_english": "The quick brown fox jumps over the lazy dog. Then it runs into the forest, where",
    "raw_unicode": "Café crème, naïve façade, Ångström, Zürich — 東京 and Москва 🌍🚀✨ émojis: 😀👍🏽!",
    "raw_arithmetic": "Compute: 12345 + 67890 = 80235; 3.14159 * 2 = 6.28318; 2**10 = 1024; 7 / 3 = ",
    "raw_code": ('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
                 "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\n"
                 "def is_prime(n):\n"),
    "raw_long": (GOLDEN / "long_prompt.txt").read_text(encoding="utf-8"),
}

CHATS = {
    "chat_with_system": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Why is the sky blue during the day but red at sunset?"},
    ],
    # No system message: the template inserts SmolLM's default one.
    "chat_default_system": [
        {"role": "user", "content": "Write a haiku about a cat sleeping in the sun."},
    ],
    "chat_multi_turn": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And how many people live there?"},
    ],
}


def make_default_model():
    """Golden file for SmolLM2-135M-Instruct, from its GGUF dequantized to float32."""
    from refimpl.pull import fetch_gguf, sha256_of

    path = fetch_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = [(name, "raw", text, None, tokenizer(text, add_special_tokens=False).input_ids)
               for name, text in RAW_PROMPTS.items()]
    for name, messages in CHATS.items():
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append((name, "chat", text, messages, tokenizer(text, add_special_tokens=False).input_ids))
    cases = []
    for name, kind, text, messages, ids in prompts:
        start = time.perf_counter()
        case, gap = make_case(model, name, kind, ids, text=text, messages=messages)
        cases.append(case)
        print(f"  {name}: {len(ids)} tokens, smallest greedy gap {gap:.3g} nats, smallest top-20 "
              f"gap {smallest_top_gap(case):.2g} nats, {time.perf_counter() - start:.1f} s")
        if gap < MIN_GREEDY_GAP:
            print(f"  warning: {name} has a near-tie in its greedy continuation", file=sys.stderr)
    assert 1000 <= len(cases[list(RAW_PROMPTS).index("raw_long")]["input_ids"]) <= 1300
    write_json(GOLDEN / "smollm2-135m-instruct.json",
               made_by(f"{path.name} sha256:{sha256_of(path)}"), "SmolLM2-135M-Instruct", cases)


# ---------------------------------------------------------------- B. tiny random models

SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)

# name -> (config, dtype of the weights on disk, first seed to try)
TINY_MODELS = {
    "llama-rope-scaling": (LlamaConfig(
        **SMALL, vocab_size=256, num_hidden_layers=2, intermediate_size=128,  # head width 16
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
        # With head width 16 and theta 10000 the wavelengths are 6.3, 19.9, 62.8, 199, ...
        # positions; those below 64 / 4 = 16 stay untouched, those above 64 are stretched by
        # the factor 8, those in between are smoothed: all three branches of llama3 are used.
        rope_scaling={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    ), torch.float32, 1000),
    # head_dim 32 is not hidden / heads = 16, so q_proj is [128, 64]. HF's window: the query
    # at position i sees the keys at positions i-15 .. i, sixteen tokens including itself.
    "mistral-sliding-window": (MistralConfig(
        **SMALL, head_dim=32, vocab_size=320, num_hidden_layers=3, intermediate_size=160,
        max_position_embeddings=512, sliding_window=16, rope_theta=10000.0,
        tie_word_embeddings=False,
    ), torch.float32, 2000),
    "qwen2-qkv-bias": (Qwen2Config(
        **SMALL, vocab_size=384, num_hidden_layers=2, intermediate_size=192,
        max_position_embeddings=512, use_sliding_window=False, rope_theta=1000000.0,
        tie_word_embeddings=False,
    ), torch.bfloat16, 3000),
    "llama-untied": (LlamaConfig(
        **SMALL, vocab_size=512, num_hidden_layers=2, intermediate_size=128,
        max_position_embeddings=512, tie_word_embeddings=False,
        attention_bias=True, mlp_bias=True,
    ), torch.float16, 4000),
}

WEIGHT_STD = 0.25  # with width 64: logits spread ~2 nats std, peaked but not one-hot
BIAS_STD = 0.2
NORM_STD = 0.1
PROMPT_LENGTHS = (48, 56, 64, 1)  # longer than the sliding window of 16, and one single token


def redraw_parameters(model, seed):
    """Replace HF's near-zero init with weights that make every flag matter."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied embeddings appear once
        if name.endswith("norm.weight") or name.split(".")[-2].startswith("ln_"):  # RMSNorm / LayerNorm gains
            values = 1 + NORM_STD * torch.randn(p.shape, generator=generator)
        elif name.endswith(".bias"):
            values = BIAS_STD * torch.randn(p.shape, generator=generator)
        else:
            values = WEIGHT_STD * torch.randn(p.shape, generator=generator)
        with torch.no_grad():
            p.copy_(values)


def random_prompts(vocab_size, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in PROMPT_LENGTHS]


def build_and_save(config, disk_dtype, seed, folder):
    """A re-drawn model, rounded to its disk dtype, saved, and reloaded in float32 from disk."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    redraw_parameters(model, seed)
    model = model.to(disk_dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys(), set(saved.keys()) ^ set(loaded.keys())
    for name, tensor in saved.items():
        assert torch.equal(tensor.float(), loaded[name]), f"{name} did not survive the round trip through disk"
    return reloaded


def is_well_conditioned(cases, gaps):
    """Greedy has no near-ties, and the distributions are peaked but not one-hot."""
    top1 = np.exp([row[0] for case in cases for row in case["top_logprobs"]])
    print(f"    top-1 probability: median {np.median(top1):.2f}, max {top1.max():.3f}; smallest greedy "
          f"gap {min(gaps):.3g} nats; smallest top-20 gap {min(map(smallest_top_gap, cases)):.2g} nats")
    return min(gaps) > MIN_GREEDY_GAP and 0.05 < np.median(top1) < 0.9 and top1.max() < 0.9999


def make_tiny_model(name, config, disk_dtype, first_seed):
    """Save one tiny model and its reference.json, reseeding until it is well conditioned."""
    folder = GOLDEN / "tiny" / name
    for seed in range(first_seed, first_seed + 20):
        print(f"  {name}, seed {seed}")
        model = build_and_save(config, disk_dtype, seed, folder)
        cases, gaps = [], []
        for i, ids in enumerate(random_prompts(config.vocab_size, seed)):
            case, gap = make_case(model, f"random_{i}_len{len(ids)}", "ids", ids)
            cases.append(case)
            gaps.append(gap)
        if is_well_conditioned(cases, gaps):
            break
    else:
        raise RuntimeError(f"no seed gave {name} well-conditioned outputs")
    write_json(folder / "reference.json", made_by(f"random init, seed {seed}"), f"tiny/{name}", cases)
    return model, cases


def check_llama3_bands(config):
    """Some RoPE frequencies are untouched, some scaled, some smoothed, as the comment says."""
    rope = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    wavelengths = [2 * math.pi * rope["rope_theta"] ** (i / head_dim) for i in range(0, head_dim, 2)]
    low = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    bands = {"untouched": sum(w < high for w in wavelengths), "scaled": sum(w > low for w in wavelengths)}
    bands["smoothed"] = len(wavelengths) - bands["untouched"] - bands["scaled"]
    print(f"    llama3 rope frequency bands: {bands}")
    assert all(bands.values()), bands


def check_sliding_window(model, cases, window):
    """Eager attention really applies the window: without it only positions >= window change."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.sliding_window = None
    unwindowed = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    unwindowed.load_state_dict(model.state_dict())
    ids = max((case["input_ids"] for case in cases), key=len)
    diff = (logprobs_of(model, ids) - logprobs_of(unwindowed, ids)).abs().amax(dim=-1)  # [T]
    print(f"    sliding window: max |diff| before position {window}: {float(diff[:window].max()):.2g}, "
          f"after: {float(diff[window:].max()):.2g}")
    assert float(diff[:window].max()) < 1e-5 and float(diff[window:].min()) > 1e-3


def check_config_file(name, folder):
    """The config.json transformers wrote says what we meant."""
    saved = json.loads((folder / "config.json").read_text())
    wanted = {
        "llama-rope-scaling": {"tie_word_embeddings": True},
        "mistral-sliding-window": {"sliding_window": 16, "head_dim": 32},
        "qwen2-qkv-bias": {"use_sliding_window": False, "dtype": "bfloat16"},
        "llama-untied": {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True,
                         "dtype": "float16"},
    }[name]
    for key, value in wanted.items():
        assert saved.get(key) == value, f"{folder}/config.json: {key} = {saved.get(key)!r}, wanted {value!r}"
    if name == "llama-rope-scaling":
        rope = saved.get("rope_parameters") or saved.get("rope_scaling")
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0, rope


def family_modules():
    """golden/families/<family>.py: each family beyond the Llama family adds its tiny models there, as
    MODELS = {name: (config, disk dtype, first seed)} and check(name, model, cases, folder), which
    asserts that the model exercises what it is meant to (a window shorter than the prompts, a
    soft-cap that is reached, experts routed differently per token, ...)."""
    import importlib.util

    modules = []
    for path in sorted((GOLDEN / "families").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"golden_family_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


def make_tiny_models(only=None):
    for name, (config, disk_dtype, first_seed) in TINY_MODELS.items():
        if only and name not in only:
            continue
        model, cases = make_tiny_model(name, config, disk_dtype, first_seed)
        check_config_file(name, GOLDEN / "tiny" / name)
        if name == "llama-rope-scaling":
            check_llama3_bands(model.config)
        if name == "mistral-sliding-window":
            check_sliding_window(model, cases, model.config.sliding_window)
    for family in family_modules():
        for name, (config, disk_dtype, first_seed) in family.MODELS.items():
            if only and name not in only:
                continue
            model, cases = make_tiny_model(name, config, disk_dtype, first_seed)
            family.check(name, model, cases, GOLDEN / "tiny" / name)


# ---------------------------------------------------------------- C. RoPE inverse frequencies

# Llama 3.1's own values: with head_dim 128 they put frequencies in all three llama3 regimes.
ROPE_CONFIGS = {
    "default": {"rope_theta": 500000.0},
    "llama3": {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}


def make_rope_frequencies():
    """transformers' own RoPE inverse frequencies, to compare bit for bit."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    base = dict(vocab_size=32, hidden_size=512, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=131072)
    cases = []
    for name, keys in ROPE_CONFIGS.items():
        config = LlamaConfig(**base, **keys)
        init = ROPE_INIT_FUNCTIONS.get(name) or LlamaRotaryEmbedding.compute_default_rope_parameters
        inv_freq, _ = init(config)
        cases.append({"name": name, "config": {"model_type": "llama", **base, **keys},
                      "inv_freq_float32_bits": inv_freq.float().numpy().view(np.uint32).tolist()})
    write_json(GOLDEN / "rope_inverse_frequencies.json", made_by("LlamaConfig"), "none", cases)


def main():
    start = time.perf_counter()
    if sys.argv[1:2] == ["--only"]:  # e.g. --only gpt2 gemma2: just these tiny models
        make_tiny_models(only=set(sys.argv[2:]))
        print(f"done in {time.perf_counter() - start:.0f} s")
        return
    make_rope_frequencies()
    print("tiny random models:")
    make_tiny_models()
    print("default model:")
    make_default_model()
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
