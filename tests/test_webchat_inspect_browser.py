"""The web chat's inspection views (POST /v1/inspect over the page's WebSocket) in a real browser:
headless Chromium under selenium, against `refimpl serve` on a tiny random model.

What a student relies on: each reply's prompt as the model read it (the chat template rendered, one
box per token, ids on request, the count); a token card's Layers tab (the logit lens at the
position that chose the token, the chosen token's rank at every layer, the layer from which it stays
first) and Attention tab (a layer x head grid of thumbnails walked with the arrow keys, the picked
row's weights on the earlier tokens, the sink hidden and the heads averaged on request, and said
so); a user message shaded by how likely the model found each of its tokens; every number the
server's own, fetched once per token; all of it by keyboard, and on a 375 px screen without sideways
scrolling. Screenshots go to $REFIMPL_ARTIFACTS (default test-artifacts/): inspect-prompt.png,
inspect-layers.png, inspect-attention.png, inspect-user.png, inspect-narrow-layers.png,
inspect-narrow.png (the Attention tab at 375 px) and inspect-narrow-default-size.png (the grid of a
30-layer, 9-head model at 375 px).

The model is golden/tiny/llama-untied with server_helpers' ChatML tokenizer (2 layers x 4 heads),
not conftest's tiny_chat_model_dir: that one's sliding window of 16 gives the first token no weight
at all past position 16, where every reply token of a chat is, and hiding the "attention sink" must
change what is shown.

The page's DOM hooks are listed in the header comment of webapp/static/chat/chat.js.
"""

import math

import pytest
import requests

from browser_helpers import artifacts_dir
from server_helpers import LiveServer, tiny_model_dir
# The page's helpers and fixtures (browser_ready, browser: a fresh headless Chromium per test).
from test_webchat_browser import (active, browser, browser_ready, last_reply, open_card_of, press,  # noqa: F401
                                  record_sent_messages, reply_in_token_view, send_message, set_field, settings,
                                  wait_done, wait_for)

RECOMPUTED = "recomputed by a fresh forward pass, not from the sampling step"
BINS = [0.9, 0.5, 0.2, 0.05]  # the page's probability bins (chat.js BINS), most likely first


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-inspect"), source="llama-untied")


