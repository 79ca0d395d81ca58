"""The web page at ``/`` in a real headless browser (Debian's chromium driven by Playwright),
against a real ``spectrum-local serve`` on the default model.

Every bar of the page's charts is ``<g class="bar" data-label=TEXT data-value=NUMBER>`` with the
API's own number, so the tests read back exactly what the page drew. Set
``SPECTRUM_LOCAL_SCREENSHOT=path.png`` to keep a screenshot of the scored dice page.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import DICE  # noqa: E402
from servers import running_server  # noqa: E402

from spectrum_local.display import percent  # noqa: E402

pytestmark = pytest.mark.http  # the HTTP layer: run once by `make test`, not per CPU setting

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             "/usr/bin/chromium") if p and os.path.exists(p)), None)
if CHROMIUM is None:
    pytest.skip("no chromium browser found (apt-get install chromium)", allow_module_level=True)

SERVER_ARGS = ["--ctx", "2048"]
TIMEOUT_MS = 300_000  # a cap on the waits for the page's events, not a speed


def bars(page, chart: str) -> list[dict]:
    return page.eval_on_selector_all(
        f"{chart} g.bar",
        "gs => gs.map(g => ({label: g.dataset.label, value: g.dataset.value, id: g.dataset.id,"
        " shown: g.querySelector('text.label').textContent}))")


def close(a: float, b: float, rel: float = 1e-9) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def visible(text: str) -> str:
    """The page's rendering of a token: whitespace made visible."""
    if text == "":
        return "∅"
    return (text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")
            .replace("\r", "\\r"))


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server():
    with running_server(SERVER_ARGS) as url:
        yield url


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def open_page(page, url: str, *, info: bool = True) -> None:
    page.goto(url + "/")
    if info:  # the header shows GET /spectrum/v1/info
        page.wait_for_function("document.querySelector('#info').dataset.format !== undefined")


def test_score_chart_shows_the_apis_numbers(page, server):
    open_page(page, server)
    assert page.get_attribute("#info", "data-format") == "gemma3"
    assert "gemma3 format" in page.text_content("#info")
    page.click("#dice-button")
    assert page.input_value("#candidates") == "2..12"
    with page.expect_response("**/spectrum/v1/score") as seen:
        page.click("#score-button")
    page.wait_for_selector("#score-chart[data-status=done]")
    response = seen.value
    body = response.request.post_data_json
    assert body == {"messages": DICE, "candidates": "2..12"}
    drawn = response.json()  # what the page received

    shown = bars(page, "#score-chart")
    assert [b["label"] for b in shown] == [str(v) for v in range(2, 13)]
    assert [b["shown"] for b in shown] == [str(v) for v in range(2, 13)]
    # The page draws exactly the numbers it was sent ...
    assert [float(b["value"]) for b in shown] == [c["normalized"] for c in drawn["candidates"]]
    assert float(page.get_attribute("#coverage", "data-value")) == drawn["coverage"]
    # ... and they are the API's numbers for the same body.
    api = httpx.post(server + "/spectrum/v1/score", json=body, timeout=None).json()
    assert [c["text"] for c in api["candidates"]] == [b["label"] for b in shown]
    for b, c in zip(shown, api["candidates"]):
        assert close(float(b["value"]), c["normalized"]), (b, c)
    assert close(float(page.get_attribute("#coverage", "data-value")), api["coverage"])
    coverage = page.text_content("#coverage")
    assert (f"coverage: {percent(api['coverage'])} of the probability mass is on these "
            "11 candidates") in coverage
    # The tallest bar is the most likely candidate.
    top = max(api["candidates"], key=lambda c: c["normalized"])["text"]
    assert page.get_attribute("#score-chart g.bar.max", "data-label") == top
    assert page.is_hidden("#error")

    if shot := os.environ.get("SPECTRUM_LOCAL_SCREENSHOT"):
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=shot, full_page=True)


def test_top_chart_shows_the_apis_tokens(page, server):
    open_page(page, server)
    page.click("#dice-button")
    page.fill("#k", "8")
    with page.expect_response("**/spectrum/v1/top") as seen:
        page.click("#top-button")
    page.wait_for_selector("#top-chart[data-status=done]")
    body = seen.value.request.post_data_json
    assert body == {"messages": DICE, "k": 8, "prefix": ""}
    shown = bars(page, "#top-chart")
    api = httpx.post(server + "/spectrum/v1/top", json=body, timeout=None).json()["tokens"]
    assert len(shown) == len(api) == 8
    for b, t in zip(shown, api):
        assert b["label"] == t["token"] and int(b["id"]) == t["id"], (b, t)
        assert close(float(b["value"]), t["prob"]), (b, t)
        want = visible(t["token"])  # whitespace visible; a long token is cut with an ellipsis
        assert b["shown"] == want or (b["shown"].endswith("…") and want.startswith(b["shown"][:-1]))


