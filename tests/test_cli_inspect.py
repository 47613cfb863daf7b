"""`refimpl tokenize` and `refimpl inspect` on the default model: the tables a student reads.

tokenize shows each token's id, piece and bytes (--chat: the rendered template first); inspect
shows each token's log-probability, the logit lens at a position (layer 0 to L, with the next
token's rank) and a head's attention weights over the earlier tokens. The numbers are those of
refimpl.inspection (tested against transformers in test_inspection.py).
"""

import re

import pytest

from refimpl import inspection
from refimpl.cli import main
from refimpl.generate import load

TEXT = "The capital of France is"


@pytest.fixture(scope="module")
def default_model(default_model_dir):
    return load(default_model_dir)


def test_tokenize_shows_ids_pieces_and_bytes(default_model_dir, default_model, capsys):
    _, tokenizer, _ = default_model
    assert main(["tokenize", "Café 🙂", "--model", str(default_model_dir)]) == 0
    rows = [line.split(None, 2) for line in capsys.readouterr().out.splitlines()[1:-1]]
    assert [int(id_) for _, id_, _ in rows] == tokenizer.encode("Café 🙂")
    # the bytes column spells the text: the emoji's four bytes may be spread over tokens
    spelled = bytes.fromhex(" ".join(rest.split("'")[-1].strip() for _, _, rest in rows))
    assert spelled == "Café 🙂".encode()

    assert main(["tokenize", "Hi", "--chat", "--model", str(default_model_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]))
    assert "(special)" in out  # the template's markers are special tokens


def test_inspect_prints_the_lens_and_a_head(default_model_dir, default_model, capsys):
    model, tokenizer, _ = default_model
    ids = tokenizer.encode(TEXT)
    assert main(["inspect", TEXT, "--lens", "--at", "3", "--attention", "14:2", "--model", str(default_model_dir)]) == 0
    out = capsys.readouterr().out
    expected = inspection.inspect(model, ids, inspection.request(model.config, len(ids), [3], 3, [14], [2]))

    logprobs = re.findall(r"^\s+4\s+\d+\s+(-\d+\.\d+)\s+' is'$", out, re.M)
    assert logprobs and float(logprobs[0]) == pytest.approx(expected.logprobs[4], abs=1e-4)
    lens = out.split("logit lens at position 3 (' France', next ' is')")[1].split("\n\n")[0].splitlines()[2:]
    assert len(lens) == model.config.num_hidden_layers + 1
    for line, row in zip(lens, expected.lens[0]):
        layer, entropy, rank, logprob = line.split()[:4]
        assert (int(rank), float(logprob)) == (row.next_rank, pytest.approx(row.next_logprob, abs=1e-4))
    assert lens[-1].split()[2] == "1"  # the model itself ranks ' is' first after 'France'

    weights = out.split("attention of layer 14, head 2, at position 3")[1].strip().splitlines()[1:]
    assert [float(line.split()[-2] if line.rstrip().endswith("#") else line.split()[-1]) for line in weights] == \
        pytest.approx([float(w) for w in expected.attention[(14, 2)][0]], abs=1e-4)


def test_inspect_refuses_what_it_cannot_do(default_model_dir, capsys):
    assert main(["inspect", TEXT, "--attention", "14", "--model", str(default_model_dir)]) == 2
    assert "--attention takes LAYER:HEAD" in capsys.readouterr().err
    assert main(["inspect", TEXT, "--attention", "30:0", "--model", str(default_model_dir)]) == 2
    assert "this model has 30 layers, numbered 0 to 29" in capsys.readouterr().err
    assert main(["inspect", TEXT, "--at", "9", "--model", str(default_model_dir)]) == 2
    assert "position 9 is not in the prompt" in capsys.readouterr().err
