"""GGUF import for the GPT-2 family, checked on the tiny golden GPT-2 model.

The tiny safetensors model is written as a GGUF the way llama.cpp's convert_hf_to_gguf.py
(GPT2Model) writes it, converted back with refimpl.gguf_import, and compared with the original:
the same tensors bit for bit, the same family config, the same logits. The writer here is made
from the converter's own code, independently of refimpl/models/gpt2.py's tables.
"""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import pre_tokenizers

from refimpl.gguf_import import convert_gguf
from refimpl.models import forward, load_config, load_model
from refimpl.xp import to_numpy

TINY = Path(__file__).resolve().parent.parent / "golden" / "tiny"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPTS = [[5, 17, 99], [2, 40, 41, 42, 43, 200, 7], list(range(3, 60))]


def byte_level_vocabulary(vocab_size):
    """tokens and merges of a byte-level BPE vocabulary of exactly vocab_size tokens: the 3 specials,
    the 256 byte symbols, then letter pairs (as tests/server_helpers.tiny_model_dir builds it)."""
    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet())
    letters, merges = "etaoinshrdlucmfwypvbgkqjxz", []
    for a in letters:
        for b in letters:
            if len(tokens) < vocab_size:
                tokens.append(a + b)
                merges.append(f"{a} {b}")
    assert len(tokens) == vocab_size
    return tokens, merges


def gguf_name(hf_name):
    """HF name -> the name llama.cpp's tensor map gives it for arch gpt2 (gguf/tensor_mapping.py)."""
    globals_ = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}
    module, _, kind = hf_name.rpartition(".")  # kind: weight or bias
    if module in globals_:
        return f"{globals_[module]}.{kind}"
    _, _, i, *rest = module.split(".")
    short = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    return f"blk.{i}.{short['.'.join(rest)]}.{kind}"


def write_gpt2_gguf(path, model_dir, extra_tensors=()):
    """model_dir as a GGUF, as GPT2Model.set_gguf_parameters / modify_tensors write it."""
    c = json.loads((model_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(c["n_layer"])
    # The converter reads n_ctx, which transformers 5 no longer saves; GPT-2's own configs set it
    # equal to n_positions.
    w.add_context_length(c.get("n_ctx", c["n_positions"]))
    w.add_embedding_length(c["n_embd"])
    w.add_feed_forward_length(4 * c["n_embd"])
    w.add_head_count(c["n_head"])
    w.add_layer_norm_eps(c["layer_norm_epsilon"])
    tokens, merges = byte_level_vocabulary(c["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = np.ascontiguousarray(t.T)  # Conv1D [in, out] -> llama.cpp's [out, in]
        w.add_tensor(gguf_name(name), t)
    for name, t in extra_tensors:
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def all_logits(model_dir, ids):
    model = load_model(model_dir)
    return to_numpy(forward(model, [ids], [model.new_cache(len(ids))], all_logits=True))


def test_gpt2_gguf_round_trip(tmp_path):
    original = TINY / "gpt2-tiny"
    write_gpt2_gguf(tmp_path / "gpt2.gguf", original)
    out = convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")

    expected, converted = load_file(str(original / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(converted) == sorted(expected)
    for tensor, value in expected.items():
        assert converted[tensor].shape == value.shape, tensor  # Conv1D weights back to [in, out]
        np.testing.assert_array_equal(converted[tensor], value, err_msg=tensor)

    assert load_config(out) == load_config(original)  # every field the family reads
    config = json.loads((out / "config.json").read_text())
    assert (config["n_positions"], config["n_inner"], config["layer_norm_epsilon"]) == (512, None, 1e-5)
    for ids in PROMPTS:
        np.testing.assert_array_equal(all_logits(out, ids), all_logits(original, ids))


def test_gguf_qkv_is_stored_out_by_in(tmp_path):
    # The GGUF's matrices are [out, in] (NumPy order), so the conversion must transpose them back.
    write_gpt2_gguf(tmp_path / "gpt2.gguf", TINY / "gpt2-tiny")
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in gguf.GGUFReader(tmp_path / "gpt2.gguf").tensors}
    assert (shapes["blk.0.attn_qkv.weight"], shapes["blk.0.ffn_up.weight"]) == ((192, 64), (256, 64))


def test_unknown_gpt2_tensor_is_refused(tmp_path):
    write_gpt2_gguf(tmp_path / "gpt2.gguf", TINY / "gpt2-tiny",
                    extra_tensors=[("output.weight", np.ones((320, 64), dtype=np.float32))])
    with pytest.raises(ValueError, match="'output.weight' has no GPT-2 counterpart"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")
