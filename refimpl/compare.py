"""Oracle mode: does another engine compute the same model? Its log-probabilities against refimpl's.

`refimpl compare --server URL` sends prompts to an OpenAI-compatible server (vLLM, llama.cpp's
server, mistral.rs, TGI, another refimpl) and reads back the log-probability of every token it
reports: the prompt's, where the server echoes it (/v1/completions with echo), and the tokens it
generated. Then refimpl's float32 forward pass scores the same token ids, teacher-forced: the
server's own tokens, never refimpl's, so a difference early on does not derail the rest.

From server tokens to ids, exactly
----------------------------------
A server reports tokens as text (and, in chat, as bytes), not ids. Re-tokenizing the text would
hide the very bugs this looks for, so ids are read off what the server reported: a token's bytes
(chat's `bytes`, "bytes:\\xe2\\x80" as vLLM spells a partial character, those of "token_id:N", or
the UTF-8 of its text) name the one vocabulary token with exactly those bytes, and a special
token's marker ("<|im_end|>") names it. A token that holds part of a character is often reported
lossily (U+FFFD, or "" where a server drops the bytes). So the generated tokens are read together
with the text they came with (Vocabulary.spell): their ids must spell it byte for byte, each
rendering as the server reported it; when exactly one sequence of ids fits, those are the ids.
Where none or several fit, the prompt is compared up to the first token that cannot be told, and
the report says where and why.

The prompt goes as token ids, or as text to a server that takes none; either way its echo must
give back refimpl's tokens, else the comparison stops (exit 2).

What is reported
----------------
Per prompt and overall: max and mean |Δ| of the chosen tokens' log-probabilities; top-1 agreement
(the server's most likely token, from its top_logprobs, against refimpl's); the mean overlap of
the two top-k sets; KL(refimpl || server) over the tokens both top-k lists hold, each renormalized
there (an estimate: the mass outside is not seen); the first position where greedy text would part;
and the worst positions, with the tokens before them. A position where refimpl's top two tokens
lie within 2 x tolerance is a near-tie: a server within tolerance may rank either first, so it is
counted apart, not as a disagreement of the model.

Verdict: "agree" when every chosen token is within the tolerance, else "differ", with a diagnosis
tried in order, each by recomputing what the server would report if it had that bug:
  - "shifted positions": the server's log-probability at t is refimpl's at t + 1 (or t - 1);
  - "added BOS": the server put a BOS token before the prompt (shown in the echo or not);
  - "lower precision": the ranking is kept (top-1 agreement at least 90% outside near-ties) while
    the values move: reduced precision or quantized weights;
  - "unexplained" otherwise.
"""

import codecs
import json
import statistics
from dataclasses import dataclass, field

import numpy as np
import requests

from refimpl.explain import token_text
from refimpl.generate import logprob_rows

DEFAULT_TOLERANCE = 1e-3
SHOWN_CONTEXT = 8  # tokens shown before each of the worst positions
WORST = 10

_LONG = ("The river rose in the hills and ran west through farmland, past three mills and a chapel, "
         "until it met the sea at a town that had grown up around its harbour. Fishermen mended nets on "
         "the quay each morning, and the market sold what they brought in before noon. ")
BUILTIN_PROMPTS = [
    {"name": "prose", "prompt": "The printing press changed Europe because"},
    {"name": "code", "prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n"},
    {"name": "digits", "prompt": "The first digits of pi are 3.14159265358979, and 12345 + 67890 ="},
    {"name": "unicode", "prompt": "Café, naïve, Straße, 日本語, Привет, 🙂🚀: greetings in many scripts:"},
    {"name": "long context", "prompt": _LONG * 6 + "Every morning, the fishermen"},
    {"name": "chat", "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]},
    {"name": "chat, turns", "messages": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7."},
        {"role": "user", "content": "And one larger than 100?"}]},
]
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "stop", "presence_penalty",
                   "frequency_penalty", "repetition_penalty")


class CannotCompare(Exception):
    """Exit status 2: the comparison could not be made; the message says why in one line."""


