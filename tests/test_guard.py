"""The server's guard, attacked for real: a ``spectrum-local serve`` on loopback, a real browser
(Debian's chromium driven by Playwright) on pages of other origins and on a rebound name, raw
sockets that send slowly, bodies that are too large, not JSON or not Unicode, and a fuzz of
every route from the OpenAPI schema (schemathesis).

"Nothing ran" is read from the server itself: ``/spectrum/v1/info``'s ``load.tokens_evaluated``
counts every token the engine has evaluated, and a control request shows that the same
request, sent the allowed way, does make it grow.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import threading
import time

import httpx
import pytest
from conftest import SERVED_FAMILY
from servers import free_port, running_server, serve_command, serve_env, start, stop

pytestmark = pytest.mark.http  # the HTTP layer: run once by `make test`, not per CPU setting

DESCRIPTION = [{"role": "description", "content": "A number from 1 to 10"}]
# Each POST route with a small valid body: what a page would try to make the server do.
ROUTES = {
    "/spectrum/v1/sample": {"messages": DESCRIPTION, "n": 2, "max_tokens": 4},
    "/spectrum/v1/top": {"messages": DESCRIPTION, "k": 3},
    "/spectrum/v1/score": {"messages": DESCRIPTION, "candidates": "1..3"},
    "/spectrum/v1/enumerate": {"messages": DESCRIPTION, "max_outputs": 2, "max_tokens": 2,
                               "max_decoded": 64},
    "/v1/completions": {"prompt": "One, two,", "max_tokens": 2},
    "/tokenize": {"prompt": "One, two"},
}
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             "/usr/bin/chromium") if p and os.path.exists(p)), None)
ALLOWED_HOST = "box.example"  # a name given with --allowed-host
REBOUND = "rebind.attacker.example"  # a page's own name, re-pointed at 127.0.0.1


def evaluated(url: str) -> int:
    """Tokens the server's engine has evaluated since it started."""
    return httpx.get(url + "/spectrum/v1/info", timeout=None).json()["load"]["tokens_evaluated"]


