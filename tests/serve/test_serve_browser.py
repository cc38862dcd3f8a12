"""End to end in a real browser: headless Chromium (Debian ``chromium``) driven by Playwright.

Starts the service with uvicorn on a free loopback port, uploads a real Grocery photo through
the page and reads the right article off it; enrols a new article through the form, finds it,
and deletes it again. Needs ``apt-get install chromium`` and ``pip install playwright`` (no
``playwright install``: the Debian browser is used through ``executable_path``). The test fails,
rather than skips, when either is missing; set ``FEWSHOT_SKIP_BROWSER=1`` to skip it on purpose.
``FEWSHOT_SCREENSHOT=FILE.png`` saves a screenshot of the page with results.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from serve_helpers import ARTICLES, NEW_ARTICLE, small_catalogue

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("FEWSHOT_CHROMIUM", "/usr/bin/chromium")
#: the service's write token in these tests
TOKEN = "browser-test-token-0123456789"


def _browser_or_fail():
    if os.environ.get("FEWSHOT_SKIP_BROWSER") == "1":
        pytest.skip("FEWSHOT_SKIP_BROWSER=1")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is not installed: pip install playwright "
                    "(or set FEWSHOT_SKIP_BROWSER=1 to skip the browser test)")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium, or point "
                    "FEWSHOT_CHROMIUM at a Chromium binary (FEWSHOT_SKIP_BROWSER=1 skips this test)")
    return sync_playwright


@pytest.fixture(scope="module")
def server(grocery_root: Path, tmp_path_factory):
    """uvicorn serving a private small index on 127.0.0.1:<free port>, in a thread."""
    _browser_or_fail()  # fail (or skip) before building anything
    import uvicorn

    from fewshot.serve.app import create_app
    from fewshot.serve.security import Access, default_hosts

    cat = small_catalogue(grocery_root, tmp_path_factory)
    index_dir = tmp_path_factory.mktemp("browser-index") / "index"
    shutil.copytree(cat.index_dir, index_dir)  # the test enrols and deletes: use a private copy
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(index_dir, model=cat.model,
                     access=Access(write_token=TOKEN, allowed_hosts=default_hosts("127.0.0.1")))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", cat
    srv.should_exit = True
    thread.join(10)
    sock.close()
    app.state.service.close()


def test_classify_and_enrol_in_chromium(server, tmp_path: Path) -> None:
    sync_playwright = _browser_or_fail()
    base, cat = server
    query = cat.test["Granny-Smith"][0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/")
            page.wait_for_function("document.querySelector('#status').textContent.includes('6 articles')")
            page.wait_for_selector(f"#articles tbody tr[data-label='{ARTICLES[0]}']")

            # classify a held-out photo of an indexed article
            page.set_input_files("#photo", str(query))
            page.click("#classify-btn")
            page.wait_for_selector("#predictions .prediction")
            assert page.text_content("#top1") == "Granny-Smith"
            first = page.locator("#predictions .prediction").first
            assert first.get_attribute("data-label") == "Granny-Smith"
            assert "Apple" in first.text_content() and "score 0." in first.text_content()
            assert page.locator("#predictions .prediction").count() == 5
            assert "vs threshold" in page.text_content("#timing") and "5% false accepts" in page.text_content("#timing")
            # a threshold no photo reaches (set on the request): the page answers unknown, the articles stay
            page.route("**/classify?*", lambda route: route.continue_(url=route.request.url + "&reject=5"))
            page.click("#classify-btn")
            page.wait_for_function("document.querySelector('#top1').textContent.startsWith('unknown')")
            assert page.text_content("#top1") == "unknown: none of these"
            assert "unknown" in page.get_attribute("#top1", "class")
            assert page.locator("#predictions .prediction").first.get_attribute("data-label") == "Granny-Smith"
            page.unroute("**/classify?*")
            page.wait_for_function(  # the catalogue thumbnails really load
                "[...document.querySelectorAll('#predictions img, #neighbors img')]"
                ".every(img => img.complete && img.naturalWidth > 0)")
            if os.environ.get("FEWSHOT_SCREENSHOT"):
                page.screenshot(path=os.environ["FEWSHOT_SCREENSHOT"], full_page=True)

            # a file that is not an image: the page shows the service's message
            bad = tmp_path / "notes.jpg"
            bad.write_text("not a photo")
            page.set_input_files("#photo", str(bad))
            page.click("#classify-btn")
            page.wait_for_selector("#classify-error:not([hidden])")
            assert "not an image file" in page.text_content("#classify-error")

            # enrolling needs the token: refused without it, accepted once it is pasted
            page.fill("#enrol-label", NEW_ARTICLE)
            page.fill("#enrol-group", "Melon")
            page.set_input_files("#enrol-files", [str(x) for x in cat.train[NEW_ARTICLE][:4]])
            page.click("#enrol-btn")
            page.wait_for_function("document.querySelector('#enrol-status').textContent.includes('token')")
            assert "needs the write token" in page.text_content("#enrol-status")
            page.fill("#token", TOKEN)
            page.click("#token-form button")
            page.fill("#enrol-label", NEW_ARTICLE)
            page.fill("#enrol-group", "Melon")
            page.set_input_files("#enrol-files", [str(x) for x in cat.train[NEW_ARTICLE][:4]])
            page.click("#enrol-btn")
            page.wait_for_selector(f"#articles tbody tr[data-label='{NEW_ARTICLE}']")
            assert f"enrolled '{NEW_ARTICLE}'" in page.text_content("#enrol-status")
            page.set_input_files("#photo", str(cat.test[NEW_ARTICLE][0]))
            page.click("#classify-btn")
            page.wait_for_function(  # ranked first; answered, or 'unknown' below the calibrated threshold
                f"document.querySelector('#predictions .prediction')?.dataset.label === '{NEW_ARTICLE}'")
            assert page.text_content("#top1") in (NEW_ARTICLE, "unknown: none of these")

            # delete it from the articles table
            page.on("dialog", lambda dialog: dialog.accept())
            page.click(f"#articles tbody tr[data-label='{NEW_ARTICLE}'] button.delete")
            page.wait_for_selector(f"#articles tbody tr[data-label='{NEW_ARTICLE}']", state="detached")
            assert f"deleted '{NEW_ARTICLE}'" in page.text_content("#enrol-status")
            assert errors == []
        finally:
            browser.close()


def _foreign_page_server(base: str):
    """A page on another origin (another port of 127.0.0.1) that posts a photo to the service,
    as an attacker's page would: ``(its URL, the server to shut down)``."""
    import http.server

    html = f"""<!doctype html><html><body><script>
    async function attack(withToken) {{
      const form = new FormData();
      form.append("label", "Injected-Article");
      form.append("files", new Blob([new Uint8Array(await (await fetch("/photo.jpg")).arrayBuffer())],
                  {{type: "image/jpeg"}}), "x.jpg");
      const opts = withToken ? {{method: "POST", body: form, headers: {{Authorization: "Bearer {TOKEN}"}}}}
                             : {{method: "POST", mode: "no-cors", body: form}};
      try {{ const r = await fetch("{base}/articles", opts); return r.type + " " + r.status; }}
      catch (e) {{ return "blocked " + e.message; }}
    }}
    </script></body></html>""".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        photo = b""

        def do_GET(self):
            body = html if self.path == "/" else Handler.photo
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if self.path == "/" else "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}/", srv, Handler