# --- the server -----------------------------------------------------------------------------------

@dataclass
class ServerToken:
    text: str
    bytes: bytes | None  # chat's `bytes`, when given
    logprob: float | None
    top: list  # [(text, bytes | None, logprob)], the server's most likely tokens at this position


@dataclass
class ServerAnswer:
    prompt_ids: list  # refimpl's ids of the prompt, as sent
    echo: list  # ServerToken per prompt token (first entry's logprob None); [] without echo
    generated: list  # ServerToken per generated token
    generated_text: str  # the text of the generated tokens, which they must spell
    notes: list = field(default_factory=list)


class Server:
    def __init__(self, url, api_key=None, model=None, timeout=600):
        self.base = url.rstrip("/")
        self.base = self.base if self.base.endswith("/v1") else self.base + "/v1"
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.model = model or self.first_model()

    def first_model(self):
        models = self.call("GET", "/models").get("data") or []
        if not models:
            raise CannotCompare(f"{self.base}/models lists no model: name one with --server-model")
        return models[0]["id"]

    def call(self, method, path, body=None):
        try:
            response = self.session.request(method, self.base + path, json=body, timeout=self.timeout)
        except requests.RequestException as error:
            raise CannotCompare(f"cannot reach {self.base}{path}: {error}") from None
        if response.status_code != 200:
            raise ServerError(response.status_code, f"{path} answered {response.status_code}: {response.text[:300]}")
        try:
            return response.json()
        except ValueError:
            raise CannotCompare(f"{path} answered with something that is not JSON: {response.text[:200]!r}") from None


class ServerError(CannotCompare):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def ask(server, tokenizer, spec, top, max_tokens, echo=True):
    """Send one prompt spec ({"prompt": text | ids} or {"messages"}, plus sampling fields) and read
    the server's tokens and log-probabilities (of the prompt too, with echo, where the server can)."""
    sampling = {"temperature": 0.0, "max_tokens": max_tokens} | {k: spec[k] for k in SAMPLING_FIELDS if k in spec}
    if "messages" in spec:
        return ask_chat(server, tokenizer, spec["messages"], top, sampling)
    prompt = spec["prompt"]
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
    # The prompt goes as token ids, with echo. A server that refuses ids gets the text (its echo
    # must then give refimpl's tokens back); one that refuses echo, the generated tokens alone.
    attempts = [(ids, True, []), (text, True, ["the server takes no token ids: the prompt went as text"]),
                (ids, False, ["the server does not echo the prompt: generated tokens only"]),
                (text, False, ["the server takes neither token ids nor echo: text, generated tokens only"])]
    if not echo:
        attempts = [(ids, False, []), (text, False, ["the server takes no token ids: the prompt went as text"])]
    errors = []
    for sent, echo, notes in attempts:
        try:
            out = server.call("POST", "/completions", {"model": server.model, "prompt": sent, "logprobs": top,
                                                       "echo": echo, **sampling})
            break
        except ServerError as error:
            errors.append(error)
    else:
        raise errors[0]
    choice = out["choices"][0]
    lp = choice.get("logprobs") or {}
    if not lp.get("token_logprobs"):
        raise CannotCompare("the server returned no log-probabilities (/v1/completions with logprobs)")
    tokens = [ServerToken(text, None, logprob, [(t, None, v) for t, v in (tops or {}).items()])
              for text, logprob, tops in zip(lp["tokens"], lp["token_logprobs"], lp.get("top_logprobs") or
                                             [None] * len(lp["tokens"]))]
    prompt_tokens = (out.get("usage") or {}).get("prompt_tokens", len(ids))
    if not echo and prompt_tokens != len(ids):
        raise CannotCompare(f"the server tokenized a prompt otherwise ({prompt_tokens} tokens, refimpl {len(ids)})")
    echoed = prompt_tokens if echo else 0
    text, offsets = choice.get("text") or "", lp.get("text_offset") or []
    if echo and echoed < len(offsets):  # the generated text starts where the first generated token does
        text = text[offsets[echoed]:]
    elif echo:  # or, without offsets, after the prompt's text
        prompt_text = sent if isinstance(sent, str) else tokenizer.decode(ids)
        text = text[len(prompt_text):] if text.startswith(prompt_text) else text
    return ServerAnswer(ids, tokens[:echoed], tokens[echoed:], text, notes)


