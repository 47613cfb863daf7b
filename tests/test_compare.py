"""refimpl compare: the verdict against a second refimpl server, against servers wrong in known ways
(tests/compare_doubles.py), and what it says when it cannot compare; how server tokens map to ids."""

import json
import subprocess
import time
from pathlib import Path

import pytest
import requests

from compare_doubles import Double, half_precision_copy
from refimpl.cli import main
from refimpl.compare import Vocabulary
from refimpl.generate import load
from server_helpers import LiveServer, free_port

PROMPTS = [
    {"name": "prose", "prompt": "The printing press changed Europe because"},
    {"name": "digits", "prompt": "The first digits of pi are 3.14159265358979, and 12345 + 67890 ="},
    {"name": "chat", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("compare") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def run_compare(capsys, tmp_path, server, *args):
    """(exit status, the --json report or None, stdout, stderr) of `refimpl compare`."""
    out = tmp_path / "report.json"
    status = main(["compare", "--server", server, "--json", str(out), *args])
    captured = capsys.readouterr()
    return status, json.loads(out.read_text()) if out.exists() else None, captured.out, captured.err


@pytest.fixture(scope="module")
def half_model_dir(default_model_dir, tmp_path_factory):
    return half_precision_copy(default_model_dir, tmp_path_factory.mktemp("half"))


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return load(default_model_dir)[1]


def test_a_second_refimpl_server_agrees_on_the_built_in_prompts(default_model_dir, tmp_path, capsys):
    server = LiveServer(default_model_dir, log_path=tmp_path / "server.log")
    try:
        status, report, out, err = run_compare(capsys, tmp_path, server.base, "--max-tokens", "16")
    finally:
        server.stop()
    assert status == 0, err
    assert report["verdict"] == "agree" and report["diagnosis"] is None
    assert report["max_abs_delta"] <= 1e-5
    assert report["top1_agreement"] == 1.0 and report["near_tie_disagreements"] == 0
    assert report["positions"] > 450  # the prompts (echo) and the generated tokens of all seven
    assert len(report["prompts"]) == 7 and all(p["positions"] > 0 for p in report["prompts"])
    assert {"prompt", "position", "token_id", "server_logprob", "reference_logprob"} <= report["worst"][0].keys()
    assert report["worst"][0]["abs_delta"] == report["max_abs_delta"]
    assert out.rstrip().endswith("verdict: agree")


def test_an_honest_engine_agrees(default_model_dir, prompts_file, tmp_path, capsys):
    double = Double(default_model_dir, "none")
    try:
        status, report, _, err = run_compare(capsys, tmp_path, double.base, "--prompts", str(prompts_file),
                                             "--max-tokens", "8")
    finally:
        double.stop()
    assert status == 0, err
    assert report["verdict"] == "agree" and report["top1_agreement"] == 1.0
    # Its generated rows were scored as a prompt's, refimpl's as generation's: float32 rounding apart.
    assert 0 < report["max_abs_delta"] <= 1e-4


@pytest.mark.parametrize("fault, name", [("shift", "shifted positions"), ("bos", "added BOS"),
                                         ("half", "lower precision")])
def test_a_wrong_engine_is_caught_and_named(fault, name, default_model_dir, half_model_dir, prompts_file, tmp_path,
                                            capsys):
    model_dir = half_model_dir if fault == "half" else default_model_dir
    double = Double(model_dir, fault)
    try:
        status, report, out, err = run_compare(capsys, tmp_path, double.base, "--prompts", str(prompts_file),
                                               "--max-tokens", "8")
    finally:
        double.stop()
    assert status == 1, err
    assert report["verdict"] == "differ" and report["max_abs_delta"] > report["tolerance"]
    assert report["diagnosis"]["name"] == name
    assert f"verdict: differ ({name}:" in out
    assert report["worst"] == sorted(report["worst"], key=lambda w: -w["abs_delta"])


def test_a_lower_precision_engine_agrees_within_a_looser_tolerance(half_model_dir, prompts_file, tmp_path, capsys):
    double = Double(half_model_dir, "half")
    try:
        status, report, _, _ = run_compare(capsys, tmp_path, double.base, "--prompts", str(prompts_file),
                                           "--max-tokens", "8", "--tolerance", "0.5")
    finally:
        double.stop()
    assert status == 0 and report["verdict"] == "agree" and report["tolerance"] == 0.5


@pytest.mark.parametrize("fault, reason", [("no-logprobs", "no log-probabilities"),
                                           ("retokenize", "tokenized the prompt otherwise")])
def test_what_cannot_be_compared_exits_2_with_the_reason(fault, reason, default_model_dir, prompts_file, tmp_path,
                                                          capsys):
    double = Double(default_model_dir, fault)
    try:
        status, report, _, err = run_compare(capsys, tmp_path, double.base, "--prompts", str(prompts_file))
    finally:
        double.stop()
    assert status == 2 and report is None
    assert err.startswith("refimpl compare: cannot compare: ") and reason in err and err.count("\n") == 1


def test_an_unreachable_server_exits_2(tmp_path, capsys):
    status, report, _, err = run_compare(capsys, tmp_path, f"http://127.0.0.1:{free_port()}/v1")
    assert status == 2 and report is None and "cannot reach" in err


@pytest.mark.parametrize("line", ['{"prompt": ""}', '{"prompt": "a", "messages": []}', "[1, 2]", "{not json"])
def test_a_bad_prompts_file_exits_2_naming_the_line(line, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    status, _, _, err = run_compare(capsys, tmp_path, f"http://127.0.0.1:{free_port()}", "--prompts", str(path))
    assert status == 2 and f"{path}:2:" in err


# --- server tokens -> ids -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vocab(tokenizer):
    return Vocabulary(tokenizer, 49152)


def test_tokens_map_by_their_bytes_markers_or_ids(tokenizer, vocab):
    the = tokenizer.encode(" the")
    assert len(the) == 1
    assert vocab.id_of(" the") == the[0]
    assert vocab.id_of("token_id:4321") == 4321  # vLLM's --return-tokens-as-token-ids
    assert vocab.id_of("<|im_end|>") == 2  # a special token by its marker
    smile = tokenizer.encode("🙂")  # two tokens, each half of the character's four bytes
    assert len(smile) == 2
    first = tokenizer.token_bytes(smile[0])
    assert vocab.id_of("\ufffd", list(first)) == smile[0]  # chat's bytes decide
    assert vocab.id_of("bytes:" + "".join(f"\\x{b:02x}" for b in first)) == smile[0]  # vLLM's spelling
    assert vocab.id_of("\ufffd") is None and vocab.id_of("") is None  # lossy: not told by the text alone
    assert vocab.id_of("no such token in any vocabulary, surely") is None


def test_generated_tokens_are_told_by_the_text_they_spell(tokenizer, vocab):
    from refimpl.compare import ServerToken

    text = "Hi 🙂🚀!"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    # As llama-cpp-python reports tokens: partial characters dropped ("").
    dropped = [ServerToken(p.decode("utf-8", errors="ignore"), None, -1.0, []) for p in pieces]
    assert "" in [t.text for t in dropped]
    assert vocab.spell(dropped, text.encode()) == (ids, None)
    # Dropping can leave several fits: " 日" is " \xe6\x97" + "\xa5" and " \xe6" + "\x97\xa5" alike,
    # both read " " then "". Compared up to there, and the report says why.
    cut = tokenizer.encode("Hi 日本")
    cut_dropped = [ServerToken(tokenizer.token_bytes(i).decode("utf-8", errors="ignore"), None, -1.0, []) for i in cut]
    mapped, why = vocab.spell(cut_dropped, "Hi 日本".encode())
    assert mapped == cut[:1] and "several token sequences fit" in why
    # As OpenAI and refimpl report them: U+FFFD for a partial character.
    replaced = [ServerToken(p.decode("utf-8", errors="replace"), None, -1.0, []) for p in pieces]
    assert vocab.spell(replaced, text.encode()) == (ids, None)
    # With their bytes (chat), and a special token at the end, which adds nothing to the text.
    exact = [ServerToken("x", list(p), -1.0, []) for p in pieces] + [ServerToken("<|im_end|>", None, -1.0, [])]
    assert vocab.spell(exact, text.encode()) == (ids + [2], None)
    # Tokens that do not spell their text: compared as far as they can be told, with the reason.
    mapped, why = vocab.spell(replaced, b"Hi ")
    assert mapped == ids[:1] and "cannot be mapped" in why


def test_an_echoed_token_is_checked_against_the_known_id(tokenizer, vocab):
    from refimpl.compare import ServerToken

    half = tokenizer.encode("🙂")[0]
    assert vocab.renders(ServerToken("\ufffd", None, -1.0, []), half)
    assert vocab.renders(ServerToken("", None, -1.0, []), half)
    assert not vocab.renders(ServerToken(" the", None, -1.0, []), half)
    assert vocab.renders(ServerToken("<|im_start|>", None, -1.0, []), 1)


LLAMACPP_PYTHON = Path(__file__).resolve().parent.parent / ".venv-llamacpp" / "bin" / "python"


@pytest.mark.skipif(not LLAMACPP_PYTHON.exists(), reason="llama-cpp-python is not built here (make compare-llamacpp "
                                                          "builds it, ~10 min): the real peer case is skipped")
def test_llama_cpp_on_the_4_bit_file_is_named_for_what_it_is(default_model_dir, prompts_file, tmp_path, capsys):
    from refimpl.pull import fetch_gguf

    port = free_port()
    server = subprocess.Popen([LLAMACPP_PYTHON, "-m", "llama_cpp.server", "--model", str(fetch_gguf()), "--host",
                               "127.0.0.1", "--port", str(port), "--n_threads", "2", "--n_ctx", "2048"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                requests.get(f"{base}/models", timeout=5).raise_for_status()
                break
            except requests.RequestException:
                assert server.poll() is None and time.monotonic() < deadline, "llama.cpp's server did not start"
                time.sleep(0.5)
        # With echo, llama-cpp-python reports each log-probability one position late.
        status, report, _, err = run_compare(capsys, tmp_path, base, "--prompts", str(prompts_file))
        assert status == 1 and report["diagnosis"]["name"] == "shifted positions", err
        # Without it, the values line up, moved by the 4-bit weights.
        status, report, _, err = run_compare(capsys, tmp_path, base, "--prompts", str(prompts_file), "--no-echo")
        assert status == 1 and report["diagnosis"]["name"] == "lower precision", err
        assert 0.01 < report["mean_abs_delta"] < 0.2
    finally:
        server.terminate()
        server.wait()
