"""The browser fixtures: a Starlette app on loopback, driven by Debian's Chromium.

A tiny app stands in for ``imgindex serve``: a form whose POST echoes its text back (escaped),
and a page with an inline SVG. The tests fill and submit the form, check that the SVG is laid
out, and save screenshots to :data:`peers.browser.SCREENSHOTS`.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Final

import httpx
import pytest
from playwright.sync_api import expect
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from peers import browser as browser_module
from peers.browser import BrowserError, open_browser, screenshot, serve_app

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from playwright.sync_api import Browser, Page
    from starlette.requests import Request

pytestmark = pytest.mark.peers

#: Milliseconds Playwright waits for a page, a selector or an assertion.
PAGE_TIMEOUT_MS: Final = 5_000
#: Text with HTML metacharacters and non-ASCII, to check that the echo is escaped.
TEXT: Final = "CT <thorax> & Ödem"

_FORM: Final = """<!doctype html>
<html><head><meta charset="utf-8"><title>Echo</title></head>
<body><h1>Echo</h1>
<form method="post" action="/echo">
<label>Text <input id="text" name="text" type="text"></label>
<button id="submit" type="submit">Send</button>
</form></body></html>"""

_SVG: Final = """<!doctype html>
<html><head><meta charset="utf-8"><title>Shapes</title></head>
<body><h1>Shapes</h1>
<svg id="shapes" xmlns="http://www.w3.org/2000/svg" width="160" height="100"
 viewBox="0 0 160 100">
<rect x="10" y="10" width="80" height="60" fill="steelblue"/>
<circle cx="120" cy="50" r="30" fill="orange"/>
</svg></body></html>"""


async def _form(request: Request) -> HTMLResponse:
    return HTMLResponse(_FORM)


async def _echo(request: Request) -> HTMLResponse:
    text = (await request.form()).get("text")
    assert isinstance(text, str)
    return HTMLResponse(
        '<!doctype html><html><head><meta charset="utf-8"><title>Echoed</title></head>'
        f'<body><p id="echo">{html.escape(text)}</p></body></html>'
    )


async def _svg(request: Request) -> HTMLResponse:
    return HTMLResponse(_SVG)


def _app() -> Starlette:
    return Starlette(
        routes=[
            Route("/", _form),
            Route("/echo", _echo, methods=["POST"]),
            Route("/svg", _svg),
        ]
    )


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_app(_app()) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with open_browser() as opened:
        yield opened


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 800, "height": 600})
    try:
        opened = context.new_page()
        opened.set_default_timeout(PAGE_TIMEOUT_MS)
        expect.set_options(timeout=PAGE_TIMEOUT_MS)
        yield opened
    finally:
        context.close()


def test_form_posts_and_echoes_the_text(base_url: str, page: Page) -> None:
    page.goto(f"{base_url}/")
    expect(page).to_have_title("Echo")
    page.fill("#text", TEXT)
    with page.expect_navigation():
        page.click("#submit")
    assert page.url == f"{base_url}/echo"
    expect(page.locator("#echo")).to_have_text(TEXT)
    path = screenshot(page, "peers-browser-echo")
    assert path.is_file()
    assert path.stat().st_size > 1024


def test_inline_svg_renders(base_url: str, page: Page) -> None:
    page.goto(f"{base_url}/svg")
    svg = page.locator("#shapes")
    expect(svg).to_be_visible()
    box = svg.bounding_box()
    assert box is not None
    assert box["width"] == pytest.approx(160)
    assert box["height"] == pytest.approx(100)
    # The shapes inside are laid out too, not just the <svg> box.
    circle = page.locator("#shapes circle").bounding_box()
    assert circle is not None
    assert circle["width"] == pytest.approx(60)
    assert circle["height"] == pytest.approx(60)
    path = screenshot(page, "peers-browser-svg")
    assert path.is_file()
    assert path.stat().st_size > 1024


def test_missing_chromium_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(browser_module, "_DEBIAN_CHROMIUM", str(tmp_path / "chromium"))
    with pytest.raises(BrowserError, match=r"scripts/install \(apt package chromium\)"):
        browser_module.chromium_binary()


def test_serve_app_stops_listening() -> None:
    with serve_app(_app()) as url:
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/svg").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/svg", timeout=2)