def ask_chat(server, tokenizer, messages, top, sampling):
    ids = tokenizer.encode_chat(messages)
    out = server.call("POST", "/chat/completions", {"model": server.model, "messages": messages, "logprobs": True,
                                                    "top_logprobs": top, **sampling})
    content = ((out["choices"][0].get("logprobs") or {}).get("content")) or []
    if not content:
        raise CannotCompare("the server returned no log-probabilities (/v1/chat/completions with logprobs)")
    tokens = [ServerToken(c["token"], bytes(c["bytes"]) if c.get("bytes") is not None else None, c["logprob"],
                          [(t["token"], bytes(t["bytes"]) if t.get("bytes") is not None else None, t["logprob"])
                           for t in c.get("top_logprobs") or []]) for c in content]
    answer = ServerAnswer(ids, [], tokens, out["choices"][0]["message"].get("content") or "")
    server_length = (out.get("usage") or {}).get("prompt_tokens")
    if server_length is not None and server_length != len(ids):
        if server_length != len(ids) + 1:
            raise CannotCompare(f"the server's chat prompt has {server_length} tokens, refimpl's template renders "
                                f"{len(ids)}: the chat templates differ (compare raw prompts instead)")
        answer.notes.append("the server's chat prompt has one token more than refimpl's")
    return answer


# --- server tokens -> ids -------------------------------------------------------------------------

class Vocabulary:
    """Maps a token as a server reports it back to its id (see the module's docstring)."""

    def __init__(self, tokenizer, vocab_size):
        self.tokenizer = tokenizer
        self.by_marker = {tokenizer.decode([i]): i for i in tokenizer.special_ids}
        self.by_bytes, ambiguous = {}, set()
        for i in range(vocab_size):
            raw = tokenizer.token_bytes(i)
            if raw and i not in tokenizer.special_ids:
                if raw in self.by_bytes:
                    ambiguous.add(raw)
                self.by_bytes.setdefault(raw, i)
        for raw in ambiguous:
            del self.by_bytes[raw]
        self.longest = max(map(len, self.by_bytes))

    def id_of(self, text, raw=None):
        """The id of one reported token, or None when it cannot be told from what was reported."""
        if text.startswith("token_id:") and text[9:].isdigit():
            return int(text[9:])
        if text in self.by_marker:
            return self.by_marker[text]
        exact = self.reported_bytes(ServerToken(text, raw, None, []))
        if exact is None:
            if not text or "\ufffd" in text or text.startswith("bytes:"):  # lossy, or bytes that do not parse
                return None
            exact = text.encode("utf-8")
        return self.by_bytes.get(exact)

    def reported_bytes(self, token):
        """The bytes a reported token stands for, when it says them exactly; else None."""
        if token.bytes is not None and token.text not in self.by_marker:
            return bytes(token.bytes)
        if token.text.startswith("token_id:") and token.text[9:].isdigit():
            return self.tokenizer.token_bytes(int(token.text[9:]))
        if token.text.startswith("bytes:"):
            try:
                return codecs.escape_decode(token.text[6:])[0]
            except ValueError:
                return None
        return None

    def candidates(self, token, raw, at):
        """(id, length): the tokens that could be this reported one, starting at byte `at` of raw."""
        if token.text in self.by_marker:  # a special token: its marker in the text, or nothing
            marker = token.text.encode()
            yield self.by_marker[token.text], 0
            if raw.startswith(marker, at):
                yield self.by_marker[token.text], len(marker)
            return
        exact = self.reported_bytes(token)
        for end in range(at + 1, min(len(raw), at + self.longest) + 1):
            piece = raw[at:end]
            if (i := self.by_bytes.get(piece)) is None:
                continue
            if piece == exact or exact is None and token.text in (piece.decode("utf-8", errors="replace"),
                                                                  piece.decode("utf-8", errors="ignore")):
                yield i, end - at

    def spell(self, tokens, raw):
        """Ids of reported tokens that together spell the bytes `raw` (the text they came with):
        each id's bytes come next in raw and render as the server reported the token (exactly, or
        with a partial character as U+FFFD or dropped). Returns (ids, reason): all the ids when
        exactly one sequence fits; else the leading ids that every fitting sequence shares, and why
        the rest cannot be told."""
        states = {0: Paths(1, [])}  # byte offset reached -> the id sequences that reach it
        for k, token in enumerate(tokens):
            following = {}
            for at, paths in states.items():
                for i, length in self.candidates(token, raw, at):
                    following[at + length] = paths.then(i).joined(following.get(at + length))
            if not following:
                return common_prefix(states.values()), (f"token {token.text!r} (generated token {k}) "
                                                         "cannot be mapped to an id of this model")
            states = following
        if (end := states.get(len(raw))) is not None and end.count == 1:
            return end.sure, None
        reason = "several token sequences fit" if end else "the tokens do not spell the text they came with"
        sure = common_prefix([end] if end else states.values())
        return sure, f"generated tokens from {len(sure)} on cannot be told apart: {reason}"

    def renders(self, token, token_id):
        """Whether a reported token can be `token_id` (an echoed prompt token, whose id is known)."""
        raw = self.tokenizer.token_bytes(token_id)
        exact = self.reported_bytes(token)
        if token_id in self.tokenizer.special_ids:
            return self.by_marker.get(token.text) == token_id
        if exact is not None:
            return exact == raw
        return token.text in (raw.decode("utf-8", errors="replace"), raw.decode("utf-8", errors="ignore"))