def test_sample_streams_into_a_histogram(page, server):
    open_page(page, server)
    page.click("#dice-button")
    page.fill("#n", "6")
    page.fill("#max-tokens", "8")
    page.fill("#seed", "1")
    page.fill("#temperature", "1")
    with page.expect_request("**/spectrum/v1/sample") as sent:
        page.click("#sample-button")
    page.wait_for_selector("#sample-histogram[data-status=done]")
    assert sent.value.post_data_json == {"messages": DICE, "n": 6, "max_tokens": 8, "seed": 1,
                                         "temperature": 1, "stream": True}
    texts = page.eval_on_selector_all("#sample-list li", "ls => ls.map(l => l.dataset.text)")
    assert len(texts) == 6
    assert sorted(page.eval_on_selector_all("#sample-list li",
                                            "ls => ls.map(l => +l.dataset.index)")) == list(range(6))
    hist = bars(page, "#sample-histogram")
    counts = [int(b["value"]) for b in hist]
    assert sum(counts) == 6
    assert counts == sorted(counts, reverse=True)
    assert {b["label"]: int(b["value"]) for b in hist} == {t: texts.count(t) for t in texts}
    assert page.is_hidden("#error")


def test_enumerate_chart_shows_the_apis_outputs(page, server):
    open_page(page, server)
    page.click("#dice-button")
    page.fill("#enum-coverage", "0.9")
    page.fill("#enum-max", "20")
    with page.expect_response("**/spectrum/v1/enumerate") as seen:
        page.click("#enumerate-button")
    page.wait_for_selector("#enumerate-chart[data-status=done]")
    body = seen.value.request.post_data_json
    assert body == {"messages": DICE, "coverage": 0.9, "max_outputs": 20, "max_tokens": 32}
    api = httpx.post(server + "/spectrum/v1/enumerate", json=body, timeout=None).json()
    shown = bars(page, "#enumerate-chart")
    assert [b["label"] for b in shown] == [o["text"] for o in api["outputs"]]
    for b, o in zip(shown, api["outputs"]):
        assert close(float(b["value"]), o["text_prob"]), (b, o)
    line = "#enum-coverage-line"
    assert close(float(page.get_attribute(line, "data-value")), api["coverage"])
    assert close(float(page.get_attribute(line, "data-unexplored")), api["unexplored"])
    assert f"hold {percent(api['coverage'])} of the probability" in page.text_content(line)
    assert f"stopped: {api['stopped']}" in page.text_content("#enumerate-meta")
    assert page.is_hidden("#error")


def test_errors_show_in_the_error_box(page, server):
    open_page(page, server)
    page.click("#dice-button")
    page.fill("#candidates", "2,,3")  # an empty candidate: the API answers 400
    page.click("#score-button")
    page.wait_for_selector("#score-chart[data-status=error]")
    assert page.is_visible("#error")
    api = httpx.post(server + "/spectrum/v1/score", json={"messages": DICE, "candidates": "2,,3"},
                     timeout=None)
    assert api.status_code == 400
    assert page.text_content("#error-text") == f"HTTP 400: {api.json()['error']['message']}"


def test_api_key_is_asked_for_and_sent(page):
    with running_server(SERVER_ARGS, api_key="s3cret-key") as url:
        open_page(page, url, info=False)
        page.wait_for_selector("#key-panel", state="visible")  # GET /spectrum/v1/info was 401
        page.click("#dice-button")
        page.click("#score-button")  # waits for the key, then retries
        page.fill("#api-key", "wrong")
        page.click("#key-button")
        page.wait_for_function(
            "document.querySelector('#key-message').textContent.includes('did not accept')")
        assert page.is_visible("#key-panel")
        with page.expect_response(lambda r: r.url.endswith("/spectrum/v1/score")
                                  and r.status == 200) as seen:
            page.fill("#api-key", "s3cret-key")
            page.click("#key-button")
        page.wait_for_selector("#score-chart[data-status=done]")
        assert seen.value.request.headers["authorization"] == "Bearer s3cret-key"
        assert [b["label"] for b in bars(page, "#score-chart")] == [str(v) for v in range(2, 13)]
        assert page.is_hidden("#key-panel")
        assert page.evaluate("sessionStorage.getItem('spectrum-local-api-key')") == "s3cret-key"
        page.wait_for_function("document.querySelector('#info').dataset.format === 'gemma3'")