def assert_error(response: httpx.Response, status: int, match: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == status and match in error["message"], error


class Pages:
    """Pages served from another loopback port: another origin than the server's."""

    def __init__(self):
        self.html = "<!doctype html><title>another site</title>"
        pages = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = pages.html.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def friend():
    """A site the server lets in with --cors-origin (an app's own page, say)."""
    pages = Pages()
    yield pages
    pages.close()


@pytest.fixture(scope="module")
def stranger():
    """Any other site the user has open."""
    pages = Pages()
    yield pages
    pages.close()


@pytest.fixture(scope="module")
def server(f32, friend):
    with running_server(["--model", str(f32[SERVED_FAMILY]), "--ctx", "512",
                         "--cors-origin", friend.url, "--allowed-host", ALLOWED_HOST,
                         "--request-timeout", "2"]) as url:
        yield url


# --- what a page of another origin can send: nothing runs -----------------------------------

@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium browser found (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # The rebound name resolves to this machine, as after a DNS rebinding attack.
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    pg = context.new_page()
    pg.set_default_timeout(300_000)  # a cap on waits for events
    yield pg
    context.close()


# What a page can send to another origin without a preflight: form posts, text/plain and
# untyped no-cors fetches, and a real <form> whose field name smuggles the JSON body.
ATTACKS = """async ([url, body]) => {
  const json = JSON.stringify(body);
  const sent = [];
  for (const type of ['application/x-www-form-urlencoded', 'text/plain', 'multipart/form-data']) {
    await fetch(url, {method: 'POST', mode: 'no-cors', headers: {'Content-Type': type},
                      body: json});
    sent.push(type);
  }
  await fetch(url, {method: 'POST', mode: 'no-cors', body: new Blob([json])});
  sent.push('blob');
  const frame = document.createElement('iframe');
  frame.name = 'sink';
  document.body.appendChild(frame);
  const form = document.createElement('form');
  form.method = 'POST'; form.action = url; form.target = 'sink';
  form.enctype = 'text/plain';
  const field = document.createElement('input');
  field.name = json.slice(0, -1) + ', "x": "'; field.value = '"}';
  form.appendChild(field);
  document.body.appendChild(form);
  const loaded = new Promise(done => frame.onload = done);
  form.submit();
  await loaded;
  sent.push('form');
  return sent;
}"""


@pytest.mark.parametrize("route", ["/spectrum/v1/sample", "/v1/completions"])
def test_a_page_of_another_origin_cannot_make_the_model_work(page, server, stranger, route):
    answers = []
    page.on("response", lambda r: answers.append(r.status) if r.url == server + route else None)
    page.goto(stranger.url + "/")
    before = evaluated(server)
    sent = page.evaluate(ATTACKS, [server + route, ROUTES[route]])
    assert sent == ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data",
                    "blob", "form"]
    assert answers == [403] * 5  # each request reached the server, and each was refused
    assert evaluated(server) == before


def test_the_same_requests_from_the_servers_own_page_and_an_allowed_origin_run(page, server,
                                                                               friend):
    """The control: the browser, the request and the counter do work when allowed."""
    fetch_json = """async ([url, body]) => (await fetch(url, {method: 'POST',
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)})).status"""
    for origin in (server, friend.url):
        page.goto(origin + "/")
        before = evaluated(server)
        assert page.evaluate(fetch_json, [server + "/spectrum/v1/sample",
                                          ROUTES["/spectrum/v1/sample"]]) == 200
        assert evaluated(server) > before


def test_a_page_rebound_to_this_machine_can_neither_load_nor_call_the_server(page, server):
    port = server.rsplit(":", 1)[1]
    rebound = f"http://{REBOUND}:{port}"
    response = page.goto(rebound + "/")
    assert response.status == 403  # the page itself, asked for by the rebound name
    before = evaluated(server)
    # Same-origin for the browser now: it could read the answer, if there were one.
    got = page.evaluate("""async (body) => { const r = await fetch('/spectrum/v1/sample',
        {method: 'POST', headers: {'Content-Type': 'application/json'},
         body: JSON.stringify(body)}); return [r.status, await r.text()]; }""",
                        ROUTES["/spectrum/v1/sample"])
    assert got[0] == 403 and "--allowed-host" in json.loads(got[1])["error"]["message"]
    assert evaluated(server) == before


# --- the same rules over plain HTTP ---------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain",
                                          "multipart/form-data; boundary=x"])
def test_bodies_that_are_not_json_are_refused_before_any_work(server, route, content_type):
    before = evaluated(server)
    r = httpx.post(server + route, content=json.dumps(ROUTES[route]),
                   headers={"Content-Type": content_type}, timeout=None)
    assert_error(r, 415, "Content-Type: application/json")
    assert evaluated(server) == before


@pytest.mark.parametrize("route", ROUTES)
def test_json_without_a_type_is_json_unless_a_page_sends_it(server, route):
    untyped = json.dumps(ROUTES[route]).encode()
    assert httpx.post(server + route, content=untyped, timeout=None).status_code == 200
    r = httpx.post(server + route, content=untyped, timeout=None,
                   headers={"Origin": server})  # the server's own page: still a page
    assert_error(r, 415)
    r = httpx.post(server + route, json=ROUTES[route], timeout=None,
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("host", [f"{REBOUND}", "127.0.0.1.nip.io", "192.168.1.2", "[fe80::1]",
                                  "localhost.evil.example"])
def test_a_host_that_is_not_this_machine_is_refused(server, host):
    port = server.rsplit(":", 1)[1]
    before = evaluated(server)
    for name in (host, f"{host}:{port}"):
        assert_error(httpx.get(server + "/", headers={"Host": name}, timeout=None), 403,
                     "--allowed-host")
        r = httpx.post(server + "/spectrum/v1/top", json=ROUTES["/spectrum/v1/top"],
                       headers={"Host": name}, timeout=None)
        assert_error(r, 403, "--allowed-host")
    assert evaluated(server) == before


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "127.0.0.2", "app.localhost",
                                  ALLOWED_HOST])