@dataclass
class Paths:
    """The id sequences that reach one place in Vocabulary.spell: how many (1, or 2 for several)
    and the ids they all begin with (all of them when there is one)."""
    count: int
    sure: list

    def then(self, token_id):
        return Paths(self.count, self.sure + [token_id] if self.count == 1 else self.sure)

    def joined(self, other):
        return self if other is None else Paths(2, common_prefix([self, other]))


def common_prefix(paths):
    paths = list(paths)
    out = paths[0].sure
    for p in paths[1:]:
        n = next((k for k, (a, b) in enumerate(zip(out, p.sure)) if a != b), min(len(out), len(p.sure)))
        out = out[:n]
    return out


# --- comparing ------------------------------------------------------------------------------------

@dataclass
class Position:
    prompt: int
    position: int  # in the prompt + generated sequence; the token predicted from those before it
    token_id: int
    server: float
    reference: float
    near_tie: bool
    server_top1: int | None
    reference_top1: int
    overlap: float | None  # |server top-k & refimpl top-k| / k
    kl: float | None

    @property
    def delta(self):
        return abs(self.server - self.reference)


@dataclass
class PromptResult:
    index: int
    name: str
    ids: list  # the sequence scored: prompt, then the server's generated tokens
    positions: list  # Position
    listed: dict  # position -> {token id: the server's log-probability}: its token and its top list
    near: dict  # position -> {token id: refimpl's log-probability} for every id listed at t - 1, t and t + 1
    notes: list


