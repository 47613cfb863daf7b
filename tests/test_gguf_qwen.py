"""GGUF import of Qwen2 and Qwen3, checked end to end on the tiny models.

Each test writes a tiny GGUF as llama.cpp's convert_hf_to_gguf.py (Qwen2Model, Qwen3Model) would,
written here independently of refimpl's converter: its tensor names (Qwen2's q/k/v biases,
Qwen3's attn_q_norm / attn_k_norm), its metadata keys (TextModel.set_gguf_parameters: no
rope.dimension_count; attention.key_length only when config.json names a head_dim), and Q/K
left in HF's order: only LlamaModel permutes them, Qwen's graphs use NEOX-style RoPE as HF does.
It converts the file back with refimpl.gguf_import and compares tensors, config and logits with
the safetensors model the GGUF was made from.

golden/tiny/qwen3-tiny is tied and has head_dim 32 where width / heads is 16;
golden/tiny/qwen2-qkv-bias is untied, has q/k/v biases and is stored bfloat16, so its GGUF
holds, and its conversion is compared with, the float32 values refimpl reads from it.
"""

import json
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from refimpl.gguf_import import convert_gguf
from refimpl.models import forward, load_config, load_model
from refimpl.weights import read_tensors

TINY = Path(__file__).resolve().parent.parent / "golden" / "tiny"
SOURCES = {"qwen3-tiny": ("qwen3", "Qwen3ForCausalLM"), "qwen2-qkv-bias": ("qwen2", "Qwen2ForCausalLM")}
PROMPTS = [[1, 40, 41, 300], [1, 7], list(range(3, 60))]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_vocab(vocab_size):
    """A GPT-2-style vocabulary of exactly vocab_size tokens: three ChatML specials, the 256 byte
    symbols, then letter-pair merges; with llama.cpp's token types (3 = control, 1 = normal)."""
    from tokenizers import pre_tokenizers

    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = []
    letters = "etaoinshrdlucmfwypvbgkqjxz"
    for a in letters:
        for b in letters:
            if len(tokens) < vocab_size:
                tokens.append(a + b)
                merges.append(f"{a} {b}")
    assert len(tokens) == vocab_size
    return tokens, merges, [3] * len(SPECIALS) + [1] * (vocab_size - len(SPECIALS))


def llamacpp_name(hf_name):
    """HF name -> the name llama.cpp's converter gives it (gguf's tensor_mapping for QWEN2/QWEN3)."""
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if hf_name in globals_:
        return globals_[hf_name]
    _, _, i, *rest = hf_name.split(".")
    short = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    return f"blk.{i}.{short['.'.join(rest[:-1])]}.{rest[-1]}"


def float32_tensors(model_dir):
    """The checkpoint as refimpl reads it: float32, bfloat16 widened exactly."""
    return read_tensors(model_dir / "model.safetensors")


def write_llamacpp_gguf(path, model_dir, extra_tensors=()):
    """The GGUF llama.cpp's converter writes for this Qwen2 / Qwen3 directory (F32 tensors)."""
    c = json.loads((model_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), c["model_type"])  # MODEL_ARCH_NAMES: "qwen2", "qwen3"
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(c["rope_parameters"]["rope_theta"])  # rope_type "default": no scaling keys
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    if "head_dim" in c:
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, merges, types = byte_level_vocab(c["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    for name, t in float32_tensors(model_dir).items():
        w.add_tensor(llamacpp_name(name), t)  # as HF stores it: Qwen2Model / Qwen3Model permute nothing
    for name, t in extra_tensors:
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def all_logits(model_dir):
    model = load_model(model_dir)
    return [np.asarray(forward(model, [ids], [model.new_cache(len(ids))], all_logits=True)) for ids in PROMPTS]


@pytest.mark.parametrize("source", SOURCES)
def test_gguf_round_trip(tmp_path, source):
    original = TINY / source
    write_llamacpp_gguf(tmp_path / "tiny.gguf", original)
    converted = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")

    expected, loaded = float32_tensors(original), load_file(str(converted / "model.safetensors"))
    assert set(loaded) == set(expected)
    for name, want in expected.items():
        assert loaded[name].shape == want.shape and loaded[name].dtype == np.float32, name
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)

    config = json.loads((converted / "config.json").read_text())
    model_type, hf_class = SOURCES[source]
    assert (config["model_type"], config["architectures"]) == (model_type, [hf_class])
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 2)  # the GGUF's; the tiny configs have none
    # Every other field of the family config: widths, heads, head_dim, biases, QK-norm, tying,
    # eps, RoPE, context and (no) sliding window.
    ours, theirs = load_config(converted), load_config(original)
    assert replace(ours, bos_token_id=None, eos_token_id=None) == theirs

    for ours, theirs in zip(all_logits(converted), all_logits(original)):
        np.testing.assert_array_equal(ours, theirs)


