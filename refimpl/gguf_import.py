"""Turn a Llama-family GGUF file into a Hugging Face-layout model directory.

A GGUF file (llama.cpp's format) holds everything in one place: metadata (the model's
hyperparameters, the tokenizer's vocabulary, merges and chat template) and quantized tensors.
The rest of refimpl reads the HF layout instead, so we convert once:

    config.json             hyperparameters, spelled as HF's LlamaConfig spells them
    model.safetensors       every tensor dequantized to float32, under HF names and shapes
    tokenizer.json          a byte-level BPE tokenizer for the `tokenizers` library
    tokenizer_config.json   special tokens, add_bos_token and the chat template
    generation_config.json  bos and eos ids

Three things differ between the formats and are undone here:
  1. GGUF lists a tensor's dimensions innermost first, the reverse of NumPy; `dequantize`
     already returns NumPy order, [out_features, in_features] as HF stores a Linear.
  2. llama.cpp's converter permutes the rows of q_proj and k_proj so that its interleaved
     RoPE (rotating pairs (0,1), (2,3), ...) gives the same result as HF's rotate-half RoPE
     (rotating pairs (i, i + Dh/2)). We apply the inverse permutation, so the weights work with
     rotate-half again. Without it text diverges after a few tokens.
  3. The tokenizer is stored as lists; we rebuild the same tokenizer transformers builds from
     this file (see `build_tokenizer`), so both give the same ids for every string.

The reference for all of this is transformers loading the same GGUF file
(`from_pretrained(folder, gguf_file=name)`): integrations/gguf in the installed package.
"""

import json
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from refimpl.tokenizer import byte_alphabet

# GGUF tensor name -> HF tensor name. Per-block names are "blk.{i}." + key.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_CONTROL = 3  # <|im_start|> and friends: special tokens
TOKEN_USER_DEFINED = 4  # added tokens that are matched whole but are not special