def compare_prompt(model, tokenizer, vocab, index, name, answer, top, tolerance):
    """Score the server's sequence with refimpl and line up every position the server reported."""
    notes = list(answer.notes)
    reported = []  # (position, ServerToken)
    ids = list(answer.prompt_ids)
    echo = answer.echo
    if echo and len(echo) == len(ids) + 1 and vocab.renders(echo[0], tokenizer.bos_token_id):
        notes.append(f"the server's echo begins with a BOS token ({echo[0].text!r}) refimpl was not given")
        echo = echo[1:]
    if echo:
        differ = [t for t, (mine, theirs) in enumerate(zip(ids, echo)) if not vocab.renders(theirs, mine)]
        if differ or len(echo) != len(ids):
            t = differ[0] if differ else min(len(ids), len(echo))
            theirs = repr(echo[t].text) if t < len(echo) else "nothing"
            mine = repr(token_text(tokenizer, ids[t])[0]) if t < len(ids) else "nothing"
            raise CannotCompare(f"prompt {index} ({name}): the server tokenized the prompt otherwise "
                                f"({len(echo)} tokens, refimpl {len(ids)}; token {t}: {theirs}, refimpl {mine})")
        reported += [(t, tok) for t, tok in enumerate(echo) if t > 0 and tok.logprob is not None]
    generated, why = vocab.spell(answer.generated, answer.generated_text.encode("utf-8"))
    if why:
        notes.append(f"compared up to generated token {len(generated)}: {why}")
    reported += [(len(ids) + k, tok) for k, tok in enumerate(answer.generated[:len(generated)])
                 if tok.logprob is not None]
    ids += generated
    wanted = dict(reported)
    listed = {t: listing(vocab, ids[t], tok) for t, tok in reported}
    positions, near = [], {}
    for lo, rows in logprob_rows(model, ids[:-1], len(answer.prompt_ids)):
        for t, row in enumerate(rows, start=lo + 1):
            if t in wanted:
                positions.append(line_up(vocab, index, t, ids[t], wanted[t], row, top, tolerance))
            around = set().union(*(listed.get(u, ()) for u in (t - 1, t, t + 1)))
            near[t] = {i: float(row[i]) for i in around}
    return PromptResult(index, name, ids, positions, listed, near, notes)


def listing(vocab, token_id, theirs):
    """{id: the server's log-probability} of a position's token and of the top tokens it lists."""
    out = {vocab.id_of(text, raw): value for text, raw, value in theirs.top}
    out.pop(None, None)
    return out | {token_id: theirs.logprob}


def line_up(vocab, index, t, token_id, theirs, row, top, tolerance):
    """One position: the server's token and values beside refimpl's row of log-probabilities."""
    order = np.argsort(-row, kind="stable")[:max(top, 2)]
    server_top = {vocab.id_of(text, raw): value for text, raw, value in theirs.top}
    # The server's most likely token, unless it cannot be told: legacy top_logprobs are keyed by
    # text, so tokens holding parts of characters ("\ufffd") may have merged into one entry.
    complete = None not in server_top and len(server_top) == top  # every listed token known, none merged
    best = max(theirs.top, key=lambda entry: entry[2], default=None)
    server_top1 = None if best is None else vocab.id_of(best[0], best[1])
    if None in server_top and len(theirs.top) < top:
        server_top1 = None
    server_top.pop(None, None)
    overlap = kl = None
    if server_top and top:
        shared = [int(i) for i in order[:top] if int(i) in server_top]
        overlap = len(shared) / top if complete else None
        if shared:
            p = row[shared] - np.logaddexp.reduce(row[shared])  # both renormalized over the shared tokens
            q = np.array([server_top[i] for i in shared])
            q = q - np.logaddexp.reduce(q)
            kl = max(0.0, float(np.sum(np.exp(p) * (p - q))))  # >= 0 but for rounding
    return Position(index, t, token_id, float(theirs.logprob), float(row[token_id]),
                    near_tie=float(row[order[0]] - row[order[1]]) <= 2 * tolerance,
                    server_top1=server_top1,
                    reference_top1=int(order[0]), overlap=overlap, kl=kl)


def summarize(positions):
    deltas = [p.delta for p in positions]
    clear = [p for p in positions if not p.near_tie and p.server_top1 is not None]
    ties = [p for p in positions if p.near_tie and p.server_top1 is not None]
    overlaps = [p.overlap for p in positions if p.overlap is not None]
    kls = [p.kl for p in positions if p.kl is not None]
    return {
        "positions": len(positions),
        "max_abs_delta": max(deltas, default=0.0),
        "mean_abs_delta": statistics.fmean(deltas) if deltas else 0.0,
        "top1_agreement": (sum(p.server_top1 == p.reference_top1 for p in clear) / len(clear)) if clear else None,
        "near_ties": len(ties),
        "near_tie_disagreements": sum(p.server_top1 != p.reference_top1 for p in ties),
        "topk_overlap": statistics.fmean(overlaps) if overlaps else None,
        "kl_topk_mean": statistics.fmean(kls) if kls else None,
        "kl_topk_max": max(kls) if kls else None,
    }


