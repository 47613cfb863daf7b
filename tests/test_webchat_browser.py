"""The web chat page (webapp/static/chat/) in a real browser: headless Chromium under selenium,
against `refimpl serve` on a tiny random model (milliseconds per token).

What a person relies on: the reply streams in and finishes; the token view is one tab stop that
the arrow keys walk and Enter opens; the card shows what the sampler did with the settings of the
panel; Stop stops; text is never parsed as HTML; errors are shown, not crashed on; the page fits a
phone. Screenshots go to $REFIMPL_ARTIFACTS (default test-artifacts/): webchat.png (token view
with a card open) and webchat-narrow.png (375 px wide).

The page's DOM hooks are listed in the header comment of webapp/static/chat/chat.js.
"""

import importlib.util
import json
import re
import time

import pytest

from browser_helpers import artifacts_dir, ensure_chromium, make_driver
from server_helpers import LiveServer

REPLY = "article.msg.assistant"
TOKENS = f"{REPLY} .reply-tokens .tok"


@pytest.fixture(scope="module")
def browser_ready():
    """Chromium, chromedriver and selenium, installed where they can be; a skip (with the reason) where not."""
    if importlib.util.find_spec("selenium") is None:
        pytest.skip("selenium is not installed (pip install selenium)")
    reason = ensure_chromium()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def server(browser_ready, tiny_chat_model_dir, tmp_path_factory):
    live = LiveServer(tiny_chat_model_dir, log_path=tmp_path_factory.mktemp("webchat") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def endless_server(browser_ready, endless_chat_model_dir, tmp_path_factory):
    """Replies here never end by themselves (conftest.endless_chat_model_dir): Stop is pressed on one
    that is certainly still streaming."""
    live = LiveServer(endless_chat_model_dir, log_path=tmp_path_factory.mktemp("webchat-endless") / "server.log")
    yield live
    live.stop()


@pytest.fixture
def browser(browser_ready, tmp_path):
    """Opens the page (at a window size) in a fresh headless Chromium; quits it after the test."""
    drivers = []

    def open_page(base, width=1200, height=900):
        driver = make_driver(tmp_path / f"profile{len(drivers)}", width, height)
        drivers.append(driver)
        driver.get(base + "/")
        wait_for(driver, lambda: driver.find_element("id", "status").text.startswith("connected"),
                 "the page did not connect to /v1/ws")
        return driver

    yield open_page
    for driver in drivers:
        driver.quit()


# ---------------------------------------------------------------- helpers

def wait_for(driver, condition, what, timeout=20):
    """Poll condition() until it is truthy; fail with `what` and the page's console errors otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    logs = [entry["message"] for entry in driver.get_log("browser")]
    pytest.fail(f"{what} within {timeout} s; browser console: {logs}")


def set_field(driver, field_id, value):
    field = driver.find_element("id", field_id)
    field.clear()
    field.send_keys(str(value))


def settings(driver, **values):
    """Fill the settings panel: settings(driver, top_k=3, seed=1); None empties a field."""
    for name, value in values.items():
        set_field(driver, name.replace("_", "-"), "" if value is None else value)


def send_message(driver, text):
    driver.find_element("id", "input").send_keys(text)
    driver.find_element("id", "send").click()


def last_reply(driver):
    return driver.find_elements("css selector", REPLY)[-1]


def wait_done(driver):
    """The last reply once the page shows it finished; its finish reason."""
    wait_for(driver, lambda: last_reply(driver).get_attribute("data-state") == "done", "the reply did not finish")
    return last_reply(driver).get_attribute("data-finish-reason")


def reply_in_token_view(driver, message, **values):
    """Set the panel, send a message, wait for the whole reply, and turn the token view on."""
    settings(driver, **values)
    send_message(driver, message)
    wait_done(driver)
    driver.find_element("id", "token-view").click()


def active(driver):
    return driver.switch_to.active_element


def press(driver, *keys):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*keys).perform()


def record_sent_messages(driver):
    """From now on, keep every message the page sends over its WebSocket in window.sentMessages."""
    driver.execute_script("""
        window.sentMessages = [];
        const send = WebSocket.prototype.send;
        WebSocket.prototype.send = function (data) {
            const reply = document.querySelectorAll('article.msg.assistant');
            const last = reply[reply.length - 1];
            window.sentMessages.push({message: JSON.parse(data),
                                      replyState: last ? last.dataset.state : null,
                                      replyTokens: last ? Number(last.dataset.tokens) : 0});
            return send.call(this, data);
        };""")


def sent_chats(driver):
    return [m["message"] for m in driver.execute_script("return window.sentMessages") if m["message"]["type"] == "chat"]


def open_card_rows(driver):
    """The open card, as data: one list of rows per token section, each row a dict."""
    return driver.execute_script("""
        const rowData = (tr) => ({
            kind: tr.classList.contains('alt') ? 'alt' : tr.classList.contains('top-p-cut') ? 'cut' : 'other',
            text: tr.textContent,
            p: tr.dataset.p === undefined ? null : Number(tr.dataset.p),
            p_temp: tr.dataset.pTemp === undefined ? null : Number(tr.dataset.pTemp),
            kept: tr.dataset.kept === 'true',
            removed_by: tr.dataset.removedBy || null,
            chosen: tr.classList.contains('chosen'),
            struck: tr.classList.contains('alt') &&
                    getComputedStyle(tr.querySelector('.alt-token')).textDecorationLine.includes('line-through'),
            cells: [...tr.cells].map((td) => td.textContent),
        });
        return [...document.querySelectorAll('#token-card .card-token')].map(
            (section) => [...section.querySelectorAll('tbody tr')].map(rowData));""")


def open_card_of(driver, token):
    """Close any open card, click the token, and wait for its card."""
    from selenium.webdriver.common.keys import Keys

    if driver.find_element("id", "token-card").is_displayed():
        press(driver, Keys.ESCAPE)
    token.click()
    wait_for(driver, lambda: driver.find_element("id", "token-card").is_displayed(), "the card did not open")


# ---------------------------------------------------------------- tests

def test_reply_streams_token_by_token_and_finishes(server, browser):
    driver = browser(server.base)
    settings(driver, max_tokens=60, seed=4)
    # Watch the reply from inside the page: every change of its token count and its text, as it happens.
    driver.execute_script("""
        window.states = [];
        new MutationObserver(() => {
            const reply = document.querySelector('article.msg.assistant');
            if (reply) window.states.push({state: reply.dataset.state, tokens: Number(reply.dataset.tokens),
                                           text: reply.querySelector('.reply-text').textContent});
        }).observe(document.getElementById('conversation'),
                   {subtree: true, childList: true, characterData: true, attributes: true});""")
    send_message(driver, "Tell me about the sea")
    assert wait_done(driver) in ("stop", "length")

    states = driver.execute_script("return window.states")
    final = last_reply(driver).find_element("css selector", ".reply-text").get_attribute("textContent")
    streaming = [s for s in states if s["state"] == "streaming"]
    counts = sorted({s["tokens"] for s in streaming if s["tokens"] > 0})
    partial_texts = {s["text"] for s in streaming if s["text"] and s["text"] != final}
    assert len(counts) >= 2, f"the reply did not grow token by token; token counts seen: {counts}"
    assert len(partial_texts) >= 2, f"fewer than two partial states of the reply were shown: {partial_texts}"
    assert all(final.startswith(t) for t in partial_texts), "a partial reply is not the start of the final one"
    assert final.strip(), "the finished reply is empty"
    meta = last_reply(driver).find_element("css selector", ".msg-meta").text
    assert re.search(r"\((stop|length)\)", meta), f"the reply does not show how it finished: {meta!r}"
    assert driver.find_element("id", "send").is_enabled() and not driver.find_element("id", "stop").is_enabled()


def test_finished_reply_is_sent_with_the_next_turn_and_new_chat_forgets_it(server, browser):
    driver = browser(server.base)
    settings(driver, max_tokens=8, seed=1)
    set_field(driver, "system-prompt", "You are terse.")
    record_sent_messages(driver)
    send_message(driver, "first question")
    wait_done(driver)
    first_reply = last_reply(driver).find_element("css selector", ".reply-text").get_attribute("textContent")
    send_message(driver, "second question")
    wait_done(driver)
    driver.find_element("id", "new-chat").click()
    assert not driver.find_elements("css selector", "article.msg"), "New chat left messages on the page"
    send_message(driver, "third question")
    wait_done(driver)

    first, second, third = sent_chats(driver)
    assert first["messages"] == [{"role": "system", "content": "You are terse."},
                                 {"role": "user", "content": "first question"}]
    assert second["messages"] == [{"role": "system", "content": "You are terse."},
                                  {"role": "user", "content": "first question"},
                                  {"role": "assistant", "content": first_reply},
                                  {"role": "user", "content": "second question"}]
    assert third["messages"] == [{"role": "system", "content": "You are terse."},
                                 {"role": "user", "content": "third question"}]
    assert first["settings"]["max_tokens"] == 8 and first["settings"]["seed"] == 1


def test_token_view_is_one_tab_stop_walked_with_arrows_and_opened_with_enter(server, browser):
    from selenium.webdriver.common.keys import Keys

    driver = browser(server.base)
    reply_in_token_view(driver, "Hello", max_tokens=40, seed=4, top_k=None, top_p=0.9)
    assert driver.find_element("id", "legend").is_displayed(), "no legend while the token view is on"
    reply = last_reply(driver)
    tokens = reply.find_elements("css selector", ".reply-tokens .tok")
    assert len(tokens) >= 3

    # Tab from the control before the conversation until focus enters the reply.
    driver.execute_script("document.getElementById('new-chat').focus()")
    for _ in range(5):
        press(driver, Keys.TAB)
        if active(driver).get_attribute("data-group") is not None:
            break
    assert active(driver) == tokens[0], "Tab did not reach the reply's first token"
    in_tab_order = reply.find_elements("css selector", '[tabindex="0"]')
    assert in_tab_order == [tokens[0]], f"the reply has {len(in_tab_order)} tab stops, not one"

    press(driver, Keys.ARROW_RIGHT)
    assert active(driver) == tokens[1], "ArrowRight did not move to the next token"
    assert reply.find_elements("css selector", '[tabindex="0"]') == [tokens[1]]
    press(driver, Keys.ARROW_LEFT, Keys.ARROW_RIGHT)
    assert active(driver) == tokens[1]

    press(driver, Keys.ENTER)
    card = driver.find_element("id", "token-card")
    wait_for(driver, card.is_displayed, "Enter did not open the card")
    section = card.find_elements("css selector", ".card-token")[0]
    assert re.fullmatch(r"(\d+\.\d|<0\.1|>99\.9) %", section.find_element("css selector", ".fact-p").text)
    assert re.fullmatch(r"#\d+", section.find_element("css selector", ".fact-rank").text)
    assert re.fullmatch(r"-?\d+\.\d{3}", section.find_element("css selector", ".fact-logprob").text)
    rows = open_card_rows(driver)[0]
    alternatives = [r for r in rows if r["kind"] == "alt"]
    assert len(alternatives) >= 10
    chosen = [r for r in alternatives if r["chosen"]]
    assert len(chosen) == 1 and "▶" in chosen[0]["cells"][0] and "chosen" in chosen[0]["text"], \
        "the chosen row is not marked by more than colour"
    assert rows[-1]["kind"] == "other" and "everything else" in rows[-1]["text"]
    driver.save_screenshot(str(artifacts_dir() / "webchat.png"))

    press(driver, Keys.ESCAPE)
    assert not card.is_displayed(), "Escape did not close the card"
    assert active(driver) == tokens[1], "focus did not return to the token"
    press(driver, " ")
    wait_for(driver, card.is_displayed, "Space did not open the card")
    press(driver, Keys.ESCAPE)
    press(driver, Keys.TAB)
    assert active(driver).get_attribute("data-group") is None, "Tab stopped on a second token of the reply"


def test_top_k_from_the_panel_filters_all_but_three_in_every_card(server, browser):
    driver = browser(server.base)
    reply_in_token_view(driver, "Count with me", temperature=1, top_p=1, top_k=3, min_p=0, max_tokens=12, seed=3)
    tokens = driver.find_elements("css selector", TOKENS)
    assert tokens
    checked = 0
    for token in tokens:
        open_card_of(driver, token)
        for rows in open_card_rows(driver):
            alternatives = sorted((r for r in rows if r["kind"] == "alt"), key=lambda r: -r["p_temp"])
            assert len(alternatives) >= 10
            top, rest = alternatives[:3], alternatives[3:]
            assert all(r["kept"] and not r["struck"] for r in top), f"one of the 3 most likely was filtered: {top}"
            assert all(not r["kept"] and r["removed_by"] == "top_k" and r["struck"] and "top_k" in r["cells"][-1]
                       for r in rest), "a row beyond the 3 most likely is not struck through as removed by top_k"
            assert [r for r in alternatives if r["chosen"]][0] in top
            checked += 1
    assert checked >= len(tokens)


def test_top_p_cut_and_small_probabilities_in_the_card(server, browser):
    driver = browser(server.base)
    reply_in_token_view(driver, "Hi", temperature=0.4, top_p=0.5, top_k=0, min_p=0, max_tokens=10, seed=2)
    cuts = 0
    for token in driver.find_elements("css selector", TOKENS):
        open_card_of(driver, token)
        for rows in open_card_rows(driver):
            first_cut = next((i for i, r in enumerate(rows) if r["removed_by"] == "top_p"), None)
            if first_cut is not None:
                cuts += 1
                assert rows[first_cut - 1]["kind"] == "cut", "no top-p divider before the first row it removed"
                assert re.fullmatch(r"top-p 0\.50 cut — kept mass \d+\.\d %", rows[first_cut - 1]["text"])
                assert all(r["kept"] for r in rows[:first_cut - 1])
            for r in rows:
                if r["kind"] == "alt":
                    p_temp_cell = r["cells"][3]
                    if 0 < r["p_temp"] < 0.001:
                        assert p_temp_cell == "<0.1 %"
                    assert p_temp_cell not in ("0 %", "0.0 %"), "a probability reads as zero"
    assert cuts, "no card showed a token removed by top_p at top_p 0.5"


def test_json_output_decodes_under_a_grammar_that_the_card_names(server, browser):
    """Output "JSON object": the reply is a JSON object (the chat message asks for response_format), and
    a card says "filtered: grammar" for the likely tokens the grammar removed."""
    from selenium.webdriver.support.ui import Select

    driver = browser(server.base)
    record_sent_messages(driver)
    Select(driver.find_element("id", "output-format")).select_by_value("json_object")
    reply_in_token_view(driver, "Data please", temperature=1, top_p=1, top_k=0, min_p=0, max_tokens=200, seed=5)
    assert sent_chats(driver)[-1]["settings"]["response_format"] == {"type": "json_object"}
    finish = last_reply(driver).get_attribute("data-finish-reason")
    text = last_reply(driver).find_element("css selector", ".reply-tokens").text
    assert text.startswith("{")
    if finish == "stop":  # a reply cut by max tokens may stop inside the object
        assert isinstance(json.loads(text.replace("·", " ").replace("↵", "\n")), dict)
    removed = []
    for token in driver.find_elements("css selector", TOKENS)[:6]:
        open_card_of(driver, token)
        for rows in open_card_rows(driver):
            removed += [r for r in rows if r["kind"] == "alt" and r["removed_by"] == "grammar"]
    assert removed and all(not r["kept"] and r["struck"] and "grammar" in r["cells"][-1] for r in removed)


def test_stop_cancels_generation(endless_server, browser):
    driver = browser(endless_server.base)
    settings(driver, max_tokens=None, seed=4, min_p=0)  # to the context's end: the reply runs until Stop
    record_sent_messages(driver)
    stop, send = driver.find_element("id", "stop"), driver.find_element("id", "send")
    send_message(driver, "Write a long story")
    wait_for(driver, lambda: int(last_reply(driver).get_attribute("data-tokens")) >= 1, "no token arrived")
    assert stop.is_enabled() and not send.is_enabled(), "while generating, Stop must be enabled and Send disabled"
    stop.click()
    reason = wait_done(driver)
    cancels = [m for m in driver.execute_script("return window.sentMessages") if m["message"]["type"] == "cancel"]
    assert [c["replyState"] for c in cancels] == ["streaming"], "Stop sent no cancel, or more than one"
    assert cancels[0]["message"] == {"type": "cancel", "id": last_reply(driver).get_attribute("data-id")}
    assert reason == "canceled"
    assert "canceled" in last_reply(driver).find_element("css selector", ".msg-meta").text
    assert send.is_enabled() and not stop.is_enabled()


def test_text_is_never_inserted_as_html(server, browser):
    from selenium.common.exceptions import NoAlertPresentException

    driver = browser(server.base)
    settings(driver, max_tokens=5)
    evil = "<img src=x onerror=alert(1)><b>bold</b>"
    set_field(driver, "system-prompt", "<i>system</i>")
    send_message(driver, evil)
    wait_done(driver)
    user = driver.find_element("css selector", "article.msg.user .msg-text")
    assert user.text == evil
    markup = driver.find_elements("css selector", "article.msg img, article.msg b, article.msg i")
    assert not markup, f"text became HTML elements: {[e.tag_name for e in markup]}"
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text


def test_errors_are_shown_and_the_page_keeps_working(server, browser):
    driver = browser(server.base)
    settings(driver, temperature=5, max_tokens=5)
    send_message(driver, "hello")
    wait_for(driver, lambda: last_reply(driver).get_attribute("data-state") == "error", "no error was shown")
    alert = last_reply(driver).find_element("css selector", "[role=alert]")
    assert "400" in alert.text and "temperature" in alert.text
    assert driver.find_element("id", "send").is_enabled() and not driver.find_element("id", "stop").is_enabled()
    assert driver.find_element("id", "input").get_attribute("value") == "hello", "the failed message was lost"

    settings(driver, temperature=0.7)
    record_sent_messages(driver)
    driver.find_element("id", "send").click()
    assert wait_done(driver) in ("stop", "length")
    assert sent_chats(driver)[-1]["messages"] == [{"role": "user", "content": "hello"}], \
        "the failed turn was sent again as history"


def test_api_key_is_asked_for_and_kept_in_session_storage(tiny_chat_model_dir, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    live = LiveServer(tiny_chat_model_dir, "--api-key", "sesame", log_path=tmp_path / "server.log")
    try:
        driver = browser(live.base)
        key_field = driver.find_element("id", "api-key")
        wait_for(driver, key_field.is_displayed, "no API key field although hello said auth_required")
        settings(driver, max_tokens=5)
        send_message(driver, "without a key")
        assert driver.find_element("css selector", "#conversation [role=alert]").is_displayed()
        driver.find_element("id", "input").clear()

        key_field.send_keys("wrong", Keys.TAB)
        send_message(driver, "with a wrong key")
        wait_for(driver, lambda: last_reply(driver).get_attribute("data-state") == "error", "a wrong key was accepted")
        assert "401" in last_reply(driver).find_element("css selector", "[role=alert]").text

        key_field.clear()
        key_field.send_keys("sesame", Keys.TAB)
        driver.find_element("id", "input").clear()
        send_message(driver, "with the key")
        assert wait_done(driver) in ("stop", "length")
        stored = driver.execute_script("return [sessionStorage.getItem('refimpl-api-key'), localStorage.length]")
        assert stored == ["sesame", 0]
        driver.refresh()
        wait_for(driver, lambda: driver.find_element("id", "api-key").get_attribute("value") == "sesame",
                 "the key was not kept for the session")
    finally:
        live.stop()


def test_narrow_screen_has_no_horizontal_scroll(server, browser):
    from selenium.webdriver.common.keys import Keys

    driver = browser(server.base, 375, 800)
    width = driver.execute_script("return window.innerWidth")
    assert width <= 400, f"the window is {width} px wide, not narrow"
    assert driver.find_element("id", "settings").get_attribute("open") is None, "the settings did not fold away"

    def fits():
        return driver.execute_script("""
            const root = document.documentElement;
            const send = document.getElementById('send').getBoundingClientRect();
            return {overflow: root.scrollWidth - root.clientWidth,
                    sendVisible: send.width > 0 && send.left >= 0 && send.right <= innerWidth
                                 && send.bottom <= innerHeight};""")

    assert fits() == {"overflow": 0, "sendVisible": True}
    summary = driver.find_element("css selector", "#settings summary")
    summary.click()  # unfold the settings, fill them, fold them again
    settings(driver, max_tokens=200, seed=4)  # a reply longer than the screen
    assert fits()["overflow"] == 0
    summary.click()
    driver.find_element("id", "token-view").click()
    send_message(driver, "A reply on a phone, please")
    wait_done(driver)
    open_card_of(driver, driver.find_elements("css selector", TOKENS)[2])
    card = driver.execute_script("const r = document.getElementById('token-card').getBoundingClientRect();"
                                 "return [r.left, r.right, innerWidth]")
    assert card[0] >= 0 and card[1] <= card[2], f"the card does not fit the screen: {card}"
    assert fits()["overflow"] == 0
    driver.save_screenshot(str(artifacts_dir() / "webchat-narrow.png"))
    press(driver, Keys.ESCAPE)
    assert fits() == {"overflow": 0, "sendVisible": True}, "the reply pushed the page sideways or Send off screen"
