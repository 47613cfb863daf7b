/* refimpl web chat: a conversation whose replies stream in over a WebSocket, with a token view that
   shades every generated token by how likely the model found it and opens its card on a click or a
   key press: the sampler's alternatives, and two views recomputed by the server's inspection (a fresh
   forward pass): the logit lens layer by layer, and the attention over the earlier tokens. Each reply
   also shows its prompt as the model read it, and each user message how surprising the model found
   its tokens. One ES module, no dependencies, no build step.

   Safety rule of this file: nothing the model or the user wrote is ever parsed as HTML. Text reaches
   the page through textContent, Element.append(string) and createTextNode only (never innerHTML).

   The WebSocket protocol (ws(s)://<this host>/v1/ws, protocol 1): typed JSON text messages, each an
   object with a "type".

   Client -> server
     {"type": "auth", "api_key": KEY}
         only when hello.auth_required (a browser cannot set an Authorization header on a WebSocket).
     {"type": "chat", "id": "r1", "messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...],
      "settings": {"temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "response_format"},
      "alternatives": 10}
         id: 1-64 chars, echoed on every event of this reply. Each setting optional; null or absent means
         the API default (temperature 1, top_p 1, top_k off (null or 0), min_p 0, max_tokens up to the
         context end, seed random). alternatives: 10..20, default 10. One chat at a time per socket: a
         second one while one runs gets an error event (status 409, code "request_in_progress").
     {"type": "cancel", "id": "r1"}
         stop that reply; the server then sends its done event with finish_reason "canceled".
     {"type": "inspect", "id": "i1", "request": {a POST /v1/inspect body}}
         look inside the model (webapp/inspection.py): a fresh forward pass over a prompt (text, token ids,
         or messages with add_generation_prompt), with the logit lens and attention weights asked for.
         Answered by an inspection event or an error event with the same id: 429 while another inspection
         runs on the server (this page retries after a second), 409 while a reply streams on this socket
         (this page keeps its inspections back until the reply's done event), 400 when too large.

   Server -> client
     {"type": "hello", "protocol": 1, "model": NAME or null while loading, "auth_required": false}
         the first message on connect.
     {"type": "token", "id", "index", "token_id", "text", "bytes", "offset", "delta", "special",
      "p", "logprob", "rank", "alternatives": [{"token_id", "text", "bytes", "special", "p", "p_temp",
      "kept", "removed_by", "chosen"}, ...], "other_p", "other_p_temp", "top_p_cut": {"top_p", "mass"} | null}
         index: position in the reply (0-based). text: the token's own text (U+FFFD where it holds part
         of a UTF-8 character). offset: where the token starts in the reply content, in Unicode code
         points (index with Array.from(content), not with UTF-16 units); tokens that together form one
         character share an offset. delta: the text this token releases into the reply now (may be ""
         while a character is incomplete); appending deltas gives the content. special: true for a
         control token such as the end-of-sequence <|im_end|> that ends the reply (its text is its marker,
         not part of the content; its bytes are empty). p / logprob: the model's raw
         probability of the token; rank: its 1-based rank by raw p. alternatives: the most likely tokens
         by raw p, most likely first, plus the chosen one appended if it is not among them; p_temp: the
         probability after temperature (before top-k/top-p/min-p); kept: survived the filters;
         removed_by: null, "grammar" (response_format's constraint), "temperature", "top_k", "top_p" or "min_p"
         (the first that removed it).
         other_p / other_p_temp: the mass of every token not listed. top_p_cut: null when top_p is 1,
         else the setting and the mass (after temperature, among the top-k survivors) of the smallest
         most-likely set reaching it.
         A token group's glyph text: the content's code points from its offset to the next group's
         offset (the last group: to the end of the content received so far).
     {"type": "done", "id", "finish_reason": "stop"|"length"|"canceled", "content": "the whole reply", "request_id",
      "usage": {"prompt_tokens", "completion_tokens", "total_tokens", "avg_tok_per_sec",
                "avg_prompt_tok_per_sec", "avg_compl_tok_per_sec"}}
     {"type": "inspection", "id": "i1", "inspection": {the POST /v1/inspect response}}
         text, token_ids, tokens, logprobs (log p(token t | tokens before it), the first null),
         message_tokens ([start, end) of each message's turn), positions, logit_lens (per position asked:
         per layer 0..L {layer, top: [{token_id, token, logprob}], next_token: {..., rank} | null, entropy}),
         attention ([{layer, head, weights: one row per position asked, p + 1 weights for position p}]).
     {"type": "error", "id": "r1" or null, "status": 400, "error": {"message", "type", "param", "code"}}
         ends that reply (no done follows), or answers that inspect; the socket stays open.

   What the page asks inspect for (every number these views show is the server's; the only arithmetic
   done here is the attention view's "hide the sink" renormalisation and head average, which it labels):
     - each reply's prompt: {messages, add_generation_prompt: true}, sent just before the chat message
       (the socket handles one message at a time, so it is answered before the reply starts). It fills
       the reply's "Prompt as the model sees it" section, and the user message's surprise view: the
       prompt's logprobs over that message's turn (message_tokens) are its teacher-forced log-probabilities.
     - a reply token j's Layers / Attention tab, when opened: {prompt: prompt ids + reply ids 0..j,
       positions: [the position before token j], logit_lens: {top: 5} | attention: {layers: "all",
       heads: "all"}}: that position's distribution is the one that chose token j, so the lens's
       next_token is token j at every layer. Cached per token and tab.

   DOM hooks (for people reading the page and for tests/test_webchat_browser.py and
   tests/test_webchat_inspect_browser.py): each reply is an <article class="msg assistant"> with data-id,
   data-state ("streaming" | "done" | "error"), data-tokens (token events received), data-finish-reason
   and data-prompt-tokens (once its prompt is inspected); its plain text is .reply-text, its token view
   .reply-tokens with one span.tok per token group (classes b0..b4 = probability bins; data-token-ids:
   the group's token ids, space-separated).
   A reply's prompt view is details.prompt-view (data-state "loading" | "done" | "error") with
   .prompt-count, the checkbox input.show-ids, and .prompt-tokens holding one span.ptok per token
   (data-id, data-pos; its id in span.tid, shown while .prompt-tokens has the class show-ids).
   A user message is <article class="msg user"> (data-inspected "loading" | "done" | "error"); in the
   token view its .user-view shows .user-tokens, one span.tok per token of its turn (data-pos,
   data-logprob; the user's own text b0..b4 by logprob, the template's tokens .template), and
   .user-readout for the token in focus.
   The card is #token-card; its tabs are #token-card-tabs button[role=tab][data-tab="sampler" |
   "layers" | "attention"], their panels #token-card-body (the sampler: rows tr.alt (.chosen,
   .filtered), tr.top-p-cut and tr.other), #panel-layers and #panel-attention (data-state "loading" |
   "done" | "error"; data-token: the reply token index shown; .sub-picker where a group has several
   tokens). Layers: table.lens, one tbody tr per layer 0..L (data-layer, data-rank, data-logprob; the
   row from which the chosen token stays rank 1 has the class lens-forms). Attention: checkboxes
   #att-hide-sink and #att-average, the thumbnail grid .att-grid (role radiogroup) of
   button.att-thumb[role=radio] (data-layer, data-head, aria-checked), .att-heading, the strip
   .att-strip of span.att-tok (data-pos, data-weight: the weight shown, "" for the hidden sink), the
   list ol.att-top (li data-pos data-weight) and .att-readout.
*/

const $ = (id) => document.getElementById(id);