def first_divergence(tokenizer, results):
    for result in results:
        for p in result.positions:
            if p.server_top1 is not None and p.server_top1 != p.reference_top1:
                return {"prompt": p.prompt, "position": p.position, "near_tie": p.near_tie,
                        "server_token": token_text(tokenizer, p.server_top1)[0],
                        "reference_token": token_text(tokenizer, p.reference_top1)[0]}
    return None


def worst(tokenizer, results, count=WORST):
    ids_of = {r.index: r.ids for r in results}
    every = sorted((p for r in results for p in r.positions), key=lambda p: -p.delta)[:count]
    return [{"prompt": p.prompt, "position": p.position, "token_id": p.token_id,
             "token": token_text(tokenizer, p.token_id)[0], "server_logprob": p.server,
             "reference_logprob": p.reference, "abs_delta": p.delta,
             "context": [token_text(tokenizer, i)[0] for i in ids_of[p.prompt][max(0, p.position - SHOWN_CONTEXT):p.position]]}
            for p in every]


def diagnose(model, tokenizer, results, overall, tolerance):
    """Name the likeliest cause of a difference: each known bug is a way to line the server's values
    up with refimpl's (one position on, after a BOS), and it explains the difference when the values
    then agree: their median |Δ|, over every token the server listed, is within the tolerance or a
    quarter of what it is as reported (what remains is then lower precision besides)."""
    def median_delta(lookup):
        deltas, pairs = [], 0
        for r in results:
            for t, listed in r.listed.items():
                reference = lookup(r, t) or {}
                pairs += len(listed)
                deltas += [abs(v - reference[i]) for i, v in listed.items() if i in reference]
        return statistics.median(deltas) if deltas and len(deltas) >= pairs / 2 else None

    as_reported = median_delta(lambda r, t: r.near.get(t))

    def explains(lookup):
        delta = median_delta(lookup)
        return delta is not None and (delta <= tolerance or as_reported is not None and delta <= as_reported / 4)

    for shift in (1, -1):
        if explains(lambda r, t: r.near.get(t + shift)):
            return {"name": "shifted positions", "detail": "the server's log-probabilities at position t are "
                    f"refimpl's at t {'+' if shift > 0 else '-'} 1"}
    bos = tokenizer.bos_token_id
    if bos is not None:
        with_bos = {}  # (prompt, position) -> refimpl's values after a BOS, for the ids the server listed
        for r in results:
            sequence = [bos, *r.ids]
            for lo, rows in logprob_rows(model, sequence[:-1]):
                for t, row in enumerate(rows, start=lo):  # row predicts sequence[t + 1], the server's token t
                    with_bos[r.index, t] = {i: float(row[i]) for i in r.listed.get(t, ())}
        if explains(lambda r, t: with_bos.get((r.index, t))):
            return {"name": "added BOS", "detail": f"the server scored the prompt after a BOS token "
                                                   f"({token_text(tokenizer, bos)[0]!r}, id {bos}) it was not given"}
    if overall["top1_agreement"] is not None and overall["top1_agreement"] >= 0.9:
        return {"name": "lower precision", "detail": f"the ranking is kept (top-1 agreement "
                f"{overall['top1_agreement']:.1%}) while log-probabilities move by {overall['mean_abs_delta']:.2g} "
                "on average: reduced precision or quantized weights"}
    return {"name": "unexplained", "detail": "see the worst positions"}


