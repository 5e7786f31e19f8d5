"""The playground at `/` in a real headless Chromium (Debian's `chromium` package, driven by Playwright) against real
servers on loopback ports. Screenshots are written to test-artifacts/playground/."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.conftest import start_side_by_side

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-artifacts" / "playground"
MODEL = "SmolLM2-135M-Instruct"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# WCAG contrast of every visible piece of text against the background it sits on (AA: 4.5 for body text)
CONTRAST = """() => {
  const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
    .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (el) => {
    for (; el; el = el.parentElement) { const c = rgb(getComputedStyle(el).backgroundColor); if (c.length < 4 || c[3] > 0) return c; }
    return [255, 255, 255];
  };
  const worst = [];
  for (const el of document.querySelectorAll("body *")) {
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own || !el.checkVisibility() || el.closest(":disabled")) continue;
    const a = lum(rgb(getComputedStyle(el).color)), b = lum(background(el));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) worst.push(`${el.tagName}.${el.className}: ${ratio.toFixed(2)}`);
  }
  return worst;
}"""


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: install Debian's package (apt-get install chromium) to run the "
                    "playground's browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A browser page on a server's playground that records console errors and every URL it requested."""

    def __init__(self, browser, server, **context) -> None:
        self.server = server
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, model: str) -> None:
        self.page.goto(self.server.url + "/")
        self.page.wait_for_function(f"() => document.getElementById('model').textContent === {model!r}")

    def send(self, text: str, max_tokens: int, temperature: str = "0") -> None:
        self.page.fill("#max_tokens", str(max_tokens))
        self.page.fill("#temperature", temperature)
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def answers(self) -> list[str]:
        return self.page.eval_on_selector_all(".message.assistant .text, .message.completion .text",
                                              "els => els.map(e => e.textContent)")

    def wait_done(self, count: int = 1) -> str:
        """The stats line of the count-th answer, once it has ended."""
        stats = self.page.locator(f":is(.message.assistant, .message.completion) >> nth={count - 1}").locator(".stats")
        stats.wait_for(timeout=120_000)
        return stats.text_content()

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, default_server):
    p = Page(browser, default_server, viewport={"width": 1200, "height": 900})
    yield p
    p.close()


def _running(server) -> int:
    return httpx.get(server.url + "/health").json()["running"]


def test_page_loads_offline_clean_labelled_and_readable(page):
    page.open(MODEL)
    page.shot("loaded")
    assert page.errors == []
    origin = urlsplit(page.server.url).netloc
    assert all(urlsplit(u).netloc == origin for u in page.requests if not u.startswith("data:")), page.requests
    unlabelled = page.page.eval_on_selector_all(
        "input:not([type=radio]), textarea, select",
        "els => els.filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)")
    assert unlabelled == []
    assert page.page.evaluate(CONTRAST) == []
    csp = httpx.get(page.server.url + "/").headers["content-security-policy"]
    assert "default-src 'self'" in csp