const WS_URL = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`;
const KEY_STORAGE = "refimpl-api-key"; // sessionStorage only: the key is gone when the tab closes

// Probability bins of the token view, most likely first; the CSS classes b0..b4 shade them.
const BINS = [0.9, 0.5, 0.2, 0.05];

const SETTING_FIELDS = [ // [settings key, input id, integer?]
  ["temperature", "temperature", false],
  ["top_p", "top-p", false],
  ["top_k", "top-k", true],
  ["min_p", "min-p", false],
  ["max_tokens", "max-tokens", true],
  ["seed", "seed", true],
];

const FINISH_LABELS = {stop: "finished", length: "stopped at max tokens", canceled: "stopped"};

// ---------------------------------------------------------------- small helpers

/** Create an element; string children become text nodes (Element.append never parses HTML). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "className") el.className = value;
    else if (value !== null && value !== undefined && value !== false) el.setAttribute(name, value);
  }
  el.append(...children.filter((c) => c !== null && c !== undefined));
  return el;
}

/** A probability as a percentage; never "0 %" for a small non-zero value. */
function pct(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (x === 0) return "0";
  if (x < 0.001) return "<0.1 %";
  if (x < 1 && x > 0.999) return ">99.9 %"; // toFixed would round it up to "100.0 %"
  return `${(100 * x).toFixed(1)} %`;
}

function binOf(p) {
  const i = BINS.findIndex((limit) => p >= limit);
  return i === -1 ? BINS.length : i;
}

// The same bins as log-probabilities: an inspection reports logprobs, and comparing them with ln(limit)
// shades them like the reply's tokens without turning the server's numbers into other numbers.
const LOG_BINS = BINS.map(Math.log);

function binOfLogprob(logprob) {
  const i = LOG_BINS.findIndex((limit) => logprob >= limit);
  return i === -1 ? LOG_BINS.length : i;
}

function fmtLogprob(logprob) {
  return logprob === null || logprob === undefined ? "–" : logprob.toFixed(3);
}

function hexBytes(bytes) {
  return (bytes || []).map((b) => b.toString(16).padStart(2, "0")).join(" ");
}

/** Other control characters as an escape like "\x05" (the symbol fonts for U+2400 are often missing), or null. */
function controlPicture(ch) {
  const code = ch.codePointAt(0);
  if (code < 0x20 || code === 0x7f) return `\\x${code.toString(16).padStart(2, "0")}`;
  return null;
}

/** Text with its whitespace made visible: space ·, newline ↵ then a real line break, tab →,
    other control characters as \xNN. */
function visibleText(text, {lineBreaks = true} = {}) {
  const fragment = document.createDocumentFragment();
  let run = "";
  const flush = () => { if (run) fragment.append(run); run = ""; };
  for (const ch of text) {
    const mark = ch === " " ? "·" : ch === "\n" ? "↵" : ch === "\t" ? "→" : controlPicture(ch);
    if (mark === null) { run += ch; continue; }
    flush();
    fragment.append(h("span", {className: mark.length > 1 ? "ws ctrl" : "ws"}, mark));
    if (ch === "\n" && lineBreaks) fragment.append(h("br"));
  }
  flush();
  return fragment;
}

/** A token's text for the card: whitespace visible, and its bytes where it is part of a character. */
function tokenLabel(token) {
  const span = h("span", {className: "tok-text"}, visibleText(token.text, {lineBreaks: false}));
  if (token.text.includes("\uFFFD") && token.bytes) {
    span.append(h("span", {className: "bytes"}, ` ‹${hexBytes(token.bytes)}›`));
  }
  if (token.text === "") span.append(h("span", {className: "bytes"}, "(empty)"));
  return span;
}

// ---------------------------------------------------------------- the connection

const state = {
  ws: null,
  open: false,
  authRequired: false,
  authSentKey: null,   // the key sent on this socket, so that it is sent again only when it changes
  history: [],         // the conversation so far, as {role, content}, without the system prompt
  current: null,       // the Reply being generated, or null
  counter: 0,
  retryMs: 500,
};

function setStatus(text) { $("status").textContent = text; }

function connect() {
  setStatus("connecting…");
  const ws = new WebSocket(WS_URL);
  state.ws = ws;
  ws.addEventListener("open", () => { state.open = true; state.retryMs = 500; });
  ws.addEventListener("message", (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      console.warn("not JSON from the server:", event.data);
      return;
    }
    handleMessage(message);
  });
  ws.addEventListener("close", () => {
    if (state.ws !== ws) return;
    state.open = false;
    state.authSentKey = null;
    inspector.failAll(); // their answers would have come on this socket
    if (state.current) {
      if (!state.current.detached) {
        state.current.fail({error: {message: "the connection to the server was lost", code: "disconnected"}});
      }
      endGeneration();
    }
    setStatus(`disconnected, reconnecting in ${Math.round(state.retryMs / 1000) || 1} s…`);
    setTimeout(connect, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, 10000);
  });
}

function send(message) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(message));
  return true;
}

function sendAuth(key) {
  if (send({type: "auth", api_key: key})) state.authSentKey = key;
}

function handleMessage(message) {
  const current = state.current;
  switch (message.type) {
    case "hello":
      onHello(message);
      break;
    case "token":
      if (current && message.id === current.id) current.addToken(message);
      break;
    case "done":
      if (current && message.id === current.id) {
        current.finish(message);
        if (!current.detached) {
          state.history.push({role: "user", content: current.userText}, {role: "assistant", content: message.content});
        }
        endGeneration();
      }
      break;
    case "inspection":
      inspector.receive(message);
      break;
    case "error":
      if (!inspector.receive(message)) onError(message);
      break;
    default:
      console.warn("unknown message from the server:", message);
  }
}

function onHello(hello) {
  const model = hello.model ?? "model loading…";
  const protocol = hello.protocol === 1 ? "" : ` (unknown protocol ${hello.protocol})`;
  setStatus(`connected · ${model}${protocol}`);
  state.authRequired = Boolean(hello.auth_required);
  $("auth-row").hidden = !state.authRequired;
  if (state.authRequired) {
    const key = sessionStorage.getItem(KEY_STORAGE) || $("api-key").value;
    if (key) { $("api-key").value = key; sendAuth(key); }
  }
}

function onError(message) {
  const current = state.current;
  if (current && message.id === current.id) {
    if (!current.detached) current.fail(message);
    endGeneration();
    if (message.error?.code === "invalid_api_key") $("api-key").focus();
  } else if (message.id == null) { // about a message without an id: a rejected API key, say
    appendToConversation(errorBox(message));
    if (message.error?.code === "invalid_api_key") $("api-key").focus();
  } else {
    console.warn("error for a reply that is no longer shown:", message);
  }
}

/** The error envelope as a box; alert: false for an error nobody is waiting on (no announcement). */
function errorBox(message, {alert = true} = {}) {
  const err = message.error || {};
  const head = ["Error", message.status || null, err.code ? `(${err.code})` : null].filter(Boolean).join(" ");
  const box = h("div", {className: "error-box", role: alert ? "alert" : null},
    h("strong", {}, `${head}: `), err.message || "unknown error");
  if (err.param) box.append(h("span", {className: "error-param"}, ` (field: ${err.param})`));
  return box;
}

// ---------------------------------------------------------------- inspections (POST /v1/inspect on the socket)

const RECOMPUTED = "recomputed by a fresh forward pass, not from the sampling step";
const INSPECT_RETRY_MS = 1000; // the server runs one inspection at a time; a second one gets 429 meanwhile
const INSPECT_TRIES = 30;
const DISCONNECTED = {error: {message: "the connection to the server was lost", code: "disconnected"}};

/** Inspect messages in flight, each a Promise for its caller. The server answers 409 to an inspect
    sent while a reply streams on this socket, so those wait here for the reply's end instead. */
const inspector = {
  counter: 0,
  pending: new Map(), // id -> {request, resolve, reject, tries}
  held: [],           // ids kept back until the streaming reply ends

  /** A Promise of the /v1/inspect response for `request`, rejected with the error event (its envelope). */
  ask(request) {
    const id = `i${++this.counter}`;
    return new Promise((resolve, reject) => {
      this.pending.set(id, {request, resolve, reject, tries: 0});
      this.dispatch(id);
    });
  },

  /** Whether a request asked now waits for the streaming reply to end (for the loading text). */
  waiting() { return state.current !== null; },

  dispatch(id) {
    const entry = this.pending.get(id);
    if (!entry) return;
    if (state.current) { this.held.push(id); return; }
    entry.tries += 1;
    if (!send({type: "inspect", id, request: entry.request})) this.settle(id, null, DISCONNECTED);
  },

  /** Called when a reply ends: send what it kept back. */
  release() {
    const ids = this.held;
    this.held = [];
    ids.forEach((id) => this.dispatch(id));
  },

  /** Take the inspection or error event of one of our inspect messages; false if the id is not ours. */
  receive(message) {
    const entry = this.pending.get(message.id);
    if (!entry) return false;
    const busy = message.status === 429 || message.error?.code === "request_in_progress";
    if (message.type === "inspection") this.settle(message.id, message.inspection, null);
    else if (busy && entry.tries < INSPECT_TRIES) setTimeout(() => this.dispatch(message.id), INSPECT_RETRY_MS);
    else this.settle(message.id, null, message);
    return true;
  },

  settle(id, inspection, error) {
    const entry = this.pending.get(id);
    this.pending.delete(id);
    if (error) entry.reject(error);
    else entry.resolve(inspection);
  },

  /** The socket closed: nothing sent on it will be answered. */
  failAll() {
    this.held = [];
    [...this.pending.keys()].forEach((id) => this.settle(id, null, DISCONNECTED));
  },
};

/** "Loading" text for a view whose inspection was just asked for. */
function loadingNote(what) {
  const when = inspector.waiting() ? " once the reply has finished (the server inspects between replies)" : "";
  return h("p", {className: "inspect-loading", role: "status"}, `Computing ${what}${when}…`);
}

// ---------------------------------------------------------------- a reply and its token view

class Reply {
  constructor(id, userText, userEl) {
    this.id = id;
    this.userText = userText;
    this.userEl = userEl;
    this.content = "";
    this.codepoints = [];  // Array.from(content), kept up to date: offsets count code points
    this.groups = [];      // [{offset, tokens: [token events], el, special}]
    this.tokens = [];      // every token event, in reply order (their token_id continue the prompt)
    this.messages = null;  // the messages of its chat message (inspectPrompt)
    this.prompt = null;    // Promise of the prompt's inspection (inspectPrompt)
    this.inspections = new Map(); // "index:layers" | "index:attention" -> Promise (inspectToken)
    this.tokenCount = 0;
    this.active = 0;       // the group that holds the reply's one tab stop
    this.detached = false; // "New chat" removed it from the page while it was still generating

    this.textEl = h("div", {className: "reply-text"});
    this.tokensEl = h("div", {className: "reply-tokens", role: "group",
      "aria-label": "Reply tokens: arrow keys move between tokens, Enter opens a token's card"});
    this.metaEl = h("div", {className: "msg-meta"}, "generating…");
    this.promptView = new PromptView();
    this.el = h("article", {className: "msg assistant", "data-id": id, "data-state": "streaming", "data-tokens": "0",
      "aria-busy": "true"}, h("div", {className: "msg-role"}, "model"), this.promptView.el, this.textEl,
      this.tokensEl, this.metaEl);

    this.tokensEl.addEventListener("keydown", (event) => this.onKey(event));
    this.tokensEl.addEventListener("click", (event) => {
      const el = event.target.closest(".tok");
      if (el) this.openCard(Number(el.dataset.group));
    });
    this.tokensEl.addEventListener("focusin", (event) => {
      const el = event.target.closest(".tok");
      if (el) this.setActive(Number(el.dataset.group), false);
    });
  }

  addToken(token) {
    keepingScroll(() => this.addTokenNow(token));
  }

  /** Ask for the prompt as the model sees it: `messages` exactly as the chat message sends them. It fills
      the prompt view and, through that user message's turn, the user message's surprise view. */
  inspectPrompt(messages) {
    this.messages = messages;
    this.prompt = inspector.ask({messages, add_generation_prompt: true});
    this.prompt.then((inspection) => {
      this.el.dataset.promptTokens = String(inspection.token_ids.length);
      this.promptView.fill(inspection);
      userView.fill(this.userEl, inspection, messages.length - 1, messages[messages.length - 1].content);
    }, (error) => {
      this.promptView.fail(error);
      userView.fail(this.userEl, error);
    });
  }

  /** The inspection behind token `index`'s Layers or Attention tab: the prompt and the reply up to and
      including that token, looked at from the position before it, where the distribution that chose it
      was computed. Cached per token and kind; a failure is not, so that opening the tab again retries. */
  inspectToken(index, kind) {
    const key = `${index}:${kind}`;
    if (!this.inspections.has(key)) {
      // A prompt inspection that failed (a lost connection, say) is asked for again, views and all.
      const failed = this.prompt;
      const prompt = failed.catch(() => {
        if (this.prompt === failed) this.inspectPrompt(this.messages); // once, whoever asks first
        return this.prompt;
      });
      const promise = prompt.then((prompt) => {
        const ids = [...prompt.token_ids, ...this.tokens.slice(0, index + 1).map((t) => t.token_id)];
        const position = prompt.token_ids.length + index - 1;
        const asked = kind === "layers" ? {logit_lens: {top: LENS_TOP}} : {attention: {layers: "all", heads: "all"}};
        return inspector.ask({prompt: ids, positions: [position], ...asked})
          .then((inspection) => ({inspection, position, token: this.tokens[index]}));
      });
      promise.catch(() => this.inspections.delete(key));
      this.inspections.set(key, promise);
    }
    return this.inspections.get(key);
  }

  addTokenNow(token) {
    this.tokens.push(token);
    this.tokenCount += 1;
    this.el.dataset.tokens = String(this.tokenCount);
    if (!token.special && token.delta) {
      this.content += token.delta;
      this.codepoints.push(...Array.from(token.delta));
      this.textEl.append(token.delta); // a text node
    }
    const last = this.groups[this.groups.length - 1];
    let index;
    if (last && !last.special && !token.special && last.offset === token.offset) {
      last.tokens.push(token); // another piece of the same character
      index = this.groups.length - 1;
    } else {
      index = this.groups.length;
      const group = {offset: token.offset, tokens: [token], special: Boolean(token.special)};
      group.el = h("span", {className: "tok", role: "button", "aria-haspopup": "dialog",
        tabindex: index === this.active ? "0" : "-1", "data-group": String(index)});
      this.groups.push(group);
      // <wbr>: a line may break between two tokens (the visible "·" of a space is no break opportunity).
      this.tokensEl.append(h("wbr"), group.el);
    }
    // The previous group ends where this one starts, so its glyph text may have grown too.
    [index - 1, index].filter((i) => i >= 0).forEach((i) => this.renderGroup(i));
  }

  /** The group's glyph text: content code points from its offset to the next content group's offset. */
  glyphText(i) {
    const group = this.groups[i];
    if (group.special) return group.tokens[0].text;
    const next = this.groups.slice(i + 1).find((g) => !g.special);
    const end = next ? next.offset : this.codepoints.length;
    return this.codepoints.slice(group.offset, end).join("");
  }

  /** The probability of a group: the product of its tokens' p (the chance of writing those bytes here). */
  groupP(i) {
    return this.groups[i].tokens.reduce((p, t) => p * t.p, 1);
  }

  renderGroup(i) {
    const group = this.groups[i];
    const el = group.el;
    const p = this.groupP(i);
    const text = this.glyphText(i);
    el.className = `tok b${binOf(p)}${group.special ? " special" : ""}${text === "" ? " partial" : ""}`;
    el.dataset.p = String(p);
    el.dataset.tokenIds = group.tokens.map((t) => t.token_id).join(" ");
    el.replaceChildren(group.special ? h("span", {className: "end-mark"}, "end")
      : text === "" ? "\uFFFD" // a character whose bytes have not all arrived yet
      : visibleText(text));
    const name = group.special ? "end of reply" : text === "" ? "incomplete character" : JSON.stringify(text);
    el.setAttribute("aria-label", `${name}, ${pct(p)}`);
  }

  finish(done) {
    this.content = done.content;
    this.codepoints = Array.from(done.content);
    this.textEl.textContent = done.content;
    this.groups.forEach((_, i) => this.renderGroup(i));
    const reason = done.finish_reason;
    this.el.dataset.state = "done";
    this.el.dataset.finishReason = reason;
    this.el.removeAttribute("aria-busy");
    const usage = done.usage || {};
    const parts = [`${FINISH_LABELS[reason] || reason} (${reason})`];
    if (usage.completion_tokens !== undefined) parts.push(`${usage.completion_tokens} tokens`);
    if (usage.avg_compl_tok_per_sec) parts.push(`${usage.avg_compl_tok_per_sec.toFixed(1)} tok/s`);
    this.metaEl.textContent = parts.join(" · ");
    if (this.content === "" && this.groups.length === 0) this.textEl.append(h("em", {}, "(empty reply)"));
    $("announce").textContent = `Reply ${FINISH_LABELS[reason] || reason}.`;
  }

  fail(message) {
    this.el.dataset.state = "error";
    this.el.removeAttribute("aria-busy");
    this.metaEl.replaceChildren(errorBox(message));
    // A failed turn is not sent with the next one; say so, and give the text back to retry it.
    this.userEl.classList.add("not-in-history");
    this.userEl.append(h("div", {className: "msg-note"}, "not part of the conversation: the reply failed"));
    if ($("input").value === "") $("input").value = this.userText;
  }

  // Roving tabindex: exactly one token of the reply is in the tab order.
  setActive(i, focus) {
    if (i < 0 || i >= this.groups.length) return;
    this.groups[this.active]?.el.setAttribute("tabindex", "-1");
    this.active = i;
    const el = this.groups[i].el;
    el.setAttribute("tabindex", "0");
    if (focus) el.focus();
  }

  onKey(event) {
    const moves = {ArrowRight: this.active + 1, ArrowLeft: this.active - 1, Home: 0, End: this.groups.length - 1};
    if (event.key in moves) {
      event.preventDefault();
      this.setActive(Math.max(0, Math.min(moves[event.key], this.groups.length - 1)), true);
    } else if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      this.openCard(this.active);
    }
  }

  openCard(i) {
    this.setActive(i, false);
    card.open(this, i);
  }
}

// ---------------------------------------------------------------- the token card

const TABS = ["sampler", "layers", "attention"];

const card = {
  el: null, body: null, reply: null, group: -1,
  tab: "sampler", // the open tab; it stays open from one token to the next, so a student can walk the reply
  sub: 0,         // which token of a group of several (one character's bytes) the Layers / Attention tabs show

  init() {
    this.el = $("token-card");
    this.body = $("token-card-body");
    $("token-card-close").addEventListener("click", () => this.close(true));
    const tablist = $("token-card-tabs");
    tablist.addEventListener("click", (event) => {
      const tab = event.target.closest("[role=tab]");
      if (tab) this.selectTab(tab.dataset.tab, true);
    });
    tablist.addEventListener("keydown", (event) => this.onTabKey(event));
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && !this.el.hidden) { event.preventDefault(); this.close(true); }
    });
    document.addEventListener("pointerdown", (event) => {
      if (!this.el.hidden && !this.el.contains(event.target) && !event.target.closest(".reply-tokens .tok")) {
        this.close(false);
      }
    });
    $("conversation").addEventListener("scroll", () => this.place(), {passive: true});
    window.addEventListener("resize", () => this.place());
  },

  open(reply, i) {
    this.reply = reply;
    this.group = i;
    const group = reply.groups[i];
    const text = reply.glyphText(i);
    const glyph = h("span", {className: "card-glyph"}, "“", visibleText(text, {lineBreaks: false}), "”");
    $("token-card-title").replaceChildren(...(group.special ? ["End of reply ", glyph] : [glyph]));
    const sections = [];
    if (group.tokens.length > 1) {
      sections.push(h("p", {className: "card-note"},
        `These ${group.tokens.length} tokens share one starting point: their bytes only make whole characters ` +
        `together. Together their probability is ${pct(reply.groupP(i))}.`));
    }
    group.tokens.forEach((token, k) => sections.push(tokenSection(token, group.tokens.length > 1 ? k + 1 : null)));
    this.body.replaceChildren(...sections);
    this.sub = 0;
    clearExpanded();
    group.el.setAttribute("aria-expanded", "true");
    this.el.hidden = false;
    this.selectTab(this.tab, false);
    this.el.focus();
  },

  /** Show one tab (WAI-ARIA tabs: the selected tab is the tablist's one tab stop). */
  selectTab(name, focus) {
    this.tab = name;
    for (const tab of $("token-card-tabs").querySelectorAll("[role=tab]")) {
      const selected = tab.dataset.tab === name;
      tab.setAttribute("aria-selected", String(selected));
      tab.setAttribute("tabindex", selected ? "0" : "-1");
      $(tab.getAttribute("aria-controls")).hidden = !selected;
      if (selected && focus) tab.focus();
    }
    if (name !== "sampler") this.renderInspection(name);
    this.place();
  },

  /** ←/→ (and Home/End) move between the tabs and open the one reached. */
  onTabKey(event) {
    const i = TABS.indexOf(this.tab);
    const moves = {ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: TABS.length - 1};
    if (!(event.key in moves)) return;
    event.preventDefault();
    this.selectTab(TABS[(moves[event.key] + TABS.length) % TABS.length], true);
  },

  /** The reply token the Layers and Attention tabs are about. */
  inspectedToken() {
    const tokens = this.reply.groups[this.group].tokens;
    return tokens[Math.min(this.sub, tokens.length - 1)];
  },

  /** Whether the card still shows `kind` for reply token `index` (an answer may come after the user moved on). */
  shows(reply, index, kind) {
    return !this.el.hidden && this.reply === reply && this.tab === kind && this.inspectedToken().index === index;
  },

  /** Fill the Layers or Attention panel: loading at once, then the inspection (fetched once per token). */
  renderInspection(kind) {
    const panel = $(`panel-${kind}`);
    const reply = this.reply;
    const token = this.inspectedToken();
    const what = kind === "layers" ? "the logit lens" : "the attention weights";
    const body = h("div", {className: "inspect-body"}, loadingNote(what));
    panel.dataset.state = "loading";
    panel.dataset.token = String(token.index);
    panel.replaceChildren(...[this.subPicker(kind), body].filter(Boolean));
    reply.inspectToken(token.index, kind).then((result) => {
      if (!this.shows(reply, token.index, kind)) return;
      body.replaceChildren(kind === "layers" ? layersView(result) : attentionView(result));
      panel.dataset.state = "done";
      this.place();
    }, (error) => {
      if (!this.shows(reply, token.index, kind)) return;
      body.replaceChildren(errorBox(error));
      panel.dataset.state = "error";
      this.place();
    });
  },

  /** For a group of several tokens (the bytes of one character): buttons choosing which one to look at. */
  subPicker(kind) {
    const tokens = this.reply.groups[this.group].tokens;
    if (tokens.length < 2) return null;
    const buttons = tokens.map((token, k) => {
      const button = h("button", {type: "button", "aria-pressed": String(k === this.sub)},
        `token ${k + 1} `, tokenLabel(token));
      button.addEventListener("click", () => {
        this.sub = k;
        this.renderInspection(kind);
        $(`panel-${kind}`).querySelectorAll(".sub-picker button")[k].focus(); // the buttons were drawn anew
      });
      return button;
    });
    return h("div", {className: "sub-picker", role: "group", "aria-label": "Which token of this character"},
      h("span", {className: "card-note"}, "This character is several tokens:"), ...buttons);
  },

  close(returnFocus) {
    if (this.el.hidden) return;
    this.el.hidden = true;
    clearExpanded();
    const el = this.reply?.groups[this.group]?.el;
    if (returnFocus && el && el.isConnected) el.focus();
  },

  /** Next to the token (below it, or above where there is no room); a bottom sheet on a narrow screen. */
  place() {
    if (this.el.hidden) return;
    const token = this.reply?.groups[this.group]?.el;
    if (!token || !token.isConnected || window.matchMedia("(max-width: 600px)").matches) {
      this.el.style.left = this.el.style.top = "";
      return;
    }
    const r = token.getBoundingClientRect();
    const w = this.el.offsetWidth, hgt = this.el.offsetHeight, margin = 8;
    const left = Math.max(margin, Math.min(r.left, window.innerWidth - w - margin));
    let top = r.bottom + 6;
    if (top + hgt > window.innerHeight - margin) top = Math.max(margin, r.top - hgt - 6);
    this.el.style.left = `${left}px`;
    this.el.style.top = `${top}px`;
  },
};

function clearExpanded() {
  document.querySelectorAll('.tok[aria-expanded="true"]').forEach((el) => el.setAttribute("aria-expanded", "false"));
}

/** One token's facts and its alternatives table. */
function tokenSection(token, number) {
  const facts = h("dl", {className: "facts"},
    h("dt", {}, "probability"), h("dd", {className: "fact-p"}, pct(token.p)),
    h("dt", {}, "log-probability"), h("dd", {className: "fact-logprob"}, token.logprob.toFixed(3)),
    h("dt", {}, "rank"), h("dd", {className: "fact-rank"}, `#${token.rank}`),
    h("dt", {}, "token id"), h("dd", {}, String(token.token_id)));
  if (token.bytes && (number !== null || token.text.includes("\uFFFD"))) {
    facts.append(h("dt", {}, "bytes"), h("dd", {}, hexBytes(token.bytes)));
  }
  const section = h("section", {className: "card-token"});
  if (number !== null) section.append(h("h3", {}, `token ${number}: `, tokenLabel(token)));
  section.append(facts, alternativesTable(token));
  return section;
}

