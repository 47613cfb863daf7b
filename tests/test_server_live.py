"""The real server process on the default model, driven by the official openai client and raw HTTP.

One server (gunicorn, as `refimpl serve` starts it) serves the whole module, with a short
KEEP_ALIVE_INTERVAL so that keep-alive comments show up during a prefill. Generations are kept
to a few tokens: the model decodes about 25 tokens a second on the development machine.
"""

import re
import time

import openai
import pytest
import requests

from conftest import GOLDEN, load_golden, steps_before_a_near_tie
from refimpl.explain import token_text
from refimpl.tokenizer import Tokenizer
from server_helpers import LiveServer, data_events, sse_events

SYSTEM = {"role": "system", "content": "You are a concise assistant."}
QUESTION = {"role": "user", "content": "What is the capital of France?"}


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    live = LiveServer(default_model_dir, env={"KEEP_ALIVE_INTERVAL": "100"}, log_path=tmp / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="EMPTY", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    assert client.models.retrieve("SmolLM2-135M-Instruct").id == "SmolLM2-135M-Instruct"
    assert models.data[0].architecture == "llama" and models.data[0].max_model_len == 8192  # the family, the context
    health = requests.get(f"{server.base}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": "SmolLM2-135M-Instruct"}


def test_chat_completion(client):
    before = int(time.time())
    completion = client.chat.completions.create(model="", messages=[SYSTEM, QUESTION], max_tokens=8, temperature=0)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert before <= completion.created <= time.time() + 1
    assert completion.model == "SmolLM2-135M-Instruct" and completion.system_fingerprint.startswith("refimpl-")
    (choice,) = completion.choices
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    usage = completion.usage
    assert usage.completion_tokens <= 8 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    extra = usage.model_extra
    for key in ("avg_tok_per_sec", "avg_prompt_tok_per_sec", "avg_compl_tok_per_sec"):
        assert extra[key] > 0, extra
    # Measured, not invented: the decode rate of a 135M model on a CPU is far below the prefill rate's bound.
    assert extra["avg_compl_tok_per_sec"] < 1000


def test_model_names(client):
    for name in ("", "default", "SmolLM2-135M-Instruct"):
        assert client.chat.completions.create(model=name, messages="Hi", max_tokens=1).choices
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="mistral", messages=[QUESTION], max_tokens=1)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_chat_stream_equals_non_streamed(client):
    request = dict(model="", messages=[SYSTEM, QUESTION], max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**request).choices[0].message.content
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0] is chunks[-2]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole


def test_completions_and_stream(client):
    request = dict(model="", prompt="The capital of France is", max_tokens=8, temperature=0)
    completion = client.completions.create(**request)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    text = completion.choices[0].text
    assert "Paris" in text and completion.usage.completion_tokens <= 8
    chunks = list(client.completions.create(**request, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks].count(None) == len(chunks) - 1


def test_chat_logprobs(client):
    completion = client.chat.completions.create(model="", messages=[QUESTION], max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=3)
    choice = completion.choices[0]
    content = choice.logprobs.content
    assert len(content) == completion.usage.completion_tokens - (choice.finish_reason == "stop")
    assert b"".join(bytes(t.bytes) for t in content).decode() == choice.message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob  # greedy
        assert entry.logprob <= 0


def test_completion_logprobs_with_echo(client):
    prompt = "The capital of France is"
    completion = client.completions.create(model="", prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    choice = completion.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(prompt)
    n_prompt = completion.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + completion.usage.completion_tokens  # an end-of-sequence token too
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == choice.text  # plain ASCII: every token's text is whole
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    # The prompt's scores are the model's: the greedy first generated token is the prompt's top choice there.
    assert lp.tokens[n_prompt] == max(lp.top_logprobs[n_prompt], key=lp.top_logprobs[n_prompt].get)


def test_echo_logprobs_list_a_generated_end_of_sequence_token(client):
    """lm-evaluation-harness scores a continuation by slicing token_logprobs[ctxlen:-1]: the generated
    token must be listed, EOS included (as vLLM lists it), or it scores the wrong tokens."""
    prompt = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2 + 2 = 4."  # greedy next: EOS
    completion = client.completions.create(model="", prompt=prompt, max_tokens=1, temperature=0, logprobs=2,
                                           echo=True)
    choice, n_prompt = completion.choices[0], completion.usage.prompt_tokens
    lp = choice.logprobs
    assert choice.finish_reason == "stop" and choice.text == prompt  # the EOS is not text
    assert len(lp.tokens) == len(lp.token_logprobs) == n_prompt + 1 == n_prompt + completion.usage.completion_tokens
    assert lp.tokens[-1] == "<|im_end|>" and lp.text_offset[-1] == len(prompt)
    assert "".join(lp.tokens[:-1]) == prompt  # special tokens by their markers, as the echoed text has them
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # greedy: the most likely token
    assert -1.5 < lp.token_logprobs[-1] < 0 and "<|im_end|>" in lp.top_logprobs[-1]


def worker_peak_memory(server):
    """Peak resident memory (bytes) of the server's worker process, the one holding the model."""
    worker = open(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read().split()[0]
    status = open(f"/proc/{worker}/status").read()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024


def test_echo_scoring_of_a_long_prompt_is_bounded_in_memory(client, server, tokenizer):
    """Scoring runs in the engine's prefill chunks: a 3,500-token echo holds [256, V] logits at a
    time, not [3500, V] (0.7 GB, and as much again for the log-probabilities)."""
    prompt = (GOLDEN / "long_prompt.txt").read_text() * 3
    assert len(tokenizer.encode(prompt)) > 3000
    before = worker_peak_memory(server)
    completion = client.completions.create(model="", prompt=prompt, max_tokens=1, temperature=0, logprobs=1,
                                           echo=True)
    assert len(completion.choices[0].logprobs.token_logprobs) > 3000
    assert worker_peak_memory(server) - before < 600 << 20


def test_n_and_seed(client):
    request = dict(model="", messages=[QUESTION], max_tokens=6, temperature=1.0, n=3, seed=1234)
    first = client.chat.completions.create(**request)
    again = client.chat.completions.create(**request)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    other = client.chat.completions.create(**{**request, "seed": 99})
    assert [c.message.content for c in other.choices] != [c.message.content for c in first.choices]
    streamed = {}
    for chunk in client.chat.completions.create(**request, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[i] for i in range(3)] == [c.message.content for c in first.choices]


def test_stop(client):
    request = dict(model="", prompt="One, two, three, four, five,", max_tokens=12, temperature=0)
    text = client.completions.create(**request).choices[0].text
    assert " seven" in text, text
    stopped = client.completions.create(**request, stop=[" seven", "never"]).choices[0]
    assert stopped.text == text[:text.index(" seven")] and stopped.finish_reason == "stop"
    streamed = list(client.completions.create(**request, stop=" seven", stream=True))
    assert "".join(c.choices[0].text for c in streamed) == stopped.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_several_prompts_as_token_ids(client, tokenizer):
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("One, two, three,")]
    both = client.completions.create(model="", prompt=prompts, max_tokens=3, temperature=0, n=2, logprobs=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        alone = client.completions.create(model="", prompt=prompt, max_tokens=3, temperature=0,
                                          logprobs=2).choices[0]
        # Four sequences in one batch and one alone differ in the last float32 bits: the same greedy
        # tokens, up to a near-tie.
        agree = steps_before_a_near_tie([sorted(top.values(), reverse=True)[:2]
                                         for top in alone.logprobs.top_logprobs])
        for choice in both.choices[2 * p:2 * p + 2]:
            assert choice.logprobs.tokens[:agree] == alone.logprobs.tokens[:agree]
            if agree == len(alone.logprobs.tokens):
                assert choice.text == alone.text
    assert both.usage.prompt_tokens == sum(map(len, prompts))


def test_bad_requests_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="", messages=[QUESTION], temperature=5, stream=True)
    assert err.value.status_code == 400 and err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="", prompt="x " * 9000, max_tokens=1)
    assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "prompt"


def test_greedy_equals_golden_tokens(client, tokenizer):
    """The server's greedy tokens are the golden ones transformers produced (up to its first end of sequence)."""
    golden = load_golden("smollm2-135m-instruct.json")
    for case in golden["cases"]:
        ids = case["greedy_ids"]
        expected = ids[:ids.index(2)] if 2 in ids else ids  # 2: <|im_end|>, the end-of-sequence token
        if case["kind"] == "raw":
            completion = client.completions.create(model="", prompt=case["input_ids"], max_tokens=len(ids),
                                                   temperature=0, logprobs=0)
            tokens = completion.choices[0].logprobs.tokens
            assert tokens == [token_text(tokenizer, i)[0] for i in expected], case["name"]
        else:
            completion = client.chat.completions.create(model="", messages=case["messages"], max_tokens=len(ids),
                                                        temperature=0, logprobs=True)
            content = completion.choices[0].logprobs.content
            assert [t.bytes for t in content] == [token_text(tokenizer, i)[1] for i in expected], case["name"]
        assert completion.usage.prompt_tokens == len(case["input_ids"]), case["name"]
        assert completion.usage.completion_tokens == min(len(expected) + 1, len(ids)), case["name"]
        assert completion.choices[0].finish_reason == ("stop" if 2 in ids else "length"), case["name"]


def test_sse_framing_and_keep_alive(server):
    """Raw SSE: data events, `: keep-alive` comments while a long prompt is read (interval 100 ms), [DONE]."""
    body = {"messages": [{"role": "user", "content": "Summarize: " + "the cat sat on the mat. " * 60}],
            "max_tokens": 3, "temperature": 0, "stream": True}
    response = requests.post(f"{server.base}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    blocks = sse_events(response)
    assert all(b == ": keep-alive" or re.fullmatch(r"data: .+", b) for b in blocks), blocks
    chunks, done = data_events(blocks)
    assert done and blocks[-1] == "data: [DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    first_content = next(i for i, b in enumerate(blocks) if b.startswith("data: ") and i > 0)
    assert ": keep-alive" in blocks[1:first_content], "no keep-alive while the prompt was read"


def test_overlapping_streams_interleave(client):
    """A stream started while another decodes runs beside it, not after it: it ends while the first
    still streams, with the tokens it gets alone (up to a near-tie: batched float32 differs in the last bits)."""
    request = dict(model="", messages="Count from one to ten.", max_tokens=10, temperature=0, logprobs=True,
                   top_logprobs=2)
    alone = client.chat.completions.create(**request).choices[0].logprobs.content
    # No max_tokens and no end of sequence: the first stream would run for minutes, so the second
    # ends within the client's timeout only if it is decoded alongside.
    first = client.chat.completions.create(model="", messages="Write a long story about a dragon.", temperature=0,
                                           logit_bias={"2": -100}, stream=True)
    with first:  # closing it cancels the first generation
        next(c for c in first if c.choices and c.choices[0].delta.content)  # the first is decoding
        second = [entry for chunk in client.chat.completions.create(**request, stream=True)
                  if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    agree = steps_before_a_near_tie([[top.logprob for top in entry.top_logprobs] for entry in alone])
    assert [entry.token for entry in second[:agree]] == [entry.token for entry in alone[:agree]]
    if agree == len(alone):
        assert [entry.token for entry in second] == [entry.token for entry in alone]


def test_client_going_away_stops_the_generation(server):
    # No max_tokens and no end of sequence: the reply cannot end by itself before the client leaves.
    body = {"messages": "Write a long story about a dragon.", "temperature": 0, "logit_bias": {"2": -100},
            "stream": True}
    with requests.post(f"{server.base}/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        lines = response.iter_lines()
        next(line for line in lines if b"content" in line and b"role" not in line)
        request_id = response.headers["X-Request-Id"]
    deadline = time.monotonic() + 30
    while f"{request_id} POST /v1/chat/completions 200" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    line = next(x for x in server.log().splitlines() if request_id in x)
    assert "finish_reason canceled" in line, line


def test_docs_are_served_locally(server):
    page = requests.get(f"{server.base}/docs", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "http://" not in page.text and "https://" not in page.text and "//cdn" not in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert len(assets) >= 3
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), asset
        assert requests.get(server.base + asset, timeout=10).status_code == 200, asset
    assert '"validatorUrl": null' in page.text
    spec = requests.get(f"{server.base}/openapi.json", timeout=10).json()
    assert requests.get(f"{server.base}/api-doc/openapi.json", timeout=10).json() == spec
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(spec["paths"])