def test_qwen3_head_dim_comes_from_key_length(tmp_path):
    # Qwen3 decouples the head width from width / heads (64 / 4 = 16 here, 32 per head); llama.cpp
    # writes it as attention.key_length and no rope.dimension_count.
    write_llamacpp_gguf(tmp_path / "tiny.gguf", TINY / "qwen3-tiny")
    meta = gguf.GGUFReader(tmp_path / "tiny.gguf").fields
    assert "qwen3.rope.dimension_count" not in meta and meta["qwen3.attention.key_length"].contents() == 32
    cfg = load_config(convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted"))
    assert (cfg.head_dim, cfg.qk_norm, cfg.tie_word_embeddings, cfg.qkv_bias) == (32, True, True, False)


def test_qwen2_keeps_its_biases_and_untied_head(tmp_path):
    write_llamacpp_gguf(tmp_path / "tiny.gguf", TINY / "qwen2-qkv-bias")
    converted = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")
    config = json.loads((converted / "config.json").read_text())
    assert "attention_bias" not in config  # Qwen2's q/k/v biases are implied by its model_type
    cfg = load_config(converted)
    assert (cfg.head_dim, cfg.qkv_bias, cfg.o_bias, cfg.qk_norm, cfg.tie_word_embeddings) == \
        (16, True, False, False, False)
    assert cfg.rope_theta == 1000000.0


@pytest.mark.parametrize("source, unknown", [
    ("qwen2-qkv-bias", "blk.0.attn_qkv.weight"),  # a fused QKV (Phi-3's layout) has no place in Qwen
    ("qwen3-tiny", "blk.1.ffn_gate_inp.weight"),  # a MoE router belongs to qwen3moe, not qwen3
])
def test_unknown_gguf_tensor_is_refused(tmp_path, source, unknown):
    write_llamacpp_gguf(tmp_path / "tiny.gguf", TINY / source, extra_tensors=[(unknown, np.ones(32, np.float32))])
    with pytest.raises(ValueError, match=unknown.replace(".", r"\.")):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")


def test_llama_biases_are_unpermuted_like_their_rows():
    # The importer is shared with Llama, whose converter (LlamaModel.modify_tensors) permutes
    # q_proj.bias and k_proj.bias with the rows; a Qwen bias is left alone.
    from refimpl.models.llama import gguf_tensors

    heads, head_dim = 2, 4
    bias = np.arange(heads * head_dim, dtype=np.float32)
    permuted = bias.reshape(heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)  # llama.cpp's `permute`
    llama = {"model_type": "llama", "num_attention_heads": heads, "num_key_value_heads": heads}
    [(name, got)] = gguf_tensors("blk.0.attn_q.bias", permuted, llama)
    assert name == "model.layers.0.self_attn.q_proj.bias"
    np.testing.assert_array_equal(got, bias)
    [(_, kept)] = gguf_tensors("blk.0.attn_q.bias", permuted, llama | {"model_type": "qwen2"})
    np.testing.assert_array_equal(kept, permuted)