def test_a_page_of_another_origin_cannot_change_the_catalogue(server) -> None:
    """A page served from another origin, opened in Chromium on the same machine, posts a photo
    to the service: with a no-cors request (no token) and with a CORS request that even carries
    the token. Both are refused (403 at the service) and the catalogue is unchanged."""
    import httpx

    sync_playwright = _browser_or_fail()
    base, cat = server
    before = httpx.get(base + "/articles").json()["count"]
    url, foreign, handler = _foreign_page_server(base)
    handler.photo = cat.train[NEW_ARTICLE][0].read_bytes()
    statuses: list[int] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
            try:
                page = browser.new_page()
                page.on("response", lambda r: statuses.append(r.status) if r.url.startswith(base) else None)
                page.goto(url)
                no_cors = page.evaluate("attack(false)")
                with_token = page.evaluate("attack(true)")
            finally:
                browser.close()
    finally:
        foreign.shutdown()
    assert no_cors == "opaque 0"  # what a no-cors page sees either way
    assert with_token.startswith("blocked")  # no CORS permission for that origin
    assert statuses and all(s == 403 for s in statuses), statuses
    after = httpx.get(base + "/articles").json()
    assert after["count"] == before and all(a["label"] != "Injected-Article" for a in after["articles"])
    # a foreign Host header (DNS rebinding) is refused before any route runs
    assert httpx.get(base + "/articles", headers={"Host": "attacker.example"}).status_code == 400
