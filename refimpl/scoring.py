"""Scoring a data set: every token's log-probability given its prefix, for each line of a JSONL file.

Input, one JSON object a line:  {"id": ..., "text": "..."}  (tokenized as is, no special tokens added)
                                {"id": ..., "token_ids": [...]}
                                {"id": ..., "messages": [...]}  (rendered by the chat template)
Output, one line per input line, in input order:
    {"id", "token_ids", "tokens", "logprobs": [null, ...], "top_logprobs": [null, [{...}, ...], ...]}
(top_logprobs only with top > 0: the `top` most likely tokens at each position, as token_id,
token and logprob.)

- Resumable: ids already in the output file are skipped, and new lines are appended to it.
- A line that cannot be scored is reported with its line number and skipped, never dropped in
  silence; the counts are returned.
- Several short texts share each forward pass (up to BATCH_TOKENS tokens), a long one is scored
  in chunks; each text gets the bits it gets alone (refimpl/batching.py), so the output does not
  depend on how texts were grouped.
"""

import json
from dataclasses import dataclass

from tqdm import tqdm

from refimpl.explain import token_text
from refimpl.generate import SCORE_CHUNK, chunk_logprobs
from refimpl.models import forward

# Tokens of short texts scored in one forward pass: logits of 512 rows of a 49,152-token
# vocabulary take 100 MB.
BATCH_TOKENS = 512


class BadLine(ValueError):
    """An input line that cannot be scored, with the reason."""


@dataclass
class Item:
    line: int  # 1-based line number in the input file
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
    """The ids already scored in an existing output file (json-encoded, so that 1 and "1" differ)."""
    try:
        with open(output_path, encoding="utf-8") as f:
            return {json.dumps(json.loads(line)["id"]) for line in f if line.strip()}
    except FileNotFoundError:
        return set()


def score_items(model, tokenizer, items, top):
    """Entries (prompt_logprobs' form) for each item, several short ones per forward pass."""
    results = []
    group, tokens = [], 0
    for item in items + [None]:
        if item is not None and len(item.ids) <= BATCH_TOKENS and tokens + len(item.ids) <= BATCH_TOKENS:
            group.append(item)
            tokens += len(item.ids)
            continue
        if group:  # short texts, one pass for all of them
            caches = [model.new_cache(len(g.ids)) for g in group]
            logits = forward(model, [g.ids for g in group], caches, all_logits=True)  # [tokens, V]
            lo = 0
            for g in group:
                rows = logits[lo:lo + len(g.ids), ...]
                results.append([None] + chunk_logprobs(model.xp, tokenizer, rows, g.ids[1:], top))
                lo += len(g.ids)
        group, tokens = [], 0
        if item is None:
            break
        if len(item.ids) > BATCH_TOKENS:  # a long text alone, SCORE_CHUNK positions at a time
            cache, entries = model.new_cache(len(item.ids)), [None]
            for lo in range(0, len(item.ids), SCORE_CHUNK):
                chunk = item.ids[lo:lo + SCORE_CHUNK]
                logits = forward(model, [chunk], [cache], all_logits=True)
                entries += chunk_logprobs(model.xp, tokenizer, logits, item.ids[lo + 1:lo + len(chunk) + 1], top)
            results.append(entries)
        else:
            group, tokens = [item], len(item.ids)
    return results


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
    done, given = done_ids(output_path), {}
    vocab, context = model.config.vocab_size, model.config.max_position_embeddings
    items, bad, skipped = [], 0, 0
    with open(input_path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                id_, ids = parse_line(text, tokenizer, vocab, context)
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
            items.append(Item(number, id_, ids))
    bar = tqdm(total=sum(len(i.ids) for i in items), unit="tok", desc="score", disable=not progress)
    with open(output_path, "a", encoding="utf-8") as out:
        for lo in range(0, len(items), 64):  # written as they are done, so that a rerun resumes
            batch = items[lo:lo + 64]
            for item, entries in zip(batch, score_items(model, tokenizer, batch, top)):
                out.write(output_line(tokenizer, item, entries, top) + "\n")
                bar.update(len(item.ids))
            out.flush()
    bar.close()
    return len(items), skipped, bad