def test_loopback_names_and_allowed_hosts_are_served(server, host):
    port = server.rsplit(":", 1)[1]
    r = httpx.post(server + "/spectrum/v1/top", json=ROUTES["/spectrum/v1/top"],
                   headers={"Host": f"{host}:{port}"}, timeout=None)
    assert r.status_code == 200, r.text


def test_other_origins_are_refused_and_allowed_ones_get_cors(server, friend, stranger):
    body = ROUTES["/spectrum/v1/top"]
    for origin in (stranger.url, "null", "http://127.0.0.1", "https://evil.example"):
        r = httpx.post(server + "/spectrum/v1/top", json=body, headers={"Origin": origin},
                       timeout=None)
        assert_error(r, 403, "--cors-origin")
        r = httpx.get(server + "/spectrum/v1/info", headers={"Origin": origin}, timeout=None)
        assert_error(r, 403)
        preflight = httpx.options(server + "/spectrum/v1/top", timeout=None, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})
        assert_error(preflight, 403)
    r = httpx.post(server + "/spectrum/v1/top", json=body, headers={"Origin": friend.url},
                   timeout=None)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == friend.url


# --- text that is not Unicode -----------------------------------------------------------------

LONE = "\\ud800"  # as JSON writes a lone surrogate: valid JSON, not encodable text
SURROGATE_BODIES = [
    ("/spectrum/v1/score", '{"messages": [{"role": "description", "content": "a%s"}], '
                           '"candidates": ["1", "2"]}'),
    ("/spectrum/v1/score", '{"messages": [{"role": "description", "content": "a"}], '
                           '"candidates": ["1", "%s"]}'),
    ("/spectrum/v1/score", '{"messages": [{"role": "description", "content": "a"}], '
                           '"candidates": "1,%s"}'),
    ("/spectrum/v1/top", '{"messages": [{"role": "description", "content": "a"}], '
                         '"prefix": "x%s"}'),
    ("/spectrum/v1/sample", '{"messages": [{"role": "output", "content": "%s"}], "n": 1}'),
    ("/spectrum/v1/enumerate", '{"messages": [{"role": "input", "content": "%s"}], '
                               '"max_decoded": 64}'),
    ("/v1/completions", '{"prompt": "one %s", "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": ["ok", "one %s"], "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": "one", "max_tokens": 2, "stop": ["%s"]}'),
    ("/tokenize", '{"prompt": "%s"}'),
    ("/spectrum/v1/top", '{"messages": [{"role": "description", "content": "a"}], "%s": 1}'),
]


@pytest.mark.parametrize("route,body", SURROGATE_BODIES)
def test_a_lone_surrogate_anywhere_is_a_400_naming_it(server, route, body):
    r = httpx.post(server + route, content=body % LONE,
                   headers={"Content-Type": "application/json"}, timeout=None)
    assert_error(r, 400, "not valid Unicode text: it holds a lone surrogate U+D800")
    # The escaped backslash is a plain string (no surrogate): not refused for it.
    r = httpx.post(server + route, content=body % "\\\\ud800",
                   headers={"Content-Type": "application/json"}, timeout=None)
    assert r.status_code < 500 and "Unicode" not in r.text, r.text


@pytest.mark.parametrize("route", ["/spectrum/v1/top", "/v1/completions"])
@pytest.mark.parametrize("depth", [900, 100_000])
def test_a_surrogate_nested_deeper_than_the_parser_goes_is_still_a_400(server, route, depth):
    body = dict(ROUTES[route], extra="HOLE")
    text = json.dumps(body).replace('"HOLE"', "[" * depth + f'"{LONE}"' + "]" * depth)
    r = httpx.post(server + route, content=text, headers={"Content-Type": "application/json"},
                   timeout=None)
    assert_error(r, 400)


def test_bytes_that_are_not_utf8_are_a_400(server):
    body = b'{"messages": [{"role": "input", "content": "ok \xff\xed\xa0\x80"}]}'
    r = httpx.post(server + "/spectrum/v1/top", content=body,
                   headers={"Content-Type": "application/json"}, timeout=None)
    offset = body.index(b"\xff")
    assert_error(r, 400, f"not UTF-8 text (byte 0xFF at offset {offset})")


