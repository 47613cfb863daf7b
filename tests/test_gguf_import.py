"""GGUF -> HF-layout conversion, checked without transformers.

The comparison with transformers' own GGUF loader (every tensor identical) was done once by
hand; these tests pin the pieces: the Q/K un-permutation against llama.cpp's permutation,
a tiny hand-written GGUF converted end to end, the real default model's files, and the errors.
"""

import json

import gguf
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from refimpl.gguf_import import convert_gguf
from refimpl.models.llama import unpermute_qk
from refimpl.tokenizer import Tokenizer


def llamacpp_permute(weights, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py's `permute`, copied as the reference."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


@pytest.mark.parametrize("n_heads, head_dim, width", [(9, 64, 576), (3, 64, 576), (2, 4, 5), (1, 8, 3)])
def test_unpermute_inverts_llamacpp_permute(n_heads, head_dim, width):
    w = np.random.default_rng(0).standard_normal((n_heads * head_dim, width)).astype(np.float32)
    permuted = llamacpp_permute(w, n_heads, n_heads)
    assert not np.array_equal(permuted, w)  # the test would prove nothing if permute were the identity
    np.testing.assert_array_equal(unpermute_qk(permuted, n_heads), w)


def test_unpermute_moves_rotate_half_pairs_apart():
    # GGUF rows of one head of width 4 are (0, 2, 1, 3) in HF order: pairs (i, i + Dh/2) made adjacent.
    gguf_rows = np.array([[0.0], [2.0], [1.0], [3.0]], dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(gguf_rows, 1)[:, 0], [0, 1, 2, 3])


TINY = dict(layers=2, width=8, ffn=12, heads=2, kv_heads=1, head_dim=4)
TINY_TOKENS = ["<s>", "</s>", "a", "b", "Ġ", "ab", "Ġab"]


def tiny_hf_tensors(rng):
    """HF-named float32 tensors of a tiny untied Llama."""
    D, F, H, Hkv, Dh = TINY["width"], TINY["ffn"], TINY["heads"], TINY["kv_heads"], TINY["head_dim"]
    V = len(TINY_TOKENS)
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                   p + "self_attn.q_proj.weight": (H * Dh, D), p + "self_attn.k_proj.weight": (Hkv * Dh, D),
                   p + "self_attn.v_proj.weight": (Hkv * Dh, D), p + "self_attn.o_proj.weight": (D, H * Dh),
                   p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                   p + "mlp.down_proj.weight": (D, F)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def gguf_name(hf_name):
    """HF name -> GGUF name, written independently of the converter's table."""
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if hf_name in globals_:
        return globals_[hf_name]
    _, _, i, *rest = hf_name.split(".")
    short = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    return f"blk.{i}.{short['.'.join(rest[:-1])]}.weight"


def write_tiny_gguf(path, tensors, arch="llama", rope_scaling=None):
    """A tiny GGUF as llama.cpp's converter would write it: F32 tensors, Q/K rows permuted."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(64)
    w.add_embedding_length(TINY["width"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_dimension_count(TINY["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scaling)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TINY_TOKENS)
    w.add_token_types([3, 3, 1, 1, 1, 1, 1])  # 3 = control
    w.add_token_merges(["a b", "Ġ ab"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}{{ bos_token + m['content'] + eos_token }}{% endfor %}")
    for name, t in tensors.items():
        if name.endswith("q_proj.weight"):
            t = llamacpp_permute(t, TINY["heads"], TINY["heads"])
        elif name.endswith("k_proj.weight"):
            t = llamacpp_permute(t, TINY["heads"], TINY["kv_heads"])
        w.add_tensor(gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_round_trip(tmp_path):
    tensors = tiny_hf_tensors(np.random.default_rng(1))
    write_tiny_gguf(tmp_path / "tiny.gguf", tensors, rope_scaling=2.0)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")

    loaded = load_file(str(out / "model.safetensors"))
    assert set(loaded) == set(tensors)
    for name, expected in tensors.items():
        np.testing.assert_array_equal(loaded[name], expected, err_msg=name)

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the file has output.weight
    assert (config["num_key_value_heads"], config["head_dim"], config["rms_norm_eps"]) == (1, 4, 1e-6)
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}

    tok = Tokenizer.from_dir(out)
    assert tok.encode("ab ab") == [0, 5, 6]  # add_bos_token from the GGUF, then the two merges
    assert tok.encode("</s>") == [0, 1]  # control token matched whole
    assert tok.special_ids == {0, 1}
    assert tok.apply_chat_template([{"role": "user", "content": "ab"}]) == "<s>ab</s>"
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 0, "eos_token_id": 1}


def test_default_model_files_and_config(default_model_dir):
    names = {p.name for p in default_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    expected = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
                "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152, "rope_theta": 100000.0,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": True,
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    assert {k: config.get(k) for k in expected} == expected
    assert "rope_scaling" not in config
    tok_config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is False
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["unk_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def test_default_model_tensors(default_model_dir):
    D, F, V, Dh = 576, 1536, 49152, 64
    expected = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(30):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                     p + "self_attn.q_proj.weight": (9 * Dh, D), p + "self_attn.k_proj.weight": (3 * Dh, D),
                     p + "self_attn.v_proj.weight": (3 * Dh, D), p + "self_attn.o_proj.weight": (D, 9 * Dh),
                     p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                     p + "mlp.down_proj.weight": (D, F)}
    assert len(expected) == 272
    with safe_open(str(default_model_dir / "model.safetensors"), framework="numpy") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert found == expected  # no lm_head: the embeddings are tied
    assert dtypes == {"F32"}


def test_unsupported_architecture_is_refused(tmp_path):
    tensors = tiny_hf_tensors(np.random.default_rng(2))
    write_tiny_gguf(tmp_path / "mamba.gguf", tensors, arch="mamba")
    with pytest.raises(ValueError, match="architecture 'mamba' is not supported"):
        convert_gguf(tmp_path / "mamba.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a GGUF file, just text\n" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        convert_gguf(path, tmp_path / "out")