function alternativesTable(token) {
  const body = h("tbody");
  const cut = token.top_p_cut;
  const cutLabel = cut ? `top-p ${cut.top_p.toFixed(2)} cut — kept mass ${pct(cut.mass)}` : null;
  let cutShown = false;
  for (const alt of token.alternatives) {
    if (cut && !cutShown && alt.removed_by === "top_p") {
      body.append(h("tr", {className: "top-p-cut"}, h("td", {colspan: "5"}, cutLabel)));
      cutShown = true;
    }
    const status = alt.kept ? "kept" : `filtered: ${alt.removed_by}`;
    const row = h("tr", {className: `alt${alt.chosen ? " chosen" : ""}${alt.kept ? "" : " filtered"}`,
      "data-p": String(alt.p), "data-p-temp": String(alt.p_temp), "data-kept": String(alt.kept),
      "data-removed-by": alt.removed_by ?? ""},
      // The chosen row has a marker and a word, not only a colour.
      h("td", {className: "mark"}, alt.chosen ? h("span", {"aria-hidden": "true"}, "▶") : "",
        alt.chosen ? h("span", {className: "visually-hidden"}, "chosen") : null),
      h("td", {className: "alt-token"}, tokenLabel(alt)),
      h("td", {className: "num"}, pct(alt.p)),
      h("td", {className: "num"}, pct(alt.p_temp)),
      h("td", {className: "status"}, alt.chosen ? `chosen, ${status}` : status));
    body.append(row);
  }
  body.append(h("tr", {className: "other"},
    h("td", {className: "mark"}), h("td", {}, "everything else"),
    h("td", {className: "num"}, pct(token.other_p)), h("td", {className: "num"}, pct(token.other_p_temp)),
    h("td", {className: "status"}, "")));
  const table = h("table", {className: "alternatives"},
    h("caption", {}, "The most likely tokens at this step"),
    h("thead", {}, h("tr", {}, h("th", {scope: "col"}, h("span", {className: "visually-hidden"}, "chosen")),
      h("th", {scope: "col"}, "token"), h("th", {scope: "col"}, "p"),
      h("th", {scope: "col", title: "probability after temperature: what the sampler drew from"}, "p after temp."),
      h("th", {scope: "col"}, "sampler"))),
    body);
  const wrap = h("div", {className: "table-wrap"}, table);
  if (cut && !cutShown) {
    wrap.append(h("p", {className: "card-note"}, `${cutLabel} (the cut removed none of the listed tokens)`));
  }
  return wrap;
}