def compare(model, tokenizer, server, specs, top=5, max_tokens=32, tolerance=DEFAULT_TOLERANCE, echo=True, log=print):
    """The report (a dict, written as --json) of comparing `server` with refimpl on `specs`."""
    vocab = Vocabulary(tokenizer, model.config.vocab_size)
    results = []
    for index, spec in enumerate(specs):
        name = spec.get("name") or f"prompt {index}"
        answer = ask(server, tokenizer, spec, top, max_tokens, echo)
        result = compare_prompt(model, tokenizer, vocab, index, name, answer, top, tolerance)
        results.append(result)
        s = summarize(result.positions)
        log(f"[{index}] {name}: {s['positions']} positions, max |Δ| {s['max_abs_delta']:.3g}, "
            f"mean |Δ| {s['mean_abs_delta']:.3g}" + "".join(f"; {n}" for n in result.notes))
    positions = [p for r in results for p in r.positions]
    if not positions:
        raise CannotCompare("no position could be compared: " + "; ".join(n for r in results for n in r.notes))
    overall = summarize(positions)
    verdict = "agree" if overall["max_abs_delta"] <= tolerance else "differ"
    return {
        "verdict": verdict,
        "diagnosis": None if verdict == "agree" else diagnose(model, tokenizer, results, overall, tolerance),
        "tolerance": tolerance, "server": server.base, "server_model": server.model, **overall,
        "first_divergence": first_divergence(tokenizer, results),
        "worst": worst(tokenizer, results),
        "prompts": [{"prompt": r.index, "name": r.name, **summarize(r.positions),
                     "first_divergence": first_divergence(tokenizer, [r]), "notes": r.notes} for r in results],
    }


def read_prompts(path):
    """The prompt specs of a JSONL file: {"prompt": text | [ids]} or {"messages": [...]}, with
    optional sampling fields and "name"; CannotCompare names the first bad line."""
    specs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                spec = json.loads(line)
            except json.JSONDecodeError as error:
                raise CannotCompare(f"{path}:{number}: not JSON: {error}") from None
            prompt = spec.get("prompt") if isinstance(spec, dict) else None
            ok = isinstance(spec, dict) and (("messages" in spec) != ("prompt" in spec)) and (
                "messages" in spec and isinstance(spec["messages"], list) and spec["messages"]
                or isinstance(prompt, str) and prompt
                or isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt))
            if not ok:
                raise CannotCompare(f'{path}:{number}: give "prompt" (a non-empty text or list of token ids) '
                                    'or "messages" (a non-empty list), not both')
            specs.append(spec)
    if not specs:
        raise CannotCompare(f"{path} holds no prompt")
    return specs


def describe(report):
    """The report for people: the overall figures, the worst positions, the verdict last."""
    def figure(value, form):
        return "n/a" if value is None else format(value, form)

    lines = [f"{report['positions']} positions compared with {report['server']} ({report['server_model']}):",
             f"  |Δ logprob| max {report['max_abs_delta']:.3g}, mean {report['mean_abs_delta']:.3g} "
             f"(tolerance {report['tolerance']:g})",
             f"  top-1 agreement {figure(report['top1_agreement'], '.1%')} outside {report['near_ties']} near-ties "
             f"({report['near_tie_disagreements']} of which ranked otherwise); top-k overlap "
             f"{figure(report['topk_overlap'], '.1%')}; KL over the shared top-k: mean "
             f"{figure(report['kl_topk_mean'], '.2g')}, max {figure(report['kl_topk_max'], '.2g')}"]
    if (d := report["first_divergence"]) is not None:
        lines.append(f"  greedy text would first part at prompt {d['prompt']}, position {d['position']}: server "
                     f"{d['server_token']!r}, refimpl {d['reference_token']!r}" + (" (a near-tie)" if d["near_tie"] else ""))
    else:
        lines.append("  greedy text would not part: the most likely token agrees at every position")
    if report["verdict"] == "differ":
        lines.append("  worst positions:")
        for w in report["worst"][:5]:
            lines.append(f"    prompt {w['prompt']} position {w['position']}: {w['token']!r} server "
                         f"{w['server_logprob']:.4f} refimpl {w['reference_logprob']:.4f} after "
                         f"{''.join(w['context'])!r}")
        d = report["diagnosis"]
        lines.append(f"verdict: differ ({d['name']}: {d['detail']})")
    else:
        lines.append("verdict: agree")
    return "\n".join(lines)
