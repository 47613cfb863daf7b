"""The batching engine: one thread owns the model, many requests share each pass over the weights.

Decoding one token reads every weight once, so a step that decodes for 8 sequences costs little
more than a step for one: memory bandwidth, not arithmetic, is the limit. The engine therefore
runs one forward pass per step over every running sequence (continuous batching):

  each step   admit waiting requests while fewer than max_seqs sequences run;
              give every prefilling request its next prompt chunk (at most prefill_chunk
              tokens in all, so one long prompt never stalls everyone's decoding);
              give every decoding choice its last token;
              run forward() once over all of them, each with its own positions and KV cache;
              sample where a prompt finished or a choice decodes, and hand out the events.

- Whatever shares a step, each sequence gets the bits it would get alone (refimpl/batching.py):
  the chunking of prompts, the companions and their number change no request's answer.
- n > 1 choices share their prompt's prefill: the cache is copied, not recomputed.
- Prefix caching: a finished prompt's cache is kept (within prefix_cache_tokens positions,
  least recently used first out); a new prompt that starts with a kept one copies that prefix
  instead of recomputing it (the same system prompt, a chat that goes on).
- Bounds: at most max_seqs sequences run in a step, whatever the requests ask (a request's n
  choices are admitted together, so n > max_seqs can never run and is refused: NeverFits); more
  than max_queue waiting requests is refused at once (EngineFull), never queued.
- Prompt scoring (echo with logprobs) is prefill that keeps every position's log-probabilities:
  it runs in the same chunks as any prefill, so its memory is bounded by the chunk, not the prompt.
- Cancellation (a client gone) frees the request's caches at the next step, whether the request
  waits, prefills or decodes.
- An exception while sampling fails only that request; a failing forward pass is retried
  sequence by sequence so that only the sequences that fail are failed.

Request threads only submit and read their own queue; they never touch the model.
"""

import queue
import threading
import time
from collections import OrderedDict, deque

from refimpl.generate import chunk_logprobs, generate
from refimpl.grammar import Grammars
from refimpl.models import forward
from refimpl.xp import to_numpy

DONE = object()  # end of a request's event stream


class EngineFull(RuntimeError):
    """Too many requests are waiting; try again later (the server answers 429)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and admits no new requests (the server answers 503)."""


class RequestFailed(RuntimeError):
    """The engine could not finish this request."""


class NeverFits(ValueError):
    """A request larger than this engine's bounds could ever take, however long it waited (400)."""

    def __init__(self, param, message):
        super().__init__(message)
        self.param = param


class Request:
    """One submitted generation: iterate for its Events; cancel() if the client goes away."""

    def __init__(self, generation, score_top=None):
        self.generation = generation  # validated parameters, per-choice state and the sampling step
        self.score_top = score_top  # None, or score the prompt with this many alternatives per position
        self.prompt_logprobs = [None] if score_top is not None else None  # filled before the first event
        self.events = queue.Queue()
        self.cancelled = False
        self.cache = None  # the prompt's cache while prefilling
        self.prefilled = 0  # prompt positions already in that cache
        self.choices = None  # [(index, Choice)] once the prompt is done
        self.prefill_started = self.decode_started = None

    @property
    def usage(self):
        return self.generation.usage

    def cancel(self):
        self.cancelled = True

    def __iter__(self):
        while (item := self.get(timeout=None)) is not DONE:
            yield item

    def get(self, timeout):
        """The next Event, DONE, or None if nothing came within timeout seconds (None: wait for one);
        a failure of the request is raised here."""
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            raise item
        return item


class PrefixCache:
    """Recently prefilled prompts and their caches, bounded by the positions they hold.

    A kept cache is the one its request's first choice goes on decoding into: that is safe
    because decoding writes only positions at or after len(prompt), and longest_prefix never
    hands out more than len(prompt) - 1 positions of it. Sharing it saves copying every prompt.
    """

    def __init__(self, max_tokens):
        self.max_tokens = max_tokens
        self.entries = OrderedDict()  # (cache kind, prompt ids) -> KVCache whose first len(prompt) positions hold it
        self.tokens = 0

    def longest_prefix(self, prompt, kind=None):
        """(cache, n): the kept cache of this kind (KVCache.kind) sharing the longest prefix with prompt,
        leaving >= 1 token to run."""
        best, best_n = None, 0
        for key in self.entries:
            if key[0] != kind:
                continue
            n = common_prefix_length(key[1], prompt, len(prompt) - 1)
            if n > best_n:
                best, best_n = key, n
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        return self.entries[best], best_n

    def add(self, prompt, cache):
        key = (cache.kind, tuple(prompt))
        if key in self.entries or len(prompt) > self.max_tokens:
            return
        self.entries[key] = cache
        self.tokens += cache.capacity
        while self.tokens > self.max_tokens:
            _, old = self.entries.popitem(last=False)
            self.tokens -= old.capacity


