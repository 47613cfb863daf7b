"""GGUF import for the Phi-3 family, checked on the tiny golden Phi-3 models.

Each tiny safetensors model is written as a GGUF the way llama.cpp's convert_hf_to_gguf.py
(Phi3MiniModel) writes it, converted back with refimpl.gguf_import, and compared with the original:
the same tensors bit for bit, the same family config, the same logits. The writer here is made
from the converter's own code, independently of refimpl/models/phi3.py's tables.
"""

import json
import math
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
PROMPTS = [[5, 17, 99], [1, 40, 41, 42, 43, 200, 7], list(range(3, 60))]  # the last is past LongRoPE's 40


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
    """HF name -> the name llama.cpp's tensor map gives it for arch phi3 (gguf/tensor_mapping.py)."""
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if hf_name in globals_:
        return globals_[hf_name]
    _, _, i, *rest = hf_name.split(".")
    short = {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    return f"blk.{i}.{short['.'.join(rest[:-1])]}.weight"


def write_phi3_gguf(path, model_dir, extra_tensors=()):
    """model_dir as a GGUF, as Phi3MiniModel.set_gguf_parameters / generate_extra_tensors write it."""
    c = json.loads((model_dir / "config.json").read_text())
    rope = c.get("rope_scaling") or c["rope_parameters"]
    n_embd, n_head = c["hidden_size"], c["num_attention_heads"]
    max_pos, orig_max_pos = c["max_position_embeddings"], c["original_max_position_embeddings"]
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_context_length(max_pos)
    w.add_rope_scaling_orig_ctx_len(orig_max_pos)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_sliding_window(c.get("sliding_window") or 0)  # 0: no window
    tokens, merges = byte_level_vocabulary(c["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        w.add_tensor(gguf_name(name), t)  # no transform: qkv and gate_up stay fused, in HF's order
    if rope.get("long_factor"):
        scale = max_pos / orig_max_pos
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig_max_pos)) if scale > 1 else 1.0)
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    for name, t in extra_tensors:
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def all_logits(model_dir, ids):
    model = load_model(model_dir)
    return to_numpy(forward(model, [ids], [model.new_cache(len(ids))], all_logits=True))


@pytest.mark.parametrize("name", ["phi3-tiny", "phi3-longrope-tiny"])
def test_phi3_gguf_round_trip(tmp_path, name):
    original = TINY / name
    write_phi3_gguf(tmp_path / f"{name}.gguf", original)
    out = convert_gguf(tmp_path / f"{name}.gguf", tmp_path / "out")

    expected, converted = load_file(str(original / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(converted) == sorted(expected)  # no rope_factors_*: they are config, not weights
    for tensor, value in expected.items():
        assert converted[tensor].shape == value.shape, tensor
        np.testing.assert_array_equal(converted[tensor], value, err_msg=tensor)

    assert load_config(out) == load_config(original)  # every field the family reads, LongRoPE factors included
    for ids in PROMPTS:
        np.testing.assert_array_equal(all_logits(out, ids), all_logits(original, ids))


def test_phi3_gguf_config_fields(tmp_path):
    write_phi3_gguf(tmp_path / "tiny.gguf", TINY / "phi3-tiny")
    config = json.loads((convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out") / "config.json").read_text())
    fields = ("sliding_window", "partial_rotary_factor", "tie_word_embeddings")
    assert tuple(config[f] for f in fields) == (24, 1.0, False)
    assert (config["max_position_embeddings"], config["original_max_position_embeddings"]) == (512, 4096)
    assert "rope_scaling" not in config  # no factor tensors: plain RoPE


def test_phi3_longrope_factors_read_from_tensors(tmp_path):
    # What gguf_config and gguf_tensors make of LongRoPE, whatever order convert_gguf writes files in.
    from gguf import GGUFReader

    from refimpl.gguf_import import read_metadata
    from refimpl.models import phi3

    write_phi3_gguf(tmp_path / "tiny.gguf", TINY / "phi3-longrope-tiny")
    reader = GGUFReader(tmp_path / "tiny.gguf")
    config = phi3.gguf_config(read_metadata(reader), {t.name for t in reader.tensors})
    fields = ("sliding_window", "partial_rotary_factor", "tie_word_embeddings")
    assert tuple(config[f] for f in fields) == (None, 0.75, True)
    for t in reader.tensors:
        names = [n for n, _ in phi3.gguf_tensors(t.name, np.asarray(t.data, dtype=np.float32), config)]
        assert names == ([] if t.name.startswith("rope_factors") else [phi3.hf_name(t.name)])
    assert config["rope_scaling"] == {"rope_type": "longrope", "original_max_position_embeddings": 40,
                                      "short_factor": [1.0, 1.1, 1.25, 1.5, 2.0, 2.5],
                                      "long_factor": [1.0, 1.5, 3.0, 6.0, 10.0, 16.0]}


def test_unknown_phi3_tensor_is_refused(tmp_path):
    write_phi3_gguf(tmp_path / "tiny.gguf", TINY / "phi3-tiny",
                    extra_tensors=[("blk.0.attn_q_norm.weight", np.ones(16, dtype=np.float32))])
    with pytest.raises(ValueError, match="blk.0.attn_q_norm.weight"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