def test_chat_streams_token_by_token_and_matches_the_api(page):
    page.open(MODEL)
    # record the answer's length at every change to the page while it streams
    page.page.evaluate("""() => {
      window.lengths = [];
      new MutationObserver(() => {
        const a = document.querySelector('.message.assistant .text');
        if (a) window.lengths.push(a.textContent.length);
      }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
    }""")
    page.page.fill("#system", "You are a helpful assistant.")
    page.page.focus("#input")  # by keyboard: type and press Enter
    page.send("Write a short poem about the sea.", max_tokens=40)
    stats = page.wait_done()
    lengths = page.page.evaluate("window.lengths")
    assert len(set(lengths)) >= 10 and lengths == sorted(lengths), lengths  # grew in many steps, never shrank
    assert "40 tokens" in stats and "tokens/s" in stats and "finish: length" in stats, stats
    page.shot("chat")
    api = openai.OpenAI(base_url=page.server.url + "/v1", api_key="unused").chat.completions.create(
        model=MODEL, max_tokens=40, temperature=0,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Write a short poem about the sea."}])
    assert page.answers() == [api.choices[0].message.content]
    # a second turn carries the first (multi-turn); the copy button is there
    page.send("Now make it shorter.", max_tokens=8)
    assert "finish:" in page.wait_done(2)
    assert page.page.locator(".message.user").count() == 2
    assert page.page.locator("button.copy").count() == 2
    assert page.errors == []


def test_stop_ends_a_long_answer_and_frees_its_row(page):
    page.open(MODEL)
    page.send("Write a very long story about a dragon who learns to fly.", max_tokens=1000)
    page.page.wait_for_function("() => document.querySelector('.message.assistant .text')?.textContent.length > 40")
    assert _running(page.server) == 1
    page.page.click("#stop")
    stats = page.wait_done()
    assert "finish: stopped" in stats, stats
    deadline = time.monotonic() + 10
    while _running(page.server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(page.server) == 0
    assert page.page.is_enabled("#send") and page.page.is_disabled("#stop")
    page.shot("stopped")
    assert page.errors == []


def test_arabic_and_hebrew_examples_render_right_to_left(page):
    page.open(MODEL)
    page.page.get_by_role("button", name="Example in العربية").click()
    assert page.page.evaluate("document.getElementById('input').matches(':dir(rtl)')")
    page.send(page.page.input_value("#input"), max_tokens=12)
    page.wait_done()
    page.page.get_by_role("button", name="Example in עברית").click()
    page.send(page.page.input_value("#input"), max_tokens=12)
    page.wait_done(2)
    directions = page.page.eval_on_selector_all(".message.user .text",
                                                "els => els.map(e => getComputedStyle(e).direction)")
    assert directions == ["rtl", "rtl"]
    page.shot("rtl")
    assert page.errors == []


def test_completion_mode_continues_the_prompt(page):
    page.open(MODEL)
    page.page.check("input[value=completion]")
    page.send("The three primary colors are", max_tokens=16)
    assert "finish:" in page.wait_done()
    api = openai.OpenAI(base_url=page.server.url + "/v1", api_key="unused").completions.create(
        model=MODEL, prompt="The three primary colors are", max_tokens=16, temperature=0)
    assert page.answers() == [api.choices[0].text]
    assert page.page.input_value("#input") == "The three primary colors are"  # kept, to run again or extend


def test_beams_and_stop_strings_reach_the_server(page):
    page.open(MODEL)
    page.page.fill("#num_beams", "2")
    page.page.fill("#stop_strings", "\\n")  # typed as backslash-n: a newline
    page.send("Name three colors.", max_tokens=24, temperature="0.9")  # beams leave temperature out
    assert "finish:" in page.wait_done()
    api = openai.OpenAI(base_url=page.server.url + "/v1", api_key="unused").chat.completions.create(
        model=MODEL, max_tokens=24, stop=["\n"], extra_body={"num_beams": 2},
        messages=[{"role": "user", "content": "Name three colors."}])
    assert page.answers() == [api.choices[0].message.content]
    assert "\n" not in page.answers()[0]


def test_a_server_error_is_shown_in_plain_words(page):
    page.open(MODEL)
    page.send("Hello!", max_tokens=100_000)
    page.page.wait_for_selector("#error:not([hidden])")
    message = page.page.text_content("#error")
    assert "did not accept the request (400)" in message and "maximum context length" in message, message
    assert page.page.input_value("#input") == "Hello!"  # given back, to fix and send again
    page.shot("error")


def test_phone_sized_screen_has_no_sideways_scroll(browser, default_server):
    p = Page(browser, default_server, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        p.open(MODEL)
        p.send("Hi!", max_tokens=8)
        p.wait_done()
        assert p.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        p.shot("phone")
        assert p.errors == []
    finally:
        p.close()


@pytest.fixture(scope="module")
def flagged(start_server, tiny_llama_dir):
    """Servers with --api-key and with --no-playground, started together."""
    tiny = ("--model", str(tiny_llama_dir), "--served-model-name", "tiny")
    return start_side_by_side(start_server, key=(*tiny, "--api-key", "sesame"), off=(*tiny, "--no-playground"))


def test_api_key_is_asked_for_and_kept_in_the_tab_only(browser, flagged):
    server = flagged["key"]
    p = Page(browser, server, viewport={"width": 1200, "height": 900})
    try:
        p.page.goto(server.url + "/")  # the page itself is open; the API is not
        p.page.wait_for_selector("#key-dialog[open]")
        p.shot("api-key")
        p.page.fill("#key-input", "wrong")
        p.page.press("#key-input", "Enter")
        p.page.wait_for_function("() => document.getElementById('key-why').textContent.includes('refused')")
        p.page.fill("#key-input", "sesame")
        p.page.press("#key-input", "Enter")
        p.page.wait_for_function("() => document.getElementById('model').textContent === 'tiny'")
        assert p.page.evaluate("sessionStorage.getItem('polyglot-api-key')") == "sesame"
        assert p.page.evaluate("localStorage.length") == 0
        p.send("Hi", max_tokens=4)
        assert "finish:" in p.wait_done()
        # the 401s for the missing and the wrong key are the only console errors (the browser logs failed fetches)
        assert all("401" in e for e in p.errors), p.errors
    finally:
        p.close()


def test_no_playground_flag_turns_the_page_off(flagged, tiny_server):
    on, off = tiny_server, flagged["off"]
    assert httpx.get(on.url + "/").status_code == 200
    assert httpx.get(on.url + "/playground/app.js").status_code == 200
    assert httpx.get(off.url + "/").status_code == 404
    assert httpx.get(off.url + "/playground/app.js").status_code == 404
    assert httpx.get(off.url + "/v1/models").status_code == 200
