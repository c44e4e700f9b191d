"""The web page (GET / and /dashboard) in a real headless Chromium (Debian's, driven by Playwright: nothing
downloaded at run time) against a real `specserve serve` process with an API key."""

import shutil
from pathlib import Path

import pytest

from tests.support.servers import start_server, stop_server

pytestmark = pytest.mark.models
API_KEY = "sk-web-test-4321"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "web" / "chat.png"  # shown in docs/api.md
# As root in a closed network: no sandbox, and none of Chromium's own connections to Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ASK = "Write a Python function that returns the sum of a list of numbers."

if CHROMIUM is None:
    pytest.skip("needs Debian's chromium (make test installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def server():
    proc, base, _ = start_server("--api-key", API_KEY, "--metrics-need-key")
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """The chat page, past its API key prompt."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(server)
    page.wait_for_selector("#key-box:not([hidden])")  # /v1/specserve/info answered 401
    page.fill("#api-key", API_KEY)
    page.click("#key-save")
    page.wait_for_function("document.querySelector('#method').options.length > 0")
    yield page
    context.close()


def ask(page, prompt: str, max_tokens: int = 48, method: str | None = None, k: str = "auto") -> dict:
    """Send a prompt and wait for its reply to end; returns how many tokens of each origin it showed."""
    if method is not None:
        page.select_option("#method", method)
    page.select_option("#k", k)
    page.fill("#max-tokens", str(max_tokens))
    replies = page.locator(".turn.reply").count()
    page.fill("#prompt", prompt)
    page.click("#send")
    reply = page.locator(".turn.reply").nth(replies)
    reply.and_(page.locator("[data-finish]")).wait_for(timeout=120_000)
    return {
        "finish": reply.get_attribute("data-finish"),
        **{source: reply.locator(f".tok.{source}").count() for source in ("draft", "target", "cache")},
        "text": reply.locator(".text").inner_text(),
    }


def test_a_code_prompt_streams_with_both_origins_and_moving_counters(page):
    assert page.locator("#model").inner_text().endswith(".gguf")
    assert page.locator("#method option").all_inner_texts()[:1] == ["none"]
    # a fixed k: adaptive k rightly drafts nothing where a draft token costs too much (0.56 of a target token
    # on an AMD Zen 5), and the page must show both origins
    reply = ask(page, ASK, max_tokens=64, method="draft", k="4")
    assert reply["finish"] == "length" and "def " in reply["text"]
    assert reply["draft"] > 0 and reply["target"] > 0 and reply["cache"] == 0
    assert int(page.locator("#tokens").inner_text()) == reply["draft"] + reply["target"]
    assert float(page.locator("#tps").inner_text()) > 0
    assert page.locator("#acceptance-rate").inner_text().endswith(")")  # "NN% (accepted/drafted)"
    title = page.locator(".turn.reply .tok.draft").first.get_attribute("title")
    assert "drafted" in title and "logprob" in title
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_method_none_shows_no_draft_tokens(page):
    reply = ask(page, "Name three primary colours.", max_tokens=16, method="none")
    assert reply["draft"] == 0 and reply["target"] > 0


def test_a_repeated_greedy_request_shows_as_cached(page):
    page.uncheck("#logprobs")  # logprobs bypass the response cache
    first = ask(page, "Say hello in Spanish.", max_tokens=12)
    page.click("#clear")  # the same conversation again
    again = ask(page, "Say hello in Spanish.", max_tokens=12)
    assert first["cache"] == 0 and again["cache"] > 0 and again["draft"] == again["target"] == 0
    assert again["text"] == first["text"]


def test_a_server_error_shows_as_a_message(page):
    reply = ask(page, "Hello", max_tokens=100_000)
    assert reply["finish"] == "error"
    error = page.locator("#error")
    assert error.is_visible() and "context" in error.inner_text()


def test_the_dashboard_shows_the_server_metrics(browser, server, page):
    ask(page, "Count to five.", max_tokens=12)
    dashboard = page.context.new_page()  # sessionStorage is per tab: the new tab asks for the key again
    dashboard.goto(f"{server}/dashboard")
    dashboard.wait_for_selector("#key-box:not([hidden])")  # --metrics-need-key
    dashboard.fill("#api-key", API_KEY)
    dashboard.click("#key-save")
    dashboard.wait_for_function("Number(document.querySelector('#m-generated').textContent) > 0")
    requests = dashboard.locator("#m-requests").inner_text()
    assert int(requests.split("/")[0]) >= 1 and int(requests.split("/")[1]) >= 0
    assert dashboard.locator("#error").is_hidden()
