"""The safetensors loader: strict about names and shapes, clear about unreadable files, exact in dtype.

Broken checkpoints are made by copying a tiny golden model to a temporary directory and rewriting
its tensors; every failure must be a WeightsError that names the tensor (or the file).
"""

import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from refimpl.models import forward, load_model
from refimpl.weights import WeightsError, read_tensors

from conftest import GOLDEN

UNTIED = GOLDEN / "tiny" / "llama-untied"  # has biases and an lm_head: the most tensors to get wrong
TIED = GOLDEN / "tiny" / "llama-rope-scaling"


def checkpoint(tmp_path, source=UNTIED, edit=lambda tensors: None):
    """A copy of `source` whose model.safetensors holds its tensors after `edit(tensors)`."""
    shutil.copy(source / "config.json", tmp_path / "config.json")
    tensors = read_tensors(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def last_logits(model):
    return np.asarray(forward(model, [[5, 17, 3, 250]], [model.new_cache(4)]))


def test_missing_tensor_is_named(tmp_path):
    path = checkpoint(tmp_path, edit=lambda t: t.pop("model.layers.1.self_attn.o_proj.bias"))
    with pytest.raises(WeightsError, match=r"tensor model\.layers\.1\.self_attn\.o_proj\.bias is missing"):
        load_model(path)


def test_extra_tensor_is_named(tmp_path):
    path = checkpoint(tmp_path, edit=lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    with pytest.raises(WeightsError, match=r"unexpected tensor model\.layers\.0\.self_attn\.rotary_emb\.inv_freq"):
        load_model(path)


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path):
    def transpose_gate(t):
        t["model.layers.0.mlp.gate_proj.weight"] = np.ascontiguousarray(t["model.layers.0.mlp.gate_proj.weight"].T)

    path = checkpoint(tmp_path, edit=transpose_gate)
    with pytest.raises(WeightsError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[64, 128\], expected \[128, 64\]"):
        load_model(path)


def test_unsupported_dtype_is_named(tmp_path):
    def to_int32(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)

    path = checkpoint(tmp_path, edit=to_int32)
    with pytest.raises(WeightsError, match=r"tensor model\.norm\.weight: dtype I32 is not supported"):
        load_model(path)


def test_truncated_file_is_an_error_naming_the_file(tmp_path):
    path = checkpoint(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:len(data) - 1000])
    with pytest.raises(WeightsError, match=r"model\.safetensors: cannot read as safetensors"):
        load_model(path)


def test_garbage_file_is_an_error_naming_the_file(tmp_path):
    path = checkpoint(tmp_path)
    (path / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match=r"model\.safetensors: cannot read as safetensors"):
        load_model(path)


def test_pickled_checkpoint_is_never_read(tmp_path):
    shutil.copy(UNTIED / "config.json", tmp_path / "config.json")
    # Not a pickle at all: were the loader to try unpickling, this would raise something else.
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle \x00\xff" * 64)
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin are never read"):
        load_model(tmp_path)


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    tensors = read_tensors(UNTIED / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(UNTIED / "config.json", sharded / "config.json")
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, sharded / shard)
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    np.testing.assert_array_equal(last_logits(load_model(sharded)), last_logits(load_model(UNTIED)))


def write_raw_safetensors(path, name, dtype, shape, data):
    """A one-tensor safetensors file written byte by byte from the format's definition
    (8-byte little-endian header size, JSON header, raw data): NumPy cannot hold bfloat16."""
    header = json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


def half_reference(dtype, bits):
    """The float a 16-bit pattern stands for, decoded by Python's struct module, not by NumPy."""
    if dtype == "F16":
        return struct.unpack("<e", bits.to_bytes(2, "little"))[0]
    return struct.unpack("<f", (bits << 16).to_bytes(4, "little"))[0]  # bfloat16: a float32's top half


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_half_precision_widens_exactly(tmp_path, dtype):
    # Every one of the 65536 bit patterns: normals, subnormals, zeros of both signs, infinities, NaNs.
    bits = list(range(1 << 16))
    write_raw_safetensors(tmp_path / "half.safetensors", "x", dtype, [256, 256], struct.pack("<65536H", *bits))
    ours = read_tensors(tmp_path / "half.safetensors")["x"]
    assert ours.dtype == np.float32 and ours.shape == (256, 256)
    theirs = np.array([half_reference(dtype, b) for b in bits], dtype=np.float32).reshape(256, 256)
    nan = np.isnan(theirs)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), theirs[~nan].view(np.uint32))  # bit for bit


def test_known_bfloat16_values(tmp_path):
    patterns = {0x3F80: 1.0, 0xC020: -2.5, 0x4049: 3.140625, 0x7F80: np.inf, 0x0000: 0.0, 0x8000: -0.0}
    write_raw_safetensors(tmp_path / "bf16.safetensors", "x", "BF16", [len(patterns)],
                          struct.pack(f"<{len(patterns)}H", *patterns))
    np.testing.assert_array_equal(read_tensors(tmp_path / "bf16.safetensors")["x"], list(patterns.values()))


def test_tied_model_keeps_one_copy_of_the_embeddings():
    model = load_model(TIED)
    assert model.config.tie_word_embeddings
    assert model.weights.embed_tokens is None  # one matrix in memory, not two
    V, D = model.config.vocab_size, model.config.hidden_size
    assert model.weights.lm_head.shape == (D, V)
    stored = read_tensors(TIED / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(model.weights.lm_head, stored.T)


# Every family loads strictly: its expected_shapes decide what a checkpoint must hold.
FAMILY_MODELS = sorted(p.name for p in (GOLDEN / "tiny").iterdir() if (p / "reference.json").exists())


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_every_family_names_a_missing_an_extra_and_a_misshaped_tensor(tmp_path, name):
    source = GOLDEN / "tiny" / name
    tensors = read_tensors(source / "model.safetensors")
    victim = sorted(n for n, t in tensors.items() if t.ndim == 2 and t.shape[0] != t.shape[1])[-1]
    cases = {
        "missing": (lambda t: t.pop(victim), rf"tensor {victim} is missing"),
        "extra": (lambda t: t.update({"model.stray.weight": np.ones(3, np.float32)}), r"unexpected tensor model\.stray\.weight"),
        "misshaped": (lambda t: t.update({victim: np.ascontiguousarray(t[victim].T)}), rf"tensor {victim} has shape"),
    }
    for kind, (edit, message) in cases.items():
        (tmp_path / kind).mkdir()
        with pytest.raises(WeightsError, match=message.replace(".", r"\.") if kind != "extra" else message):
            load_model(checkpoint(tmp_path / kind, source, edit))