// ---------------------------------------------------------------- rows of token boxes (the inspection views)

/** A token's text with its whitespace made visible, on one line (a box's line break comes after the box). */
function boxText(text) {
  return text === "" ? h("span", {className: "bytes"}, "(empty)") : visibleText(text, {lineBreaks: false});
}

/** Token boxes in a row: build(i, text) makes box i; special[i] (the inspection's) marks a control token
    such as <|im_start|>, drawn apart. A line may break between any two boxes, and does after a box holding
    a newline, so that a rendered chat template keeps its lines. */
function tokenBoxes(texts, special, build) {
  const fragment = document.createDocumentFragment();
  texts.forEach((text, i) => {
    const box = build(i, text);
    if (special[i]) box.classList.add("special-token");
    fragment.append(h("wbr"), box);
    if (text.includes("\n")) fragment.append(h("br"));
  });
  return fragment;
}

/** One tab stop for a row of items (roving tabindex): ←/→/Home/End move, and onFocus(i) tells about
    item i whenever it gets the focus or a click. */
function roving(container, items, onFocus) {
  let active = 0;
  items.forEach((el, i) => el.setAttribute("tabindex", i === 0 ? "0" : "-1"));
  const go = (i, focus) => {
    items[active].setAttribute("tabindex", "-1");
    active = i;
    items[i].setAttribute("tabindex", "0");
    if (focus) items[i].focus();
    onFocus(i);
  };
  container.addEventListener("keydown", (event) => {
    const moves = {ArrowRight: active + 1, ArrowLeft: active - 1, Home: 0, End: items.length - 1};
    if (!(event.key in moves)) return;
    event.preventDefault();
    go(Math.max(0, Math.min(moves[event.key], items.length - 1)), true);
  });
  const itemOf = (event) => items.findIndex((el) => el.contains(event.target));
  container.addEventListener("focusin", (event) => { const i = itemOf(event); if (i >= 0) go(i, false); });
  container.addEventListener("click", (event) => { const i = itemOf(event); if (i >= 0) go(i, false); });
}

