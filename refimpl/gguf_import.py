"""Turn a GGUF file into a Hugging Face-layout model directory.

A GGUF file (llama.cpp's format) holds everything in one place: metadata (the model's
hyperparameters, the tokenizer's vocabulary, merges and chat template) and quantized tensors.
The rest of refimpl reads the HF layout instead, so we convert once:

    config.json             hyperparameters, spelled as HF's LlamaConfig spells them
    model.safetensors       every tensor dequantized to float32, under HF names and shapes
    tokenizer.json          a byte-level BPE tokenizer for the `tokenizers` library
    tokenizer_config.json   special tokens, add_bos_token and the chat template
    generation_config.json  bos and eos ids

Three things differ between the formats and are undone:
  1. GGUF lists a tensor's dimensions innermost first, the reverse of NumPy; `dequantize`
     already returns NumPy order, [out_features, in_features] as HF stores a Linear.
  2. Tensor names, metadata keys and what llama.cpp's converter did to some tensors (the Llama
     family's permuted Q/K rows, for one) are each family's own: its file in refimpl/models/
     has gguf_config(meta, tensor names) -> config.json and gguf_tensors(name, array, config)
     -> the HF tensors. GGUF_ARCHITECTURES says which file reads which architecture.
  3. The tokenizer is stored as lists; we rebuild the same tokenizer transformers builds from
     this file (see `build_tokenizer`), so both give the same ids for every string.

The reference for all of this is transformers loading the same GGUF file
(`from_pretrained(folder, gguf_file=name)`): integrations/gguf in the installed package.
"""

import importlib
import json
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from refimpl.tokenizer import byte_alphabet

# GGUF's general.architecture -> the module of refimpl/models/ that reads it.
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "gemma2": "gemma",
    "gemma3": "gemma",
}

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_CONTROL = 3  # <|im_start|> and friends: special tokens
TOKEN_USER_DEFINED = 4  # added tokens that are matched whole but are not special


def convert_gguf(gguf_path, out_dir):
    """Write the HF-layout files for the GGUF file at gguf_path into out_dir."""
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    family = gguf_family(meta["general.architecture"], gguf_path)
    tokenizer = build_tokenizer(meta)  # before the slow part: an unsupported tokenizer fails fast
    config = family.gguf_config(meta, {t.name for t in reader.tensors})

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = convert_tensors(reader, config, family)  # may complete the config: Phi-3's LongRoPE factors are tensors
    write_json(out_dir / "config.json", config)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", build_tokenizer_config(meta))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    write_json(out_dir / "generation_config.json", generation)
    return out_dir


def gguf_family(architecture, path):
    """The family module that knows this GGUF architecture's names and fix-ups (refimpl/models/)."""
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: architecture {architecture!r} is not supported "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    return importlib.import_module(f"refimpl.models.{GGUF_ARCHITECTURES[architecture]}")


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


def convert_tensors(reader, config, family):
    """Every tensor dequantized to float32 and handed to the family, which names it as HF does and
    undoes what llama.cpp's converter did to it (family.gguf_tensors)."""
    tensors = {}
    for t in tqdm(reader.tensors, desc="dequantize GGUF tensors", unit="tensor"):
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        expected = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        if w.shape != expected:
            raise ValueError(f"GGUF tensor {t.name!r}: dequantized shape {w.shape}, expected {expected}")
        for name, hf in family.gguf_tensors(t.name, w, config):
            tensors[name] = np.ascontiguousarray(hf)
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