# --- size and time ----------------------------------------------------------------------------

def test_a_body_over_the_limit_is_a_413_declared_or_chunked(server):
    big = json.dumps({"messages": [{"role": "description", "content": "x" * (5 * 2**20)}]})
    r = httpx.post(server + "/spectrum/v1/top", content=big,
                   headers={"Content-Type": "application/json"}, timeout=None)
    assert_error(r, 413, "larger than")

    def chunks():  # no Content-Length: Transfer-Encoding: chunked
        for start in range(0, len(big), 2**16):
            yield big[start:start + 2**16].encode()

    r = httpx.post(server + "/spectrum/v1/top", content=chunks(),
                   headers={"Content-Type": "application/json"}, timeout=None)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_error(r, 413, "larger than")


def closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (waits for that event; the
    generous timeout is only there so that a broken server fails the test instead of hanging)."""
    sock.settimeout(120)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_connections_that_send_no_headers_or_slow_ones_are_closed(server):
    port = int(server.rsplit(":", 1)[1])
    start = time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    for sock in slow:
        sock.sendall(b"POST /spectrum/v1/top HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for sock in idle + slow:
        assert closed_by_server(sock) == b""
        sock.close()
    assert time.monotonic() - start >= 2  # --request-timeout 2: not before
    assert httpx.get(server + "/health", timeout=None).status_code == 200


def test_a_body_that_does_not_arrive_in_time_is_a_408(server):
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /spectrum/v1/top HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        answer = closed_by_server(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert "did not arrive within 2 s" in json.loads(body)["error"]["message"]


def test_a_long_request_is_not_cut_by_the_timeout(server):
    """The timeout is for sending a request, not for the answer: a sample that takes longer
    than it (streamed, so the connection is busy throughout) ends normally."""
    # 8 samples of 480 tokens in a 512-token context run one after another: seconds.
    body = {"messages": DESCRIPTION, "n": 8, "max_tokens": 480, "seed": 1, "stream": True}
    start = time.monotonic()
    with httpx.stream("POST", server + "/spectrum/v1/sample", json=body, timeout=None) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    if time.monotonic() - start < 2:
        pytest.skip("the sample took less than the timeout on this machine")
    assert events[-1] == "data: [DONE]" and len(events) == 9
    assert all(json.loads(e[6:])["finish_reason"] in ("stop", "length") for e in events[:-1])


# --- /docs, offline ---------------------------------------------------------------------------

def test_the_api_docs_render_with_no_network(page, server):
    outside = []

    def only_loopback(route):
        if route.request.url.startswith(server):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    page.route("**/*", only_loopback)
    page.goto(server + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "spectrum-local" in page.text_content(".swagger-ui .info .title")
    page.wait_for_selector("[data-path='/spectrum/v1/score']")
    assert outside == []


# --- memory: nothing kept from refused requests -----------------------------------------------

def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_refused_large_requests_leave_no_memory_behind(f32):
    """A few hundred distinct descriptions too long for the context, each refused with a 400:
    the server's memory stays where it was (it grew by megabytes per request when the
    tokenizer cache kept every text)."""
    port = free_port()
    server = start(serve_command(["--model", str(f32[SERVED_FAMILY]), "--ctx", "512"], port),
                   port, "/health", env=serve_env())
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=None) as client:
            def refuse(i: int) -> None:
                text = f"{i} " + "word " * 60_000  # ~300 KB, ~60,000 tokens: over the context
                r = client.post(url + "/spectrum/v1/top",
                                json={"messages": [{"role": "description", "content": text}]})
                assert_error(r, 400, "raise --ctx")

            for i in range(20):  # the allocator's working set for such requests
                refuse(i)
            settled = rss_mib(server.pid)
            for i in range(20, 320):
                refuse(i)
            assert rss_mib(server.pid) - settled < 64, (settled, rss_mib(server.pid))
    finally:
        stop(server)