function quoted(text) {
  return h("span", {className: "card-glyph"}, "“", boxText(text), "”");
}

/** The note every view of a recomputed number carries. */
function recomputedNote(...what) {
  return h("p", {className: "recomputed"}, ...what, h("strong", {}, `Numbers ${RECOMPUTED}.`));
}

// ---------------------------------------------------------------- a reply's prompt, as the model sees it

/** "Prompt as the model sees it": the conversation rendered with the chat template, a box per token,
    their ids on request. Folded by default: it is long, and only sometimes what a student is after. */
class PromptView {
  constructor() {
    this.count = h("span", {className: "prompt-count"}, "(loading…)");
    this.ids = h("input", {type: "checkbox", className: "show-ids"});
    this.tokens = h("div", {className: "prompt-tokens"}, h("p", {className: "inspect-loading"}, "loading…"));
    this.el = h("details", {className: "prompt-view", "data-state": "loading"},
      h("summary", {}, "Prompt as the model sees it ", this.count),
      h("div", {className: "prompt-body"},
        h("p", {className: "card-note"}, "The conversation rendered with the chat template and split into tokens by " +
          "the server (POST /v1/inspect): what the model read before writing this reply. One box per token; " +
          "· is a space, ↵ a newline."),
        h("label", {className: "switch"}, this.ids, "show ids"),
        this.tokens));
    this.ids.addEventListener("change", () => this.tokens.classList.toggle("show-ids", this.ids.checked));
  }

  fill({token_ids: ids, tokens, special}) {
    this.count.textContent = `· ${ids.length} tokens`;
    this.tokens.replaceChildren(tokenBoxes(tokens, special, (i, text) => h("span",
      {className: "ptok", "data-id": String(ids[i]), "data-pos": String(i), title: `position ${i}, token id ${ids[i]}`},
      h("span", {className: "ptext"}, boxText(text)), h("span", {className: "tid"}, String(ids[i])))));
    this.el.dataset.state = "done";
  }

