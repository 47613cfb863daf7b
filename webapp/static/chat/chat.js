/* refimpl web chat: a conversation whose replies stream in over a WebSocket, with a token view that
   shades every generated token by how likely the model found it and opens its alternatives on a
   click or a key press. One ES module, no dependencies, no build step.

   Safety rule of this file: nothing the model or the user wrote is ever parsed as HTML. Text reaches
   the page through textContent, Element.append(string) and createTextNode only (never innerHTML).

   The WebSocket protocol (ws(s)://<this host>/v1/ws, protocol 1): typed JSON text messages, each an
   object with a "type".

   Client -> server
     {"type": "auth", "api_key": KEY}
         only when hello.auth_required (a browser cannot set an Authorization header on a WebSocket).
     {"type": "chat", "id": "r1", "messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...],
      "settings": {"temperature", "top_p", "top_k", "min_p", "max_tokens", "seed"}, "alternatives": 10}
         id: 1-64 chars, echoed on every event of this reply. Each setting optional; null or absent means
         the API default (temperature 1, top_p 1, top_k off (null or 0), min_p 0, max_tokens up to the
         context end, seed random). alternatives: 10..20, default 10. One chat at a time per socket: a
         second one while one runs gets an error event (status 409, code "request_in_progress").
     {"type": "cancel", "id": "r1"}
         stop that reply; the server then sends its done event with finish_reason "canceled".

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
         removed_by: null, "temperature", "top_k", "top_p" or "min_p" (the first filter that removed it).
         other_p / other_p_temp: the mass of every token not listed. top_p_cut: null when top_p is 1,
         else the setting and the mass (after temperature, among the top-k survivors) of the smallest
         most-likely set reaching it.
         A token group's glyph text: the content's code points from its offset to the next group's
         offset (the last group: to the end of the content received so far).
     {"type": "done", "id", "finish_reason": "stop"|"length"|"canceled", "content": "the whole reply", "request_id",
      "usage": {"prompt_tokens", "completion_tokens", "total_tokens", "avg_tok_per_sec",
                "avg_prompt_tok_per_sec", "avg_compl_tok_per_sec"}}
     {"type": "error", "id": "r1" or null, "status": 400, "error": {"message", "type", "param", "code"}}
         ends that reply (no done follows); the socket stays open.

   DOM hooks (for people reading the page and for tests/test_webchat_browser.py): each reply is an
   <article class="msg assistant"> with data-id, data-state ("streaming" | "done" | "error"),
   data-tokens (token events received) and data-finish-reason; its plain text is .reply-text, its
   token view .reply-tokens with one span.tok per token group (classes b0..b4 = probability bins).
   The card is #token-card; its rows are tr.alt (.chosen, .filtered), tr.top-p-cut and tr.other.
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
    case "error":
      onError(message);
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

function errorBox(message) {
  const err = message.error || {};
  const head = ["Error", message.status || null, err.code ? `(${err.code})` : null].filter(Boolean).join(" ");
  const box = h("div", {className: "error-box", role: "alert"},
    h("strong", {}, `${head}: `), err.message || "unknown error");
  if (err.param) box.append(h("span", {className: "error-param"}, ` (field: ${err.param})`));
  return box;
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
    this.tokenCount = 0;
    this.active = 0;       // the group that holds the reply's one tab stop
    this.detached = false; // "New chat" removed it from the page while it was still generating

    this.textEl = h("div", {className: "reply-text"});
    this.tokensEl = h("div", {className: "reply-tokens", role: "group",
      "aria-label": "Reply tokens: arrow keys move between tokens, Enter opens a token's card"});
    this.metaEl = h("div", {className: "msg-meta"}, "generating…");
    this.el = h("article", {className: "msg assistant", "data-id": id, "data-state": "streaming", "data-tokens": "0",
      "aria-busy": "true"}, h("div", {className: "msg-role"}, "model"), this.textEl, this.tokensEl, this.metaEl);

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

  addTokenNow(token) {
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

const card = {
  el: null, body: null, reply: null, group: -1,

  init() {
    this.el = $("token-card");
    this.body = $("token-card-body");
    $("token-card-close").addEventListener("click", () => this.close(true));
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && !this.el.hidden) { event.preventDefault(); this.close(true); }
    });
    document.addEventListener("pointerdown", (event) => {
      if (!this.el.hidden && !this.el.contains(event.target) && !event.target.closest(".tok")) this.close(false);
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
    clearExpanded();
    group.el.setAttribute("aria-expanded", "true");
    this.el.hidden = false;
    this.place();
    this.el.focus();
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

  const userEl = h("article", {className: "msg user"}, h("div", {className: "msg-role"}, "you"),
    h("div", {className: "msg-text"}, text));
  appendToConversation(userEl);
  const reply = new Reply(id, text, userEl);
  appendToConversation(reply.el);
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