def convert_gguf(gguf_path, out_dir):
    """Write the HF-layout files for the GGUF file at gguf_path into out_dir."""
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    architecture = meta["general.architecture"]
    if architecture != "llama":
        raise ValueError(f"{gguf_path}: architecture {architecture!r} is not supported; only 'llama' is")

    tokenizer = build_tokenizer(meta)  # before the slow part: an unsupported tokenizer fails fast
    config = build_config(meta, tensor_names={t.name for t in reader.tensors})

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", config)
    save_file(convert_tensors(reader, config), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", build_tokenizer_config(meta))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    write_json(out_dir / "generation_config.json", generation)
    return out_dir


def open_gguf(path):
    """A GGUFReader over path, with a clear error when the file is not GGUF at all."""
    try:
        return GGUFReader(path)
    except ValueError as err:  # the reader checks the magic bytes and the version
        raise ValueError(f"{path} is not a readable GGUF file ({err})") from err


def read_metadata(reader):
    """All key/value metadata as plain Python values (strings, numbers, lists)."""
    meta = {}
    for key, field in reader.fields.items():
        value = field.contents()
        if isinstance(value, float):
            # GGUF stores floats as float32; keep the shortest decimal that rounds to the same
            # float32 (1e-05, not 9.999999747378752e-06), as the original config.json spelled it.
            value = float(str(np.float32(value)))
        meta[key] = value
    return meta


def build_config(meta, tensor_names):
    """config.json as HF's LlamaConfig writes it."""
    arch = "llama"
    hidden, heads = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    tokens = meta["tokenizer.ggml.tokens"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": meta.get(f"{arch}.rope.dimension_count", hidden // heads),
        "vocab_size": meta.get(f"{arch}.vocab_size", len(tokens)),
        "rms_norm_eps": meta[f"{arch}.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": meta[f"{arch}.context_length"],
        # Without a separate output matrix the logits reuse the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling, "factor": meta[f"{arch}.rope.scaling.factor"]}
        if f"{arch}.rope.scaling.original_context_length" in meta:
            original = meta[f"{arch}.rope.scaling.original_context_length"]
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config


def hf_name(gguf_name):
    """The HF name of a GGUF tensor; an error that names it if we do not know it."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    block, _, key = rest.partition(".")
    if prefix == "blk" and block.isdigit() and key in BLOCK_NAMES:
        return f"model.layers.{block}.{BLOCK_NAMES[key]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart in the HF layout")


def unpermute_qk(w, n_heads):
    """Undo llama.cpp's Q/K row permutation, per head: rows [2, Dh/2] -> [Dh/2, 2] back to [2, Dh/2].

    llama.cpp's convert_hf_to_gguf.py `permute` reshapes each head's Dh rows as [2, Dh/2]
    (first half, second half) and swaps the axes, interleaving the halves so that rotate-half
    pairs (i, i + Dh/2) become adjacent rows (2i, 2i + 1). Reading the rows as [Dh/2, 2] and
    swapping back restores HF's order.
    """
    head_dim = w.shape[0] // n_heads
    pairs = w.reshape(n_heads, head_dim // 2, 2, w.shape[1])  # [H*Dh, D] -> [H, Dh/2, 2, D]
    return pairs.swapaxes(1, 2).reshape(w.shape)  # -> [H, 2, Dh/2, D] -> [H*Dh, D]


def convert_tensors(reader, config):
    """Every tensor dequantized to float32, under its HF name and shape, Q/K rows un-permuted."""
    tensors = {}
    for t in tqdm(reader.tensors, desc="dequantize GGUF tensors", unit="tensor"):
        name = hf_name(t.name)
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        expected = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        if w.shape != expected:
            raise ValueError(f"GGUF tensor {t.name!r}: dequantized shape {w.shape}, expected {expected}")
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(w)
    return tensors


def byte_level_vocab(tokens):
    """token -> id, every token spelled in byte-level BPE's printable alphabet.

    A real byte-level token only uses the 256 characters of GPT-2's bytes_to_unicode table.
    llama.cpp sometimes stores an added token as raw text instead (a space, say); we respell
    those through the table as transformers does.
    """
    alphabet = byte_alphabet()
    allowed = set(alphabet.values())

    def spell(token):
        return "".join(alphabet[b] for b in token.encode("utf-8"))

    return {token if set(token) <= allowed else spell(token): i for i, token in enumerate(tokens)}


def build_tokenizer(meta):
    """The `tokenizers` Tokenizer transformers builds from this GGUF's vocabulary.

    transformers (integrations/gguf/gguf_tokenizer_mapping.py) hands a gpt2-type vocabulary to
    GPT2Tokenizer. It replaces GPT2's split regex only for the pre-tokenizer names it knows
    (llama-bpe, qwen2, ...); `smollm` is not among them, so the model gets GPT-2's own
    pre-tokenizer: ByteLevel with its built-in regex, no prefix space. We build that same
    pipeline so our ids equal HF's, token for token.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer model {kind!r} is not supported; only 'gpt2' (byte-level BPE) is")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=byte_level_vocab(tokens), merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if meta.get("tokenizer.ggml.add_bos_token", False):
        bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])]
        )

    # Control tokens are matched whole in the text and dropped by skip_special_tokens;
    # user-defined ones are matched whole but kept. A control token outside the byte alphabet
    # is a llama.cpp mislabel and is skipped, as transformers does.
    alphabet = set(byte_alphabet().values())
    types = meta.get("tokenizer.ggml.token_type", [])
    control = [t for t, kind in zip(tokens, types) if kind == TOKEN_CONTROL and set(t) <= alphabet]
    user = [t for t, kind in zip(tokens, types) if kind == TOKEN_USER_DEFINED and set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tok


def build_tokenizer_config(meta):
    """tokenizer_config.json: special tokens by text, add_bos_token and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for name, key in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")]:
        if f"tokenizer.ggml.{key}" in meta:
            config[name] = tokens[meta[f"tokenizer.ggml.{key}"]]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def write_json(path, obj):
    """Pretty JSON with non-ASCII kept readable, as HF writes its configs."""
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
