"""`refimpl score --input IN.jsonl --output OUT.jsonl`: a data set's log-probabilities (refimpl/scoring.py)."""

import json

import numpy as np

from refimpl.cli import main
from refimpl.generate import prompt_logprobs
from refimpl.models import load_model
from refimpl.scoring import score_file
from refimpl.tokenizer import Tokenizer

from conftest import load_golden

TOLERANCE = 1e-4  # as test_model_golden: max |Δ logprob| against transformers


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_mixed_set_matches_transformers(default_model_dir, tmp_path):
    """The golden prompts as text, messages and token ids (one of 1,230 tokens, scored in chunks),
    with bad lines among them: every position within 1e-4 of transformers, in input order."""
    golden = load_golden("smollm2-135m-instruct.json")["cases"]
    lines = []
    for i, case in enumerate(golden):
        if case["kind"] == "chat":
            lines.append({"id": case["name"], "messages": case["messages"]})
        elif i % 2:
            lines.append({"id": case["name"], "text": case["text"]})
        else:
            lines.append({"id": case["name"], "token_ids": case["input_ids"]})
    lines[3:3] = ["{not json", {"id": "no text"}, {"id": golden[0]["name"], "text": "the same id again"},
                  {"id": "bad ids", "token_ids": [1, 10 ** 9]}]
    write_lines(tmp_path / "in.jsonl", lines)
    model, tokenizer = load_model(default_model_dir), Tokenizer.from_dir(default_model_dir)
    reports = []
    counts = score_file(model, tokenizer, tmp_path / "in.jsonl", tmp_path / "out.jsonl", top=5,
                        report=reports.append, progress=False)
    assert counts == (len(golden), 0, 4)
    assert [r.split(": skipped")[0].rsplit(":", 1)[1] for r in reports] == ["4", "5", "6", "7"]
    assert "already on line 1" in reports[2] and "0..49151" in reports[3]

    out = read_lines(tmp_path / "out.jsonl")
    assert [o["id"] for o in out] == [c["name"] for c in golden]
    for o, case in zip(out, golden):
        # A conversation is scored as it stands; transformers' chat cases end with the generation prompt.
        T = len(o["token_ids"])
        assert o["token_ids"] == case["input_ids"][:T] and T >= len(case["input_ids"]) - 4
        assert len(o["tokens"]) == T and o["logprobs"][0] is None and o["top_logprobs"][0] is None
        np.testing.assert_allclose(o["logprobs"][1:], case["token_logprobs"][1:T], atol=TOLERANCE, rtol=0)
        ours_top = [[t["logprob"] for t in entry] for entry in o["top_logprobs"][1:]]
        # Position t's top 5 predict token t + 1: transformers' rows 0..T-2.
        np.testing.assert_allclose(ours_top, np.asarray(case["top_logprobs"])[:T - 1, :5], atol=TOLERANCE, rtol=0)


def test_resuming_changes_no_bit(tiny_chat_model, tmp_path):
    """A run stopped halfway and rerun writes each line once, and the file equals one run's."""
    model, tokenizer, _ = tiny_chat_model
    rng = np.random.default_rng(0)
    lines = [{"id": i, "token_ids": [int(t) for t in rng.integers(3, 300, n)]}
             for i, n in enumerate([5, 40, 1, 300, 17, 510, 9])]
    write_lines(tmp_path / "in.jsonl", lines)
    score_file(model, tokenizer, tmp_path / "in.jsonl", tmp_path / "whole.jsonl", top=2, progress=False)

    whole = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
    # Two lines done, the third cut short by a killed run: it is scored again.
    (tmp_path / "resumed.jsonl").write_text(whole[0] + whole[1] + whole[2][:20])
    assert score_file(model, tokenizer, tmp_path / "in.jsonl", tmp_path / "resumed.jsonl", top=2,
                      progress=False) == (5, 2, 0)
    assert (tmp_path / "resumed.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()

    # The same bits as `refimpl score TEXT` computes.
    entries = prompt_logprobs(model, tokenizer, lines[5]["token_ids"], 2)
    assert read_lines(tmp_path / "whole.jsonl")[5]["logprobs"] == [None] + [e.logprob for e in entries[1:]]


def test_the_command_line(tiny_chat_model_dir, tmp_path, capsys):
    write_lines(tmp_path / "in.jsonl", [{"id": "a", "text": "hello there"}, "[1, 2]"])
    assert main(["score", "--input", str(tmp_path / "in.jsonl"), "--model", str(tiny_chat_model_dir)]) == 2
    assert main(["score", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                 "--model", str(tiny_chat_model_dir)]) == 1  # one bad line
    err = capsys.readouterr().err
    assert "in.jsonl:2: skipped: not a JSON object" in err and "1 scored, 0 already in" in err
    assert [o["id"] for o in read_lines(tmp_path / "out.jsonl")] == ["a"]
