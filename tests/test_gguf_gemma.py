"""GGUF import of the Gemma family (Gemma 2, Gemma 3 text), checked end to end on the tiny models.

Each test writes a tiny GGUF as llama.cpp's convert_hf_to_gguf.py (Gemma2Model, Gemma3Model)
would, written here independently of refimpl's converter: its tensor names, its metadata keys,
every norm gain stored as w + 1, Q/K left unpermuted (NEOX RoPE), and Gemma 2's lm_head
dropped. It converts the file back with refimpl.gguf_import and compares tensors, config and
logits with the safetensors model the GGUF was made from.

A GGUF cannot say everything golden/tiny's Gemma configs say, so each test starts from a
variant of the tiny model that only uses what a GGUF can express (see `gguf_expressible`).
"""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from refimpl.gguf_import import convert_gguf
from refimpl.models import forward, load_config, load_model

TINY = Path(__file__).resolve().parent.parent / "golden" / "tiny"
PROMPTS = [[2, 40, 41, 300], [2, 7], [2] + list(range(3, 40))]  # the last one is longer than sliding_window (16)


def gguf_expressible(source, dst):
    """A copy of golden/tiny/<source> (config.json, model.safetensors) changed only where a GGUF
    written by llama.cpp's converter cannot hold what the tiny model has:
      - query_pre_attn_scalar has no GGUF key: 256, transformers' default, as the importer assumes;
      - Gemma 2: the converter drops lm_head.weight (Gemma ties), so the variant is tied;
      - Gemma 3: the layer pattern is fixed (every 6th layer global), so the 4 layers become 6
        (layers 0 and 1 copied to 4 and 5) and the last one is the only global layer.
    """
    config = json.loads((TINY / source / "config.json").read_text())
    tensors = load_file(str(TINY / source / "model.safetensors"))
    config["query_pre_attn_scalar"] = 256
    if config["model_type"] == "gemma2":
        del tensors["lm_head.weight"]
        config["tie_word_embeddings"] = True
    else:
        for new, old in ((4, 0), (5, 1)):
            for name in [n for n in tensors if n.startswith(f"model.layers.{old}.")]:
                tensors[name.replace(f"layers.{old}.", f"layers.{new}.")] = tensors[name].copy()
        config["num_hidden_layers"] = 6
        config["layer_types"] = ["sliding_attention"] * 5 + ["full_attention"]
        config.pop("_sliding_window_pattern", None)
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def byte_level_vocab(vocab_size):
    """A GPT-2-style vocabulary of exactly vocab_size tokens (ids 0, 1, 2 are Gemma's pad, eos, bos),
    the 256 byte symbols, then letter-pair merges; with llama.cpp's token types (3 = control)."""
    from tokenizers import pre_tokenizers

    tokens = ["<pad>", "<eos>", "<bos>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = []
    letters = "etaoinshrdlucmfwypvbgkqjxz"
    for a in letters:
        for b in letters:
            if len(tokens) < vocab_size:
                tokens.append(a + b)
                merges.append(f"{a} {b}")
    assert len(tokens) == vocab_size
    return tokens, merges, [3, 3, 3] + [1] * (vocab_size - 3)


def llamacpp_name(hf_name):
    """HF name -> the name llama.cpp's converter gives it (gguf's tensor_mapping for GEMMA2/GEMMA3)."""
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if hf_name in globals_:
        return globals_[hf_name]
    _, _, i, *rest = hf_name.split(".")
    short = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm"}
    return f"blk.{i}.{short['.'.join(rest[:-1])]}.weight"


def write_llamacpp_gguf(path, model_dir, extra_tensors=()):
    """The GGUF llama.cpp's converter writes for this Gemma 2 / Gemma 3 directory (F32 tensors)."""
    c = json.loads((model_dir / "config.json").read_text())
    tensors = load_file(str(model_dir / "model.safetensors"))
    gemma3 = c["model_type"] == "gemma3_text"
    w = gguf.GGUFWriter(str(path), "gemma3" if gemma3 else "gemma2")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if gemma3:  # Gemma3Model: TextModel's RoPE keys (from full_attention), then its own
        full, local = c["rope_parameters"]["full_attention"], c["rope_parameters"]["sliding_attention"]
        if full["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_freq_base_swa(local["rope_theta"])
        if c["final_logit_softcapping"]:
            w.add_final_logit_softcapping(c["final_logit_softcapping"])
    else:  # Gemma2Model: no RoPE keys at all (llama.cpp's default base is 10000)
        w.add_attn_logit_softcapping(c["attn_logit_softcapping"])
        w.add_final_logit_softcapping(c["final_logit_softcapping"])
    w.add_sliding_window(c["sliding_window"])

    tokens, merges, types = byte_level_vocab(c["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    w.add_pad_token_id(c["pad_token_id"])
    w.add_add_bos_token(True)

    for name, t in tensors.items():
        if name == "lm_head.weight" and not gemma3:
            continue  # Gemma2Model.filter_tensors skips it
        if name.endswith("norm.weight"):
            t = t + np.float32(1.0)  # modify_tensors: llama.cpp's RMSNorm multiplies by w, Gemma's by 1 + w
        w.add_tensor(llamacpp_name(name), t)
    for name, t in extra_tensors:
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def all_logits(model_dir):
    model = load_model(model_dir)
    out = []
    for ids in PROMPTS:
        out.append(np.asarray(forward(model, [ids], [model.new_cache(len(ids))], all_logits=True)))
    return out


@pytest.mark.parametrize("source", ["gemma2-tiny", "gemma3-tiny"])
def test_gguf_round_trip(tmp_path, source):
    original = gguf_expressible(source, tmp_path / "original")
    write_llamacpp_gguf(tmp_path / "tiny.gguf", original)
    converted = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")

    expected, loaded = load_file(str(original / "model.safetensors")), load_file(str(converted / "model.safetensors"))
    assert set(loaded) == set(expected)
    one = np.float32(1.0)
    for name, want in expected.items():
        got = loaded[name]
        assert got.shape == want.shape and got.dtype == np.float32, name
        if name.endswith("norm.weight"):
            # The converter's w + 1 rounds off w's lowest bits; what survives is exact: the gain
            # 1 + w the forward pass multiplies by, and (w + 1) - 1 as the stored w.
            np.testing.assert_array_equal(one + got, one + want, err_msg=name)
            np.testing.assert_array_equal(got, (want + one) - one, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)

    # The whole family config: widths, heads, head_dim, eps, caps, window, layer types, RoPE per
    # layer type (Gemma 3: linear x8 global, base 1000 local), tying, context, bos and eos.
    assert load_config(converted) == load_config(original)
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == [{"gemma2-tiny": "Gemma2ForCausalLM", "gemma3-tiny": "Gemma3ForCausalLM"}[source]]
    assert config["pad_token_id"] == 0

    for ours, theirs in zip(all_logits(converted), all_logits(original)):
        np.testing.assert_array_equal(ours, theirs)


def test_gemma3_gguf_keeps_an_untied_head(tmp_path):
    # Gemma3Model does not drop lm_head: an untied Gemma 3 keeps output.weight, and so do we.
    original = gguf_expressible("gemma3-tiny", tmp_path / "original")
    tensors = load_file(str(original / "model.safetensors"))
    tensors["lm_head.weight"] = np.random.default_rng(0).standard_normal(
        tensors["model.embed_tokens.weight"].shape).astype(np.float32)
    save_file(tensors, str(original / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": False}))

    write_llamacpp_gguf(tmp_path / "tiny.gguf", original)
    converted = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")
    assert load_config(converted).tie_word_embeddings is False
    np.testing.assert_array_equal(load_file(str(converted / "model.safetensors"))["lm_head.weight"],
                                  tensors["lm_head.weight"])
    for ours, theirs in zip(all_logits(converted), all_logits(original)):
        np.testing.assert_array_equal(ours, theirs)


def test_gemma2_gguf_without_caps_or_window_pattern_uses_the_defaults(tmp_path):
    # Gemma 2's caps, when a file lacks them, are transformers' and llama.cpp's defaults (50, 30),
    # and its layers alternate local/global starting local, whatever their number.
    original = gguf_expressible("gemma2-tiny", tmp_path / "original")
    write_llamacpp_gguf(tmp_path / "tiny.gguf", original)
    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "gemma2")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture",) \
                or field.name.endswith("softcapping"):
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(field.name, value)
        else:
            w.add_key_value(field.name, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = load_config(convert_gguf(tmp_path / "bare.gguf", tmp_path / "converted"))
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (50.0, 30.0)
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
    assert cfg.query_pre_attn_scalar == 256 and cfg.rope["full_attention"] == (10000.0, None)


@pytest.mark.parametrize("source, unknown", [
    ("gemma2-tiny", "blk.0.attn_q_norm.weight"),  # Gemma 3's per-head norm has no place in Gemma 2
    ("gemma3-tiny", "blk.1.ffn_gate_inp.weight"),
])
def test_unknown_gguf_tensor_is_refused(tmp_path, source, unknown):
    original = gguf_expressible(source, tmp_path / "original")
    write_llamacpp_gguf(tmp_path / "tiny.gguf", original, extra_tensors=[(unknown, np.ones(32, np.float32))])
    with pytest.raises(ValueError, match=unknown.replace(".", r"\.")):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")