  fail(error) {
    this.count.textContent = "· could not be inspected";
    this.tokens.replaceChildren(errorBox(error, {alert: false}));
    this.el.dataset.state = "error";
  }
}

// ---------------------------------------------------------------- how surprising was the user's message

/** The user message's side of the token view: the tokens of its turn, shaded by the probability the model
    gave each one after everything before it (teacher forcing). They are the reply's prompt inspection's
    logprobs over that turn (message_tokens): a token's logprob depends only on the tokens before it, so
    the prompt that follows the message changes none of them. */
const userView = {
  create() {
    return h("div", {className: "user-view"}, loadingNote("how surprising your message was"));
  },

  fill(userEl, inspection, messageIndex, content) {
    const view = userEl.querySelector(".user-view");
    const span = inspection.message_tokens?.[messageIndex];
    if (!span) {
      view.replaceChildren(h("p", {className: "card-note"}, "This chat template does not show where each " +
        "message's tokens are, so your message's tokens cannot be picked out."));
      userEl.dataset.inspected = "error";
      return;
    }
    const positions = Array.from({length: span[1] - span[0]}, (_, k) => span[0] + k);
    const texts = positions.map((pos) => inspection.tokens[pos]);
    const own = this.ownTokens(texts, content);
    const items = [];
    const group = h("div", {className: "user-tokens", role: "group",
      "aria-label": "Your message's tokens: arrow keys move, each one's log-probability is read out below"},
    tokenBoxes(texts, positions.map((pos) => inspection.special[pos]), (k, text) => {
      const pos = positions[k];
      const logprob = inspection.logprobs[pos];
      const shade = !own[k] ? "template" : logprob === null ? "no-logprob" : `b${binOfLogprob(logprob)}`;
      const el = h("span", {className: `tok ${shade}`,
        "data-pos": String(pos), "data-logprob": logprob === null ? "" : String(logprob),
        title: `position ${pos}: log p ${fmtLogprob(logprob)}`,
        "aria-label": `${JSON.stringify(text)}, log p ${fmtLogprob(logprob)}`}, boxText(text));
      items.push(el);
      return el;
    }));
    const readout = h("p", {className: "user-readout", "aria-live": "polite"}, "Focus or click a token for its numbers.");
    roving(group, items, (k) => {
      const pos = positions[k];
      const logprob = inspection.logprobs[pos];
      readout.replaceChildren(quoted(texts[k]), own[k] ? "" : " (template)",
        ` · position ${pos} · token id ${inspection.token_ids[pos]} · `,
        logprob === null ? "the first token: nothing before it to predict it from"
          : h("span", {className: "readout-num"}, `log p ${fmtLogprob(logprob)}`));
    });
    view.replaceChildren(
      recomputedNote("How surprising was your message: each token of your text shaded by the probability the " +
        "model gave it after everything before it (the template's tokens, dashed, are not shaded). "),
      group, this.leastExpected(positions.filter((_, k) => own[k]), inspection), readout);
    userEl.dataset.inspected = "done";
  },

  /** Which tokens of the turn hold the user's own text (true) rather than the template's: where the turn's
      text contains the message (its last occurrence: the template writes the message last), the tokens
      overlapping it. All of them where it cannot be found (a template that changes the text, or a
      character split over tokens, whose pieces read as U+FFFD). */
  ownTokens(texts, content) {
    const joined = texts.join("");
    const at = content ? joined.lastIndexOf(content) : -1;
    if (at < 0) return texts.map(() => true);
    let start = 0;
    return texts.map((text) => {
      const end = start + text.length;
      const overlaps = end > at && start < at + content.length;
      start = end;
      return overlaps;
    });
  },

  /** The least likely of these tokens, as the server scored them (a pick, not a computation). */
  leastExpected(positions, inspection) {
    const scored = positions.filter((pos) => inspection.logprobs[pos] !== null);
    if (!scored.length) return null;
    const pos = scored.reduce((a, b) => (inspection.logprobs[b] < inspection.logprobs[a] ? b : a));
    return h("p", {className: "card-note"}, `${positions.length} tokens; the least expected: `,
      quoted(inspection.tokens[pos]), ` at position ${pos}, log p ${fmtLogprob(inspection.logprobs[pos])}`);
  },

  fail(userEl, error) {
    userEl.querySelector(".user-view").replaceChildren(errorBox(error, {alert: false}));
    userEl.dataset.inspected = "error";
  },
};

// ---------------------------------------------------------------- the Layers tab: the logit lens

const LENS_TOP = 5;                 // candidates per layer
const RANK_BINS = [1, 5, 20, 100];  // rank shading (#1, 2–5, 6–20, 21–100, beyond) on the probability palette

function rankBin(rank) {
  const i = RANK_BINS.findIndex((limit) => rank <= limit);
  return i === -1 ? RANK_BINS.length : i;
}

/** The first layer from which the chosen token stays rank 1 to the end; null if the last layer does not
    rank it first (the sampler drew a less likely token). */
function formingLayer(layers) {
  let from = null;
  for (let l = layers.length - 1; l >= 0 && layers[l].next_token?.rank === 1; l--) from = l;
  return from;
}

/** The logit lens at the position that chose the token: one row per layer, the chosen token's rank first. */
function layersView({inspection, position}) {
  const layers = inspection.logit_lens[0];
  const last = layers.length - 1;
  const chosen = layers[last].next_token; // the reply's token, as the server names it
  const forms = formingLayer(layers);
  const sentence = forms === null ? [" is not the most likely token even at the last layer (rank ",
    `#${chosen.rank}`, "): the sampler drew a less likely one."]
    : forms === 0 ? [" is the most likely token at every layer, from the embeddings on."]
    : forms === last ? [` becomes the most likely token only at the last layer (${last}).`]
    : [` is the most likely token from layer ${forms} of ${last} on (◆).`];
  const body = h("tbody");
  layers.forEach((row, l) => body.append(lensRow(row, l, last, forms)));
  const table = h("table", {className: "lens"},
    h("caption", {}, "What each layer would predict here, and where ", quoted(chosen.token), " ranks"),
    h("thead", {}, h("tr", {},
      h("th", {scope: "col"}, "layer"),
      h("th", {scope: "col", title: "rank of the token that was chosen, at this layer"}, "rank"),
      h("th", {scope: "col", title: "log-probability of the chosen token at this layer"}, "log p"),
      h("th", {scope: "col"}, `top ${LENS_TOP} (▶ chosen)`),
      h("th", {scope: "col", className: "entropy", title: "entropy of this layer's whole distribution, in nats"},
        "entropy"))),
    body);
  return h("div", {className: "lens-view"},
    recomputedNote(`The logit lens at position ${position}, the token before this one: what each layer would ` +
      `predict if the model stopped there (0: the embeddings alone; ${last}: the model's own output). `),
    h("p", {className: "lens-summary"}, quoted(chosen.token), ...sentence),
    rankStrip(layers, forms),
    h("div", {className: "table-wrap"}, table),
    h("p", {className: "card-note lens-legend"}, "rank shading: ",
      ...["#1", "2–5", "6–20", "21–100", "> 100"].map((label, b) => h("span", {className: `rank b${b}`}, label)),
      " · entropy in nats (low: confident)"));
}

function lensRow(row, l, last, forms) {
  const next = row.next_token;
  const layerName = l === 0 ? "embed." : l === last ? "output" : null;
  const candidates = row.top.map((c) => {
    const isChosen = c.token_id === next.token_id;
    return h("span", {className: `lens-cand${isChosen ? " chosen" : ""}`, title: `log p ${fmtLogprob(c.logprob)}`},
      isChosen ? h("span", {"aria-hidden": "true"}, "▶") : null,
      isChosen ? h("span", {className: "visually-hidden"}, "chosen: ") : null, boxText(c.token));
  });
  return h("tr", {className: `lens-row${l === forms ? " lens-forms" : ""}`, "data-layer": String(l),
    "data-rank": String(next.rank), "data-logprob": String(next.logprob)},
  h("th", {scope: "row", className: "layer"}, String(l), layerName ? h("span", {className: "layer-name"}, layerName) : null),
  h("td", {className: "num"}, h("span", {className: `rank b${rankBin(next.rank)}`}, `#${next.rank}`),
    l === forms ? h("span", {className: "forms-mark", title: "from here on the most likely"}, " ◆") : null,
    l === forms ? h("span", {className: "visually-hidden"}, " (the most likely from this layer on)") : null),
  // On a narrow screen the entropy column folds into this cell (chat.css), to leave room for the candidates.
  h("td", {className: "num"}, fmtLogprob(next.logprob),
    h("span", {className: "entropy-inline"}, `H ${row.entropy.toFixed(2)}`)),
  h("td", {className: "cands"}, ...candidates),
  h("td", {className: "num entropy"}, row.entropy.toFixed(2)));
}

