"""Scoring a data set: every token's log-probability given its prefix, for each line of a JSONL file.

Input, one JSON object a line:  {"id": ..., "text": "..."}  (tokenized as is, no special tokens added)
                                {"id": ..., "token_ids": [...]}
                                {"id": ..., "messages": [...]}  (rendered by the chat template)
Output, one line per scored input line, in input order:
    {"id", "token_ids", "tokens", "logprobs": [null, ...], "top_logprobs": [null, [{...}, ...], ...]}
(top_logprobs only with top > 0: the `top` most likely tokens at each position, as token_id,
token and logprob.)

- Resumable: ids already in the output file are skipped, and new lines are appended to it.
- A line that cannot be scored is reported with its line number and skipped, never dropped in
  silence; the counts are returned.
- Each text is scored on its own, SCORE_CHUNK positions at a time (generate.prompt_logprobs,
  what `refimpl score TEXT` and the server's echo compute, to the bit). Letting several short
  texts share forward passes gives the same bits (refimpl/batching.py) but was slower here: 277
  against 318 tokens/s on 96 texts of 20-160 words, because a prompt's products already share
  each read of a weight between 32 rows (batching.TILE), and beyond that arithmetic, not memory,
  is the limit.
- With --ray, refimpl/scoring_ray.py hands the lines to Ray workers; the output is the same bytes.
"""

import json
from dataclasses import dataclass

from tqdm import tqdm

from refimpl.explain import token_text
from refimpl.generate import prompt_logprobs


class BadLine(ValueError):
    """An input line that cannot be scored, with the reason."""


@dataclass
class Item:
    id: object
    ids: list  # token ids


def parse_line(text, tokenizer, vocab_size, context):
    """The (id, token ids) of one input line; BadLine says what is wrong with it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadLine(f"not JSON: {error}") from None
    if not isinstance(obj, dict):
        raise BadLine("not a JSON object")
    if not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool):
        raise BadLine('"id" must be a string or an integer')
    given = [k for k in ("text", "token_ids", "messages") if k in obj]
    if len(given) != 1:
        raise BadLine('give exactly one of "text", "token_ids" and "messages"')
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise BadLine('"text" must be a string')
        ids = tokenizer.encode(obj["text"])
    elif "token_ids" in obj:
        ids = obj["token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise BadLine('"token_ids" must be a list of integers')
        if any(not 0 <= t < vocab_size for t in ids):
            raise BadLine(f'"token_ids" must lie in 0..{vocab_size - 1}')
    else:
        try:
            ids = tokenizer.encode_chat(obj["messages"], add_generation_prompt=False)
        except Exception as error:  # noqa: BLE001 - the template's complaint, whatever it is, is the reason
            raise BadLine(f'"messages" cannot be rendered: {error}') from None
    if not ids:
        raise BadLine("no tokens to score")
    if len(ids) > context:
        raise BadLine(f"{len(ids)} tokens are more than the model's context of {context}")
    return obj["id"], list(ids)


def done_ids(output_path):
    """The ids already scored in an existing output file (json-encoded, so that 1 and "1" differ).
    A last line cut short (the run was killed while writing it) is removed, to be scored again."""
    try:
        with open(output_path, "rb+") as f:
            data = f.read()
            data = data[:data.rfind(b"\n") + 1]
            f.truncate(len(data))
    except FileNotFoundError:
        return set()
    lines = data.decode("utf-8").splitlines()
    return {json.dumps(json.loads(line)["id"]) for line in lines if line.strip()}


def output_line(tokenizer, item, entries, top):
    line = {"id": item.id, "token_ids": item.ids, "tokens": [token_text(tokenizer, t)[0] for t in item.ids],
            "logprobs": [None if e is None else e.logprob for e in entries]}
    if top:
        line["top_logprobs"] = [None if e is None else [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob}
                                                        for t in e.top] for e in entries]
    return json.dumps(line, ensure_ascii=False)


def score_file(model, tokenizer, input_path, output_path, top=0, report=print, progress=True):
    """Score every line of input_path into output_path (see the module's docstring); returns
    (scored, skipped as already done, bad)."""
    items, skipped, bad = read_items(input_path, output_path, tokenizer, model.config, report)
    lines = ((k, output_line(tokenizer, item, prompt_logprobs(model, tokenizer, item.ids, top), top))
             for k, item in enumerate(items))
    write_in_order(output_path, items, lines, progress)
    return len(items), skipped, bad


def read_items(input_path, output_path, tokenizer, config, report):
    """The Items of input_path still to score, in order, and the counts of lines already scored in
    output_path and of bad lines (each reported with its number)."""
    done, given = done_ids(output_path), {}
    items, bad, skipped = [], 0, 0
    with open(input_path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                id_, ids = parse_line(text, tokenizer, config.vocab_size, config.max_position_embeddings)
            except BadLine as error:
                report(f"{input_path}:{number}: skipped: {error}")
                bad += 1
                continue
            key = json.dumps(id_)
            if key in given:
                report(f"{input_path}:{number}: skipped: id {key} is already on line {given[key]}")
                bad += 1
                continue
            given[key] = number
            if key in done:  # scored by an earlier run
                skipped += 1
                continue
            items.append(Item(id_, ids))
    return items, skipped, bad


def write_in_order(output_path, items, lines, progress=True):
    """Append the output lines, which come as (item number, line) in any order, in the items' order:
    each as soon as those before it are written, so that a rerun resumes after the last one."""
    bar = tqdm(total=sum(len(i.ids) for i in items), unit="tok", desc="score", disable=not progress)
    waiting, following = {}, 0
    with open(output_path, "a", encoding="utf-8") as out:
        for k, line in lines:
            waiting[k] = line
            bar.update(len(items[k].ids))
            while following in waiting:
                out.write(waiting.pop(following) + "\n")
                following += 1
            out.flush()
    bar.close()