def is_scoring(entry):
    """Whether a batch entry (request, choice index, tokens, cache) is a prompt chunk to be scored."""
    request, index = entry[0], entry[1]
    return index is None and request.score_top is not None


def split_rows(batch, logits):
    """Logits of a forward pass, one item per batch entry (see forward_isolating_failures): all the
    rows of an entry that scores its prompt, the last row of any other."""
    rows, lo = [], 0
    for entry in batch:
        hi = lo + (len(entry[2]) if is_scoring(entry) else 1)
        rows.append(logits[lo:hi, ...] if is_scoring(entry) else to_numpy(logits[lo, ...]))
        lo = hi
    return rows


def common_prefix_length(a, b, limit):
    n = 0
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n


class Engine:
    def __init__(self, model, tokenizer, stop_ids, max_seqs=16, max_queue=64, prefill_chunk=256,
                 prefix_cache_tokens=4096, offload=None, thread=True):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, set(stop_ids)
        # What a request's grammar (response_format, tools) is compiled against: the vocabulary's bytes.
        self.grammars = Grammars(tokenizer, model.config.vocab_size, self.stop_ids)
        # offload(f, *args) runs the heavy arithmetic (forward passes, scoring a prompt chunk) and
        # returns f(*args). A server whose connections are greenlets of one thread (gevent) passes one
        # that runs it in a real thread, so that its event loop goes on serving meanwhile; the
        # default calls it here.
        self.offload = offload or (lambda f, *args: f(*args))
        self.max_seqs, self.max_queue, self.prefill_chunk = max_seqs, max_queue, prefill_chunk
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self.waiting = deque()
        self.running = []  # Requests admitted: prefilling or decoding
        self.lock = threading.Condition()
        self.stopping = False
        self.stats = {"tokens_generated": 0, "prompt_tokens_computed": 0, "steps": 0, "cancelled": 0, "failed": 0,
                      "prefix_hits": 0}
        # The engine's own thread runs steps while there is work. Without it (thread=False) the caller
        # runs each one with run_step(): the tests that choose at which step each request arrives.
        self.thread = threading.Thread(target=self.run, name="refimpl-engine", daemon=True) if thread else None
        if self.thread:
            self.thread.start()

    # ---------------------------------------------------------------- request threads

    def submit(self, prompt_ids, params, score_top=None):
        """Queue one generation (see submit_all)."""
        return self.submit_all([prompt_ids], params, score_top)[0]

    def submit_all(self, prompts, params, score_top=None):
        """Queue one generation per prompt, all of them or none; `score_top` (an int) also scores
        each prompt. Raises InvalidParameter, ContextLengthExceeded or NeverFits when the request
        can never run, EngineFull when it cannot wait now, EngineStopped while shutting down."""
        if params.n > self.max_seqs:
            raise NeverFits("n", f"n={params.n} choices are more than the {self.max_seqs} sequences this "
                                 f"server decodes at once (max_seqs); ask for at most {self.max_seqs}")
        if len(prompts) > self.max_queue:
            raise NeverFits("prompt", f"{len(prompts)} prompts are more than the {self.max_queue} requests this "
                                      f"server queues (max_queue); send at most {self.max_queue} per request")
        requests = [Request(generate(self.model, self.tokenizer, ids, params, self.stop_ids), score_top)
                    for ids in prompts]
        with self.lock:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            if len(self.waiting) + len(requests) > self.max_queue:
                raise EngineFull(f"{len(self.waiting)} requests are already waiting (max_queue {self.max_queue})")
            self.waiting.extend(requests)
            self.lock.notify()
        return requests

    @property
    def running_sequences(self):
        return sum(len(r.choices) if r.choices else r.generation.params.n for r in self.running)

    @property
    def waiting_requests(self):
        return len(self.waiting)

    def stop_admitting(self):
        with self.lock:
            self.stopping = True

    def idle(self):
        with self.lock:
            return not self.running and not self.waiting

    # ---------------------------------------------------------------- the engine thread

    def run(self):
        while True:
            with self.lock:
                while not self.running and not self.waiting:
                    self.lock.wait()
            self.run_step()
            # Let other threads run between steps. Under a cooperative server (gevent's greenlets)
            # nothing interrupts the parts of a step that are not offloaded (sampling, events):
            # this is where its connections get their turn.
            time.sleep(0)

    def run_step(self):
        """Admit what fits, then one step."""
        with self.lock:
            self.admit()
        try:
            self.step()
        except Exception as error:  # noqa: BLE001 - a bug here must not kill the engine thread
            for request in list(self.running):
                self.fail(request, error)

    def admit(self):
        """Move waiting requests into the running set while there is room for all their choices."""
        while self.waiting:
            request = self.waiting[0]
            if request.cancelled:
                self.waiting.popleft()
                self.finish(request, "canceled")
                continue
            if self.running_sequences + request.generation.params.n > self.max_seqs:  # n <= max_seqs: see submit_all
                return
            self.waiting.popleft()
            request.prefill_started = time.perf_counter()
            self.start_prefill(request)
            self.running.append(request)

    def start_prefill(self, request):
        gen = request.generation
        request.cache = self.model.new_cache(len(gen.prompt_ids) + gen.max_new, len(gen.prompt_ids))
        if request.score_top is not None:  # every position's log-probabilities: nothing to skip
            return
        cached, n = self.prefix_cache.longest_prefix(gen.prompt_ids, request.cache.kind)
        if n:
            request.cache.copy_prefix(self.model.xp, cached, n)
            request.prefilled = n
            self.stats["prefix_hits"] += 1

    def step(self):
        """One forward pass over every running sequence; then sample and hand out events."""
        for request in [r for r in self.running if r.cancelled]:
            self.finish(request, "canceled")
        batch = []  # (request, choice index or None for a prompt chunk, token ids, cache)
        budget = self.prefill_chunk
        for request in self.running:
            if request.choices is None:
                prompt = request.generation.prompt_ids
                if budget <= 0 and batch:
                    continue
                chunk = prompt[request.prefilled:request.prefilled + max(budget, 1)]
                budget -= len(chunk)
                batch.append((request, None, chunk, request.cache))
            else:
                for index, choice in request.choices:
                    if not choice.finished:
                        batch.append((request, index, [choice.generated[-1]], choice.cache))
        if not batch:
            return
        rows = self.forward_isolating_failures(batch)
        self.stats["steps"] += 1
        for (request, index, tokens, cache), row in zip(batch, rows):
            if request.cancelled or request not in self.running:
                continue
            if isinstance(row, Exception):
                self.fail(request, row)
            elif index is None:
                self.after_prompt_chunk(request, tokens, row)
            else:
                self.after_decode(request, index, row)

    def forward_isolating_failures(self, batch):
        """Per batch entry, its logits: the last row [V] on the host, or all its rows [T, V] when it
        scores its prompt. If the batched pass fails, each sequence is run alone."""
        try:
            return split_rows(batch, self.offload(forward, self.model, [b[2] for b in batch], [b[3] for b in batch],
                                                  [is_scoring(b) for b in batch]))
        except Exception:
            rows = []
            for entry in batch:
                try:
                    rows += split_rows([entry], self.offload(forward, self.model, [entry[2]], [entry[3]],
                                                             [is_scoring(entry)]))
                except Exception as error:  # noqa: BLE001 - the request concerned gets the error
                    rows.append(error)
            return rows

    def after_prompt_chunk(self, request, chunk, row):
        gen = request.generation
        if request.score_top is not None:  # row: [T, V], row t predicts prompt token prefilled + t + 1
            following = gen.prompt_ids[request.prefilled + 1:request.prefilled + len(chunk) + 1]
            request.prompt_logprobs += self.offload(chunk_logprobs, self.model.xp, self.tokenizer, row, following,
                                                    request.score_top)
            row = to_numpy(row[-1, ...])
        request.prefilled += len(chunk)
        self.stats["prompt_tokens_computed"] += len(chunk)
        if request.prefilled < len(gen.prompt_ids):
            return
        now = time.perf_counter()
        gen.usage.prompt_seconds = now - request.prefill_started
        self.prefix_cache.add(gen.prompt_ids, request.cache)
        request.choices = list(enumerate(gen.new_choices(request.cache)))
        request.cache = None
        request.decode_started = now
        for index, choice in request.choices:
            self.after_decode(request, index, row)

    def after_decode(self, request, index, row):
        gen = request.generation
        choice = request.choices[index][1]
        try:
            event = gen.step(index, choice, row)
        except Exception as error:  # noqa: BLE001 - fails this request only
            self.fail(request, error)
            return
        self.stats["tokens_generated"] += 1
        gen.usage.completion_seconds = time.perf_counter() - request.decode_started
        request.events.put(event)
        if all(c.finished for _, c in request.choices):
            self.finish(request, "finished")

    def finish(self, request, reason):
        if request in self.running:
            self.running.remove(request)
        if reason == "canceled":
            self.stats["cancelled"] += 1
        request.cache = None  # free the KV caches now, whoever still holds the request
        for _, choice in request.choices or []:
            choice.cache = None
        request.events.put(DONE)

    def fail(self, request, error):
        self.stats["failed"] += 1
        request.events.put(RequestFailed(f"generation failed: {type(error).__name__}: {error}"))
        self.finish(request, "failed")