/** The chosen token's rank at every layer as one row of cells, to see at a glance where it forms
    (the table below has the numbers; the ◆ marks the layer from which it stays first). */
function rankStrip(layers, forms) {
  const last = layers.length - 1;
  return h("div", {className: "rank-strip-wrap", "aria-hidden": "true"},
    h("span", {className: "rank-strip-end"}, "layer 0"),
    h("div", {className: "rank-strip"}, ...layers.map((row, l) => h("span",
      {className: `rank-cell b${rankBin(row.next_token.rank)}`, title: `layer ${l}: #${row.next_token.rank}`},
      l === forms ? "◆" : ""))),
    h("span", {className: "rank-strip-end"}, String(last)));
}

// ---------------------------------------------------------------- the Attention tab

// The card's choices, kept from one token to the next.
const attentionChoice = {layer: 0, head: 0, hideSink: false, average: false};

/** The mean of a layer's heads, position by position: computed here (the view says so). */
function meanOfHeads(rows) {
  return rows[0].map((_, i) => rows.reduce((sum, row) => sum + row[i], 0) / rows.length);
}

/** Position 0 hidden (null) and the other weights divided by their sum, so that they add up to 1 again:
    computed here (the view says so). The first token often takes most of the weight as a resting place
    (an "attention sink"), which flattens everything else. */
function withoutSink(row) {
  const rest = row.slice(1).reduce((sum, w) => sum + w, 0);
  return [null, ...row.slice(1).map((w) => (rest > 0 ? w / rest : 0))];
}

/** A thumbnail: the row's weights as bars, scaled to its own largest (a head's shape, whatever its
    spread). A pixel column covering several positions shows the largest, so a spike never vanishes. */
function drawThumb(canvas, weights) {
  const ctx = canvas.getContext("2d");
  if (!ctx) return;
  const {width, height} = canvas;
  ctx.clearRect(0, 0, width, height);
  const max = weights.reduce((m, w) => (w !== null && w > m ? w : m), 0);
  if (!(max > 0)) return;
  ctx.fillStyle = "#08306b";
  const n = weights.length;
  for (let x = 0; x < width; x++) {
    const from = Math.floor((x * n) / width);
    const to = Math.max(from + 1, Math.floor(((x + 1) * n) / width));
    let w = 0;
    for (let i = from; i < to && i < n; i++) w = Math.max(w, weights[i] ?? 0);
    const bar = Math.round((height * w) / max);
    if (bar > 0) ctx.fillRect(x, height - bar, 1, bar);
  }
}

/** The Attention tab: a layer × head grid of thumbnails to pick from, and the picked row's weights shown
    as the shade of every earlier token. */
function attentionView({inspection, position}) {
  const rows = new Map(inspection.attention.map((a) => [`${a.layer}:${a.head}`, a.weights[0]]));
  const nLayers = 1 + Math.max(...inspection.attention.map((a) => a.layer));
  const nHeads = 1 + Math.max(...inspection.attention.map((a) => a.head));
  const choice = attentionChoice;
  choice.layer = Math.min(choice.layer, nLayers - 1);
  choice.head = Math.min(choice.head, nHeads - 1);
  const texts = inspection.tokens.slice(0, position + 1);

  const headWeights = (layer, head) => {
    const row = rows.get(`${layer}:${head}`);
    return choice.hideSink ? withoutSink(row) : row;
  };
  const shownWeights = () => {
    const layerRows = Array.from({length: nHeads}, (_, head) => rows.get(`${choice.layer}:${head}`));
    const row = choice.average ? meanOfHeads(layerRows) : rows.get(`${choice.layer}:${choice.head}`);
    return choice.hideSink ? withoutSink(row) : row;
  };

  const hideSink = h("input", {type: "checkbox", id: "att-hide-sink", checked: choice.hideSink ? "" : null});
  const average = h("input", {type: "checkbox", id: "att-average", checked: choice.average ? "" : null});
  const grid = attentionGrid(nLayers, nHeads);
  const heading = h("p", {className: "att-heading", "aria-live": "polite"});
  const stripItems = [];
  const strip = h("div", {className: "att-strip", role: "group",
    "aria-label": "Earlier tokens, shaded by attention weight: arrow keys move, the weight is read out below"},
  tokenBoxes(texts, inspection.special, (i, text) => {
    const el = h("span", {className: `att-tok${i === position ? " att-query" : ""}`, "data-pos": String(i)}, boxText(text));
    stripItems.push(el);
    return el;
  }), h("span", {className: "att-next", title: "the token chosen here"}, "→ ", boxText(inspection.tokens[position + 1])));
  const top = h("ol", {className: "att-top"});
  const readout = h("p", {className: "att-readout", "aria-live": "polite"}, "Focus or click a token for its weight.");
  let shown = shownWeights();

  const drawThumbs = () => grid.thumbs.forEach((thumb) =>
    drawThumb(thumb.querySelector("canvas"), headWeights(Number(thumb.dataset.layer), Number(thumb.dataset.head))));
  const update = () => {
    shown = shownWeights();
    grid.mark(choice);
    heading.replaceChildren(...attentionHeading(choice, nHeads));
    shadeStrip(stripItems, texts, shown);
    fillTopList(top, texts, shown);
    readout.textContent = "Focus or click a token for its weight.";
  };
  grid.onSelect = (layer, head) => { choice.layer = layer; choice.head = head; update(); };
  hideSink.addEventListener("change", () => { choice.hideSink = hideSink.checked; drawThumbs(); update(); });
  average.addEventListener("change", () => { choice.average = average.checked; update(); });
  roving(strip, stripItems, (i) => {
    readout.replaceChildren(quoted(texts[i]), ` · position ${i}: `, shown[i] === null
      ? "the attention sink, hidden" : h("span", {className: "readout-num"}, pct(shown[i])));
  });
  drawThumbs();
  update();

  return h("div", {className: "att-view"},
    recomputedNote(`Attention at position ${position} (outlined), the token before this one: where each head ` +
      "looks while the model computes the next token. "),
    h("div", {className: "att-options"},
      h("label", {className: "switch"}, hideSink, "hide the first token (the “attention sink”), renormalise the rest"),
      h("label", {className: "switch"}, average, "average the heads of the layer")),
    h("p", {className: "card-note"}, `Pick a head: ${nLayers} layers × ${nHeads} heads (↑↓ layer, ←→ head); ` +
      "each thumbnail is one head's weights, scaled to its largest."),
    h("div", {className: "att-grid-wrap"}, grid.el),
    heading,
    h("p", {className: "card-note"}, "Darker: more weight (relative to the largest weight shown)."),
    strip, readout,
    h("p", {className: "att-top-title"}, "Most attended:"), top);
}

