"""Our Tokenizer against Hugging Face's, built from the same GGUF file (golden/tokenizer_cases.json)."""

import json

import jinja2
import pytest

from conftest import load_golden
from refimpl.tokenizer import ChatTemplateError, Tokenizer

REGENERATE = "regenerate with `make golden` if the reference itself changed"


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def golden():
    return load_golden("tokenizer_cases.json")


def assert_same(ours, theirs, what):
    """Equal sequences, or a failure that shows the first differing position."""
    if ours == theirs:
        return
    pos = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    pytest.fail(
        f"{what}: first difference at position {pos} (ours {len(ours)} long, HF {len(theirs)} long)\n"
        f"  ours: {ours[pos:pos + 8]!r}\n  HF:   {theirs[pos:pos + 8]!r}\n{REGENERATE}"
    )


def test_golden_has_the_promised_coverage(golden):
    assert len(golden["cases"]) >= 25 and len(golden["chats"]) >= 6
    assert golden["made_by"]["command"] == "make golden"


def test_known_ids(tok):
    assert tok.encode("Hello world 12345") == [19556, 905, 216, 33, 34, 35, 36, 37]


def test_encode_matches_hf(tok, golden):
    for case in golden["cases"]:
        assert_same(tok.encode(case["text"]), case["ids"], f"encode({case['text']!r})")


def test_decode_matches_hf(tok, golden):
    for case in golden["cases"]:
        assert_same(tok.decode(case["ids"]), case["decoded"], f"decode of {case['text']!r}")
        assert_same(tok.decode(case["ids"], skip_special_tokens=True), case["decoded_skip_special"],
                    f"decode(skip_special_tokens=True) of {case['text']!r}")


def test_decode_inverts_encode(tok, golden):
    for case in golden["cases"]:
        assert_same(tok.decode(tok.encode(case["text"])), case["text"], f"round trip of {case['text']!r}")


def test_chat_text_and_ids_match_hf(tok, golden):
    for chat in golden["chats"]:
        text = tok.apply_chat_template(chat["messages"], add_generation_prompt=chat["add_generation_prompt"])
        assert_same(text, chat["text"], f"chat text of {chat['name']!r}")
        ids = tok.encode_chat(chat["messages"], add_generation_prompt=chat["add_generation_prompt"])
        assert_same(ids, chat["ids"], f"chat ids of {chat['name']!r}")


def test_default_system_prompt_and_generation_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    bare = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert bare.endswith("hi<|im_end|>\n")


def test_special_tokens_and_attributes(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, 49152)
    assert tok.special_ids == set(range(17))  # <|endoftext|> ... <empty_output>
    assert tok.encode("<|im_start|>user") == [1, 4093]  # matched whole, not cut into pieces
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"
    assert "<|im_start|>" in tok.chat_template


def make_tokenizer(tmp_path, default_model_dir, template):
    """A copy of the default tokenizer with another chat template (or none)."""
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if template is not None:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_bytes((default_model_dir / "tokenizer.json").read_bytes())
    return Tokenizer.from_dir(tmp_path)


def test_template_is_sandboxed(tmp_path, default_model_dir):
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    tok = make_tokenizer(tmp_path, default_model_dir, evil)
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_cannot_mutate_its_inputs(tmp_path, default_model_dir):
    tok = make_tokenizer(tmp_path, default_model_dir, "{{ messages.append(1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_raise_exception_surfaces_the_templates_message(tmp_path, default_model_dir):
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('Conversations must start with a user') }}{% endif %}ok")
    tok = make_tokenizer(tmp_path, default_model_dir, template)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="Conversations must start with a user"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_tojson_does_not_escape_html(tmp_path, default_model_dir):
    tok = make_tokenizer(tmp_path, default_model_dir, "{{ messages[0] | tojson }}")
    rendered = tok.apply_chat_template([{"role": "user", "content": "<b>é</b>"}])
    assert rendered == '{"role": "user", "content": "<b>é</b>"}'


def test_missing_chat_template_is_a_clear_error(tmp_path, default_model_dir):
    tok = make_tokenizer(tmp_path, default_model_dir, None)
    assert tok.chat_template is None
    assert tok.decode(tok.encode("hi")) == "hi"  # plain encoding still works
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])