@pytest.fixture(scope="module")
def server(browser_ready, model_dir, tmp_path_factory):
    live = LiveServer(model_dir, log_path=tmp_path_factory.mktemp("webchat-inspect") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def endless_server(browser_ready, endless_chat_model_dir, tmp_path_factory):
    """Replies here never end by themselves (conftest.endless_chat_model_dir): a tab is opened while one streams."""
    live = LiveServer(endless_chat_model_dir, log_path=tmp_path_factory.mktemp("webchat-inspect-endless") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def layers(model_dir):
    import json

    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


# ---------------------------------------------------------------- helpers

def inspect(server, body):
    """POST /v1/inspect: the server's numbers, fetched apart from the page."""
    response = requests.post(f"{server.base}/v1/inspect", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def visible(text):
    """A token's text as the page shows it: space ·, newline ↵, tab →, other control characters \\xNN."""
    out = []
    for ch in text:
        code = ord(ch)
        out.append("·" if ch == " " else "↵" if ch == "\n" else "→" if ch == "\t"
                   else f"\\x{code:02x}" if code < 0x20 or code == 0x7f else ch)
    return "".join(out) or "(empty)"


def pct(x):
    """The page's pct(): a probability as a percentage, never "0 %" for a small non-zero value."""
    if x == 0:
        return "0"
    if x < 0.001:
        return "<0.1 %"
    if 0.999 < x < 1:
        return ">99.9 %"
    return f"{100 * x:.1f} %"


def sent(driver, kind):
    return [m["message"] for m in driver.execute_script("return window.sentMessages") if m["message"]["type"] == kind]


def prompt_request(driver, reply_number=-1):
    """The inspect request the page sent for a reply's prompt (the messages of its chat message)."""
    return [m["request"] for m in sent(driver, "inspect") if "messages" in m["request"]][reply_number]


def pick_token(driver):
    """A reply token to inspect: (index in the reply, its group element): the first group of a single
    token after the first one (its previous position is then a reply token as well)."""
    groups = last_reply(driver).find_elements("css selector", ".reply-tokens .tok")
    index = 0
    for k, group in enumerate(groups):
        ids = group.get_attribute("data-token-ids").split()
        if k >= 1 and len(ids) == 1 and "special" not in group.get_attribute("class"):
            return index, group
        index += len(ids)
    pytest.fail("no reply token of its own to inspect")


def reply_ids(driver):
    groups = last_reply(driver).find_elements("css selector", ".reply-tokens .tok")
    return [int(i) for group in groups for i in group.get_attribute("data-token-ids").split()]


def token_request(driver, index, asked):
    """The inspect body behind reply token `index`'s tab: the prompt and the reply up to that token,
    looked at from the position before it."""
    prompt = prompt_ids(driver)
    ids = prompt + reply_ids(driver)[:index + 1]
    return {"prompt": ids, "positions": [len(prompt) + index - 1], **asked}


def prompt_ids(driver):
    return [int(box.get_attribute("data-id")) for box in
            last_reply(driver).find_elements("css selector", ".prompt-tokens .ptok")]


def open_tab_by_keyboard(driver, name):
    """From the card just opened (focus on the card): Tab to the tab list, then arrows to the tab `name`."""
    from selenium.webdriver.common.keys import Keys

    for _ in range(4):
        press(driver, Keys.TAB)
        if active(driver).get_attribute("role") == "tab":
            break
    assert active(driver).get_attribute("role") == "tab", "Tab did not reach the card's tabs"
    for _ in range(3):
        if active(driver).get_attribute("data-tab") == name:
            break
        press(driver, Keys.ARROW_RIGHT)
    assert active(driver).get_attribute("data-tab") == name and active(driver).get_attribute("aria-selected") == "true"
    panel = driver.find_element("id", f"panel-{name}")
    assert panel.is_displayed()
    wait_for(driver, lambda: panel.get_attribute("data-state") != "loading", f"the {name} tab did not load", 60)
    assert panel.get_attribute("data-state") == "done", panel.text
    return panel


def strip_data(driver):
    return driver.execute_script("""
        return [...document.querySelectorAll('#panel-attention .att-strip .att-tok')].map((el) => ({
            pos: Number(el.dataset.pos), weight: el.dataset.weight === '' ? null : Number(el.dataset.weight),
            sinkHidden: el.classList.contains('sink-hidden'), title: el.title}));""")


def fits(driver):
    """Sideways overflow of the page, of the card and of anything inside it (0 each: nothing scrolls sideways)."""
    return driver.execute_script("""
        const root = document.documentElement, card = document.getElementById('token-card');
        const r = card.getBoundingClientRect();
        const inner = [...card.querySelectorAll('*')].filter((el) => el.offsetParent !== null)
            .map((el) => el.getBoundingClientRect().right - r.right).reduce((a, b) => Math.max(a, b), 0);
        return {page: root.scrollWidth - root.clientWidth, card: card.scrollWidth - card.clientWidth,
                cardInside: r.left >= 0 && r.right <= innerWidth, innerOverflow: Math.max(0, Math.round(inner))};""")


FITS = {"page": 0, "card": 0, "cardInside": True, "innerOverflow": 0}


# ---------------------------------------------------------------- tests

def test_prompt_view_shows_the_rendered_template_token_by_token_with_ids(server, browser):
    from selenium.webdriver.common.keys import Keys

    driver = browser(server.base)
    record_sent_messages(driver)
    set_field(driver, "system-prompt", "Be brief.")
    settings(driver, max_tokens=6, seed=1)
    send_message(driver, "What is a token?")
    wait_done(driver)
    # The prompt is inspected just before the chat message (the socket answers it before the reply starts),
    # with exactly the chat's messages; nothing else is asked for until a tab is opened.
    messages = [m["message"] for m in driver.execute_script("return window.sentMessages")]
    assert [m["type"] for m in messages] == ["inspect", "chat"]
    assert messages[0]["request"] == {"messages": messages[1]["messages"], "add_generation_prompt": True}
    expected = inspect(server, messages[0]["request"])

    reply = last_reply(driver)
    view = reply.find_element("css selector", "details.prompt-view")
    wait_for(driver, lambda: view.get_attribute("data-state") == "done", "the prompt view was not filled")
    assert view.get_attribute("open") is None, "the prompt view should start folded"
    summary = view.find_element("css selector", "summary")
    driver.execute_script("arguments[0].focus()", summary)
    press(driver, Keys.ENTER)  # a <summary> opens by keyboard
    assert view.get_attribute("open") is not None
    assert view.find_element("css selector", ".prompt-count").text == f"· {len(expected['token_ids'])} tokens"
    assert reply.get_attribute("data-prompt-tokens") == str(len(expected["token_ids"]))
    assert "Be brief." in expected["text"] and "What is a token?" in expected["text"]

    def boxes():
        return driver.execute_script("""
            return [...arguments[0].querySelectorAll('.ptok')].map((el) => ({
                id: Number(el.dataset.id), pos: Number(el.dataset.pos),
                text: el.querySelector('.ptext').textContent, special: el.classList.contains('special-token'),
                idShown: getComputedStyle(el.querySelector('.tid')).display !== 'none',
                idText: el.querySelector('.tid').textContent}));""", view)

    shown = boxes()
    assert [b["id"] for b in shown] == expected["token_ids"]
    assert [b["pos"] for b in shown] == list(range(len(expected["token_ids"])))
    assert [b["text"] for b in shown] == [visible(t) for t in expected["tokens"]]
    assert [b["special"] for b in shown] == expected["special"] and any(expected["special"])
    assert not any(b["idShown"] for b in shown), "ids are shown before the toggle"

    toggle = view.find_element("css selector", "input.show-ids")
    press(driver, Keys.TAB)
    assert active(driver) == toggle, "the show-ids toggle is not the next tab stop"
    press(driver, " ")
    shown = boxes()
    assert all(b["idShown"] and b["idText"] == str(b["id"]) for b in shown), "show ids did not show every id"
    assert view.find_element("css selector", ".ptok .tid").is_displayed()
    driver.save_screenshot(str(artifacts_dir() / "inspect-prompt.png"))
    press(driver, " ")
    assert not any(b["idShown"] for b in boxes()), "the ids stayed after the toggle was turned off"


def test_layers_tab_shows_where_the_chosen_token_forms(server, browser, layers):
    from selenium.webdriver.common.keys import Keys

    driver = browser(server.base)
    record_sent_messages(driver)
    # Greedy, so that the chosen token is first at the last layer and some layer starts its run.
    reply_in_token_view(driver, "Where does the answer form?", temperature=0, max_tokens=10)
    index, group = pick_token(driver)
    open_card_of(driver, group)
    assert len(sent(driver, "inspect")) == 1, "an inspection was asked for before its tab was opened"
    panel = open_tab_by_keyboard(driver, "layers")

    body = token_request(driver, index, {"logit_lens": {"top": 5}})
    assert sent(driver, "inspect")[-1]["request"] == body, "the page did not ask for the token's own position"
    expected = inspect(server, body)["logit_lens"][0]
    rows = driver.execute_script("""
        return [...document.querySelectorAll('#panel-layers table.lens tbody tr')].map((tr) => ({
            layer: Number(tr.dataset.layer), rank: Number(tr.dataset.rank), logprob: Number(tr.dataset.logprob),
            cells: [...tr.cells].map((td) => td.textContent), forms: tr.classList.contains('lens-forms'),
            candidates: [...tr.querySelectorAll('.lens-cand')].map((c) => ({
                text: c.textContent, chosen: c.classList.contains('chosen')}))}));""")
    assert len(rows) == layers + 1 == len(expected), "not one row per layer 0..L"
    chosen_id = reply_ids(driver)[index]
    for row, layer in zip(rows, expected):
        nxt = layer["next_token"]
        assert nxt["token_id"] == chosen_id
        assert row["layer"] == layer["layer"] and row["rank"] == nxt["rank"] and row["logprob"] == nxt["logprob"]
        assert row["cells"][1].startswith(f"#{nxt['rank']}"), f"the rank shown is not the server's: {row}"
        assert row["cells"][2].startswith(f"{nxt['logprob']:.3f}")
        assert row["cells"][-1] == f"{layer['entropy']:.2f}"
        marks = ["▶chosen: " if c["token_id"] == chosen_id else "" for c in layer["top"]]
        assert [c["text"] for c in row["candidates"]] == [m + visible(c["token"]) for m, c in zip(marks, layer["top"])]
    assert expected[-1]["next_token"]["rank"] == 1  # greedy
    forms = next(l for l in range(len(expected)) if all(x["next_token"]["rank"] == 1 for x in expected[l:]))
    assert [r["forms"] for r in rows] == [l == forms for l in range(len(rows))], "the wrong layer is highlighted"
    assert "◆" in rows[forms]["cells"][1]
    text = panel.text
    assert RECOMPUTED in text and f"position {body['positions'][0]}" in text
    assert "most likely" in panel.find_element("css selector", ".lens-summary").text
    driver.save_screenshot(str(artifacts_dir() / "inspect-layers.png"))

    # Cached per token: leaving the tab and coming back asks nothing more.
    asked = len(sent(driver, "inspect"))
    press(driver, Keys.ARROW_LEFT)
    press(driver, Keys.ARROW_RIGHT)
    assert panel.get_attribute("data-state") == "done" and len(sent(driver, "inspect")) == asked


def test_attention_tab_picks_a_head_by_keyboard_and_shades_the_earlier_tokens(server, browser, layers):
    from selenium.webdriver.common.keys import Keys

    driver = browser(server.base)
    record_sent_messages(driver)
    reply_in_token_view(driver, "Look back", temperature=0.7, max_tokens=8, seed=3)
    index, group = pick_token(driver)
    open_card_of(driver, group)
    panel = open_tab_by_keyboard(driver, "attention")
    body = token_request(driver, index, {"attention": {"layers": "all", "heads": "all"}})
    assert sent(driver, "inspect")[-1]["request"] == body
    position = body["positions"][0]
    expected = inspect(server, body)["attention"]
    rows = {(a["layer"], a["head"]): a["weights"][0] for a in expected}
    heads = 1 + max(h for _, h in rows)

    thumbs = driver.execute_script("""return [...document.querySelectorAll('#panel-attention .att-grid .att-thumb')]
        .map((b) => [Number(b.dataset.layer), Number(b.dataset.head), b.getAttribute('aria-checked')])""")
    assert len(thumbs) == layers * heads == len(rows), "the grid is not layers x heads"
    assert sorted((l, h) for l, h, _ in thumbs) == sorted(rows)
    assert [(l, h) for l, h, c in thumbs if c == "true"] == [(0, 0)]

    # Keyboard: Tab into the grid (one tab stop: the picked thumbnail), then ↓ → picks layer 1, head 1.
    for _ in range(6):
        press(driver, Keys.TAB)
        if "att-thumb" in (active(driver).get_attribute("class") or ""):
            break
    assert active(driver).get_attribute("aria-checked") == "true", "Tab did not reach the picked thumbnail"
    press(driver, Keys.ARROW_DOWN, Keys.ARROW_RIGHT)
    assert (active(driver).get_attribute("data-layer"), active(driver).get_attribute("data-head")) == ("1", "1")
    assert active(driver).get_attribute("aria-checked") == "true"
    heading = panel.find_element("css selector", ".att-heading")
    assert heading.text == "Layer 1, head 1"

    row = rows[(1, 1)]
    assert len(row) == position + 1 and row[0] > 0.001, "the first token has no weight to hide"
    strip = strip_data(driver)
    assert [s["pos"] for s in strip] == list(range(position + 1))
    assert [s["weight"] for s in strip] == row, "the weights on the tokens are not the server's"
    assert all(s["title"] == f"position {s['pos']}: {pct(w)}" for s, w in zip(strip, row))
    top = driver.execute_script("""return [...document.querySelectorAll('#panel-attention ol.att-top li')].map(
        (li) => [Number(li.dataset.pos), li.querySelector('.readout-num').textContent])""")
    largest = sorted(range(len(row)), key=lambda i: -row[i])[:5]
    assert [w for _, w in top] == [pct(row[i]) for i in largest], "the most-attended list is not the server's"
    assert {p for p, _ in top} <= set(range(len(row))) and [row[p] for p, _ in top] == [row[i] for i in largest]
    assert RECOMPUTED in panel.text
    driver.save_screenshot(str(artifacts_dir() / "inspect-attention.png"))

    # The strip is one tab stop too: → reads out the next token's weight.
    press(driver, Keys.TAB)
    assert active(driver).get_attribute("data-pos") == "0", "Tab did not go from the grid to the strip"
    press(driver, Keys.ARROW_RIGHT)
    assert panel.find_element("css selector", ".att-readout").text.endswith(f"position 1: {pct(row[1])}")

    # Hide the sink: position 0 drops out, the rest renormalised (and labelled so).
    driver.find_element("id", "att-hide-sink").send_keys(" ")
    strip = strip_data(driver)
    rest = sum(row[1:])
    assert strip[0]["weight"] is None and strip[0]["sinkHidden"]
    assert [s["weight"] for s in strip[1:]] == pytest.approx([w / rest for w in row[1:]], rel=1e-12)
    assert [s["weight"] for s in strip[1:]] != row[1:], "hiding the sink changed nothing"
    assert "renormalised" in heading.text and "in your browser" in heading.text

    # Average the heads of the layer (then renormalised without the sink): the whole layer is marked.
    driver.find_element("id", "att-average").send_keys(" ")
    mean = [sum(rows[(1, h)][i] for h in range(heads)) / heads for i in range(position + 1)]
    rest = sum(mean[1:])
    assert [s["weight"] for s in strip_data(driver)[1:]] == pytest.approx([w / rest for w in mean[1:]], rel=1e-12)
    assert f"the mean of its {heads} heads" in heading.text and "averaged in your browser" in heading.text
    in_average = driver.execute_script("""return [...document.querySelectorAll('#panel-attention .att-thumb.in-average')]
        .map((b) => [Number(b.dataset.layer), Number(b.dataset.head)])""")
    assert sorted(in_average) == [[1, h] for h in range(heads)]

    driver.find_element("id", "att-hide-sink").send_keys(" ")
    assert [s["weight"] for s in strip_data(driver)] == pytest.approx(mean, rel=1e-12)
    driver.find_element("id", "att-average").send_keys(" ")
    assert [s["weight"] for s in strip_data(driver)] == row, "turning both off did not give the server's row back"


def test_user_message_is_shaded_by_how_surprising_each_token_was(server, browser):
    from selenium.webdriver.common.keys import Keys

    driver = browser(server.base)
    record_sent_messages(driver)
    set_field(driver, "system-prompt", "Be kind.")
    settings(driver, max_tokens=5, seed=2)
    send_message(driver, "first message")
    wait_done(driver)
    message = "Tell me something surprising, zebra!"
    send_message(driver, message)
    wait_done(driver)
    driver.find_element("id", "token-view").click()
    assert driver.find_element("id", "legend").is_displayed()

    users = driver.find_elements("css selector", "article.msg.user")
    for user in users:
        wait_for(driver, lambda: user.get_attribute("data-inspected") == "done", "a user message was not inspected")
    user = users[-1]
    view = user.find_element("css selector", ".user-view")
    assert view.is_displayed() and not user.find_element("css selector", ".msg-text").is_displayed()
    assert RECOMPUTED in view.text

    # "How surprising was my message": the conversation up to it, inspected apart from the page.
    messages = prompt_request(driver)["messages"]
    assert messages[-1] == {"role": "user", "content": message}
    expected = inspect(server, {"messages": messages})
    start, end = expected["message_tokens"][-1]
    tokens = driver.execute_script("""return [...arguments[0].querySelectorAll('.user-tokens .tok')].map((el) => ({
        pos: Number(el.dataset.pos), logprob: el.dataset.logprob === '' ? null : Number(el.dataset.logprob),
        text: el.textContent, classes: [...el.classList]}))""", view)
    assert [t["pos"] for t in tokens] == list(range(start, end))
    # The page's numbers come from the prompt's inspection (with the reply's header after the message),
    # this one's from the conversation alone: the same logprobs, up to float32 noise.
    assert [t["logprob"] for t in tokens] == pytest.approx(expected["logprobs"][start:end], abs=1e-4)
    assert [t["text"] for t in tokens] == [visible(t) for t in expected["tokens"][start:end]]
    own = [t for t in tokens if "template" not in t["classes"]]
    assert "".join(t["text"] for t in own) == visible(message), "the message's own tokens are not the shaded ones"
    for t in own:  # shaded with the legend's bins of p = e^logprob
        p = math.exp(t["logprob"])
        bin_ = next((i for i, limit in enumerate(BINS) if p >= limit), len(BINS))
        assert f"b{bin_}" in t["classes"], t
    template = [t for t in tokens if "template" in t["classes"]]
    assert template and not any(c.startswith("b") and c[1:].isdigit() for t in template for c in t["classes"])
    least = min(own, key=lambda t: t["logprob"])
    assert f"log p {least['logprob']:.3f}" in view.text

    # By keyboard: the tokens are one tab stop; the arrows read each one's numbers out.
    driver.execute_script("document.getElementById('new-chat').focus()")
    for _ in range(4):
        press(driver, Keys.TAB)
        if active(driver).get_attribute("data-logprob") is not None:
            break
    assert active(driver).get_attribute("data-pos") == str(users[0].find_element(
        "css selector", ".user-tokens .tok").get_attribute("data-pos")), "Tab did not reach the first message's tokens"
    target = users[-1].find_elements("css selector", ".user-tokens .tok")[len(template) // 2 + 1]
    driver.execute_script("arguments[0].focus()", target)
    press(driver, Keys.ARROW_RIGHT)
    focused = tokens[len(template) // 2 + 2]
    readout = view.find_element("css selector", ".user-readout").text
    assert f"position {focused['pos']}" in readout and f"log p {focused['logprob']:.3f}" in readout
    driver.save_screenshot(str(artifacts_dir() / "inspect-user.png"))


def test_narrow_screen_fits_the_layers_and_attention_tabs(server, browser):
    driver = browser(server.base, 375, 800)
    summary = driver.find_element("css selector", "#settings summary")
    summary.click()
    settings(driver, max_tokens=24, seed=4)
    summary.click()
    driver.find_element("id", "token-view").click()
    send_message(driver, "A phone-sized look inside")
    wait_done(driver)
    tokens = driver.find_elements("css selector", ".reply-tokens .tok")
    open_card_of(driver, tokens[3])
    for tab, shot in (("layers", "inspect-narrow-layers.png"), ("attention", "inspect-narrow.png")):
        driver.find_element("id", f"tab-{tab}").click()
        panel = driver.find_element("id", f"panel-{tab}")
        wait_for(driver, lambda: panel.get_attribute("data-state") == "done", f"the {tab} tab did not load", 60)
        assert fits(driver) == FITS, f"the {tab} tab scrolls sideways at 375 px"
        if tab == "attention":  # the card scrolled to the grid's end, so that the strip shows
            driver.execute_script("document.querySelector('#panel-attention .att-heading').scrollIntoView()")
        driver.save_screenshot(str(artifacts_dir() / shot))

    # The default model's grid is 30 layers x 9 heads: answer the next attention request with a
    # synthetic inspection of that shape (layout only: no number of it is checked) and fit that too.
    driver.execute_script("""
        const send = WebSocket.prototype.send;
        WebSocket.prototype.send = function (data) {
            const message = JSON.parse(data);
            if (message.type !== 'inspect' || !message.request.attention) return send.call(this, data);
            const p = message.request.positions[0], attention = [];
            for (let layer = 0; layer < 30; layer++) for (let head = 0; head < 9; head++) {
                const row = Array.from({length: p + 1}, (_, i) => 1 + ((i * 7 + layer * 3 + head) % 11));
                const sum = row.reduce((a, b) => a + b, 0);
                attention.push({layer, head, weights: [row.map((w) => w / sum)]});
            }
            const inspection = {token_ids: message.request.prompt, positions: [p], attention, logit_lens: null,
                                tokens: message.request.prompt.map((id) => 'token' + id),
                                special: message.request.prompt.map(() => false)};
            setTimeout(() => this.dispatchEvent(new MessageEvent('message',
                {data: JSON.stringify({type: 'inspection', id: message.id, inspection})})));
        };""")
    open_card_of(driver, driver.find_elements("css selector", ".reply-tokens .tok")[5])
    panel = driver.find_element("id", "panel-attention")
    wait_for(driver, lambda: panel.get_attribute("data-state") == "done", "the 30 x 9 grid did not load")
    assert len(panel.find_elements("css selector", ".att-thumb")) == 270
    assert fits(driver) == FITS, "a 30 x 9 grid scrolls sideways at 375 px"
    driver.save_screenshot(str(artifacts_dir() / "inspect-narrow-default-size.png"))


def test_inspection_errors_are_shown_in_the_tab_and_the_page_keeps_working(server, browser):
    driver = browser(server.base)
    reply_in_token_view(driver, "Fail politely", max_tokens=6, seed=5)
    index, group = pick_token(driver)
    # Make the server refuse the next inspection: a layer this model does not have.
    driver.execute_script("""
        const send = WebSocket.prototype.send;
        WebSocket.prototype.send = function (data) {
            const message = JSON.parse(data);
            if (message.type === 'inspect' && message.request.attention) message.request.attention.layers = [99];
            return send.call(this, JSON.stringify(message));
        };""")
    open_card_of(driver, group)
    driver.find_element("id", "tab-attention").click()
    panel = driver.find_element("id", "panel-attention")
    wait_for(driver, lambda: panel.get_attribute("data-state") == "error", "no error was shown")
    alert = panel.find_element("css selector", "[role=alert]")
    assert "400" in alert.text and "layer" in alert.text
    driver.find_element("id", "tab-layers").click()  # the other tab still works
    layers_panel = driver.find_element("id", "panel-layers")
    wait_for(driver, lambda: layers_panel.get_attribute("data-state") == "done", "the Layers tab broke")
    send_message(driver, "and again")  # so does the chat
    assert wait_done(driver) in ("stop", "length")


def test_a_tab_opened_while_the_reply_streams_loads_once_it_ends(endless_server, browser):
    """The server refuses an inspection while a reply streams on the socket (409): the page keeps it back
    until the reply's done event instead, and says so meanwhile."""
    from selenium.webdriver.common.keys import Keys

    driver = browser(endless_server.base)
    record_sent_messages(driver)
    settings(driver, max_tokens=None, seed=4)  # to the context's end: the reply runs until Stop
    driver.find_element("id", "token-view").click()
    send_message(driver, "Keep going")
    wait_for(driver, lambda: int(last_reply(driver).get_attribute("data-tokens")) >= 3, "no token arrived")
    # Clicked from inside the page: selenium's own calls are slow while hundreds of tokens arrive a second.
    driver.execute_script("document.querySelectorAll('.reply-tokens .tok')[1].click();"
                          "document.getElementById('tab-layers').click();")
    panel = driver.find_element("id", "panel-layers")
    assert panel.get_attribute("data-state") == "loading" and "once the reply has finished" in panel.text
    assert last_reply(driver).get_attribute("data-state") == "streaming"
    assert len(sent(driver, "inspect")) == 1, "an inspection was sent while the reply streamed"
    driver.execute_script("document.getElementById('stop').focus()")
    press(driver, Keys.ENTER)
    assert wait_done(driver) == "canceled"
    wait_for(driver, lambda: panel.get_attribute("data-state") != "loading", "the held inspection was not sent")
    assert panel.get_attribute("data-state") == "done", panel.text
    assert len(sent(driver, "inspect")) == 2