/** The grid of thumbnails: a radio group walked in two dimensions (↑↓ layers, ←→ heads, Home/End). */
function attentionGrid(nLayers, nHeads) {
  const grid = {thumbs: [], onSelect: () => {}, el: null, mark: null};
  const cells = [h("span", {"aria-hidden": "true"})];
  for (let head = 0; head < nHeads; head++) cells.push(h("span", {className: "att-col", "aria-hidden": "true"}, `h${head}`));
  for (let layer = 0; layer < nLayers; layer++) {
    cells.push(h("span", {className: "att-row-label", "aria-hidden": "true"}, `L${layer}`));
    for (let head = 0; head < nHeads; head++) {
      const thumb = h("button", {type: "button", role: "radio", className: "att-thumb", "data-layer": String(layer),
        "data-head": String(head), "aria-label": `layer ${layer}, head ${head}`, tabindex: "-1"},
      h("canvas", {width: "48", height: "18", "aria-hidden": "true"}));
      grid.thumbs.push(thumb);
      cells.push(thumb);
    }
  }
  grid.el = h("div", {className: "att-grid", role: "radiogroup",
    "aria-label": `Attention heads, ${nLayers} layers × ${nHeads} heads: arrow keys choose`,
  style: `grid-template-columns: auto repeat(${nHeads}, minmax(0, 1fr))`}, ...cells);
  const at = (layer, head) => grid.thumbs[layer * nHeads + head];
  const clamp = (x, n) => Math.max(0, Math.min(x, n - 1));
  grid.mark = ({layer, head, average}) => grid.thumbs.forEach((thumb) => {
    const l = Number(thumb.dataset.layer), hd = Number(thumb.dataset.head);
    const checked = l === layer && hd === head;
    thumb.setAttribute("aria-checked", String(checked));
    thumb.setAttribute("tabindex", checked ? "0" : "-1");
    thumb.classList.toggle("in-average", average && l === layer); // the average covers the whole row
  });
  grid.el.addEventListener("keydown", (event) => {
    const {layer, head} = attentionChoice;
    const moves = {ArrowUp: [layer - 1, head], ArrowDown: [layer + 1, head], ArrowLeft: [layer, head - 1],
      ArrowRight: [layer, head + 1], Home: [layer, 0], End: [layer, nHeads - 1]};
    if (!(event.key in moves)) return;
    event.preventDefault();
    const [l, hd] = moves[event.key];
    grid.onSelect(clamp(l, nLayers), clamp(hd, nHeads));
    at(attentionChoice.layer, attentionChoice.head).focus();
  });
  grid.el.addEventListener("click", (event) => {
    const thumb = event.target.closest(".att-thumb");
    if (thumb) grid.onSelect(Number(thumb.dataset.layer), Number(thumb.dataset.head));
  });
  return grid;
}

function attentionHeading({layer, head, hideSink, average}, nHeads) {
  const parts = [h("strong", {}, average ? `Layer ${layer}, the mean of its ${nHeads} heads` : `Layer ${layer}, head ${head}`)];
  if (average) parts.push(" (averaged in your browser)");
  if (hideSink) parts.push("; the first token hidden, the others renormalised to add up to 100 % (in your browser)");
  return parts;
}

/** Shade each earlier token by its weight: one hue, darker for more (readable for every colour vision),
    the number in its label and title. */
function shadeStrip(items, texts, weights) {
  const max = weights.reduce((m, w) => (w !== null && w > m ? w : m), 0);
  items.forEach((el, i) => {
    const w = weights[i];
    el.classList.toggle("sink-hidden", w === null);
    if (w === null) {
      el.style.removeProperty("--level");
      el.dataset.weight = "";
      el.title = `position ${i}: the attention sink, hidden`;
      el.setAttribute("aria-label", `${JSON.stringify(texts[i])}, attention sink, hidden`);
      return;
    }
    const level = max > 0 ? w / max : 0;
    el.style.setProperty("--level", `${(100 * level).toFixed(1)}%`);
    el.classList.toggle("att-dark", level > 0.6);
    el.dataset.weight = String(w);
    el.title = `position ${i}: ${pct(w)}`;
    el.setAttribute("aria-label", `${JSON.stringify(texts[i])}, ${pct(w)}`);
  });
}

/** The five positions with the largest weights shown, with their numbers. */
function fillTopList(list, texts, weights) {
  const order = weights.map((w, i) => [w, i]).filter(([w]) => w !== null).sort((a, b) => b[0] - a[0]).slice(0, 5);
  list.replaceChildren(...order.map(([w, i]) => h("li", {"data-pos": String(i), "data-weight": String(w)},
    quoted(texts[i]), ` position ${i}: `, h("span", {className: "readout-num"}, pct(w)))));
}

// ---------------------------------------------------------------- the conversation

/** Run an update; keep the conversation scrolled to the bottom if it was there before. */
function keepingScroll(update) {
  const box = $("conversation");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 48;
  update();
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function appendToConversation(el) {
  $("empty-hint").hidden = true;
  const box = $("conversation");
  box.append(el);
  box.scrollTop = box.scrollHeight;
}

/** The sampling settings from the panel: empty fields are left out (the API default). */
function readSettings() {
  const settings = {};
  for (const [key, id, integer] of SETTING_FIELDS) {
    const raw = $(id).value.trim();
    if (raw === "") continue;
    const value = Number(raw);
    if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      throw new Error(`${key} must be ${integer ? "a whole number" : "a number"}, not ${JSON.stringify(raw)}`);
    }
    settings[key] = value;
  }
  const format = $("output-format").value;
  if (format !== "text") settings.response_format = {type: format}; // constrained decoding (a grammar)
  return settings;
}

function startChat() {
  const text = $("input").value;
  if (state.current || text.trim() === "") return;
  let settings;
  try {
    settings = readSettings();
  } catch (err) {
    appendToConversation(errorBox({error: {message: err.message}}));
    return;
  }
  if (!state.open) {
    appendToConversation(errorBox({error: {message: "not connected to the server yet; try again in a moment"}}));
    return;
  }
  if (state.authRequired) {
    const key = $("api-key").value;
    if (!key) {
      const message = "this server needs an API key: enter it above the message box";
      appendToConversation(errorBox({error: {message}}));
      $("api-key").focus();
      return;
    }
    if (key !== state.authSentKey) sendAuth(key);
  }
  const system = $("system-prompt").value;
  const messages = [...(system.trim() ? [{role: "system", content: system}] : []), ...state.history,
    {role: "user", content: text}];
  const id = `r${++state.counter}`;
  const alternatives = $("alternatives").value.trim();
  const request = {type: "chat", id, messages, settings};
  if (alternatives !== "") request.alternatives = Number(alternatives);

  const userEl = h("article", {className: "msg user", "data-inspected": "loading"},
    h("div", {className: "msg-role"}, "you"), h("div", {className: "msg-text"}, text), userView.create());
  appendToConversation(userEl);
  const reply = new Reply(id, text, userEl);
  appendToConversation(reply.el);
  // Before the chat message: the socket handles one message at a time, so the prompt is inspected
  // (one forward pass, no lens or attention) before the reply starts, never while it streams.
  reply.inspectPrompt(messages);
  state.current = reply;
  $("input").value = "";
  setGenerating(true);
  send(request);
}

function setGenerating(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  document.body.dataset.generating = String(on);
}

function endGeneration() {
  state.current = null;
  setGenerating(false);
  inspector.release(); // the inspections asked for while the reply streamed
}

function stop() {
  if (state.current) send({type: "cancel", id: state.current.id});
}

function newChat() {
  card.close(false);
  if (state.current) { // its done event still has to come before the next chat can start
    stop();
    state.current.detached = true;
  }
  state.history = [];
  $("conversation").replaceChildren($("empty-hint"));
  $("empty-hint").hidden = false;
  $("input").focus();
}

function setTokenView(on) {
  document.body.classList.toggle("token-view", on);
  $("legend").hidden = !on;
  if (!on) card.close(false);
}

// ---------------------------------------------------------------- wiring

function init() {
  card.init();
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); startChat(); });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); startChat(); }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("token-view").addEventListener("change", (event) => setTokenView(event.target.checked));
  setTokenView($("token-view").checked);
  $("api-key").addEventListener("change", () => {
    const key = $("api-key").value;
    sessionStorage.setItem(KEY_STORAGE, key);
    if (state.open && key) sendAuth(key);
  });
  // On a narrow screen the settings start folded away, under their summary line.
  if (window.matchMedia("(max-width: 600px)").matches) $("settings").open = false;
  setGenerating(false);
  connect();
}

init();
