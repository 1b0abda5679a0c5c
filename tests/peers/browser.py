"""A real browser for the end-to-end tests of the web app: an ASGI app on loopback, Chromium.

:func:`serve_app` runs any ASGI app (``imgindex serve``'s, or a test's) with uvicorn on a free
port of ``127.0.0.1`` in a background thread; :func:`open_browser` drives Debian's
``chromium`` (``scripts/install``) headless with Playwright's sync API. Playwright's own
browsers are never downloaded (no ``playwright install``), and nothing is reached beyond
loopback: the tests run in a network namespace with only ``lo``.

Everything is per call, with no module state: each pytest-xdist worker starts its own server
and browser, and both are stopped when their ``with`` block ends, even when a test fails.
Screenshots go to :data:`SCREENSHOTS` (see :func:`screenshot`), which CI keeps as artifacts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import uvicorn
from playwright.sync_api import sync_playwright

if TYPE_CHECKING:
    from collections.abc import Iterator

    from playwright.sync_api import Browser, Page
    from starlette.types import ASGIApp

__all__ = [
    "CHROMIUM_ARGS",
    "SCREENSHOTS",
    "BrowserError",
    "chromium_binary",
    "open_browser",
    "screenshot",
    "serve_app",
]

#: Repository root.
REPO: Final = Path(__file__).resolve().parents[2]
#: Where the end-to-end tests save their screenshots: ``$IMGINDEX_SCREENSHOTS``, or
#: ``test-artifacts/screenshots`` in the repository (ignored by git). Created on first use.
SCREENSHOTS: Final = Path(
    os.environ.get("IMGINDEX_SCREENSHOTS") or REPO / "test-artifacts" / "screenshots"
)
#: Chromium's flags: no sandbox (the tests run as root), no GPU, ``/tmp`` rather than a small
#: ``/dev/shm``, and no traffic of its own (component updates, QUIC) beyond the pages loaded.
CHROMIUM_ARGS: Final = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-quic",
)
#: Seconds to wait for uvicorn to listen, and for its thread to end after ``should_exit``.
SERVER_TIMEOUT: Final = 10.0
#: Milliseconds to wait for Chromium to start.
LAUNCH_TIMEOUT_MS: Final = 30_000

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# Where Debian's package puts the launcher, should /usr/bin not be on PATH.
_DEBIAN_CHROMIUM = "/usr/bin/chromium"


class BrowserError(RuntimeError):
    """The app server or the browser could not be started."""


def chromium_binary() -> str:
    """Return Debian's ``chromium`` launcher.

    Raises
    ------
    BrowserError
        If it is not installed: ``scripts/install`` installs the apt package ``chromium``
        (Playwright's own browsers are never downloaded).
    """
    found = shutil.which("chromium") or shutil.which(_DEBIAN_CHROMIUM)
    if found is None:
        raise BrowserError(
            "chromium is not installed: run scripts/install (apt package chromium); "
            "the end-to-end tests never download Playwright's browsers"
        )
    return found


@contextlib.contextmanager
def serve_app(app: ASGIApp, **options: Any) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a free port of ``127.0.0.1`` until the block ends.

    The server runs its own event loop in a daemon thread, so that the test's thread stays free
    of asyncio for Playwright's sync API. ``options`` override the :class:`uvicorn.Config`
    defaults (quiet logs, asyncio loop, h11, no websockets, lifespan ``auto``); ``host`` and
    ``port`` cannot be changed.

    Yields
    ------
    str
        The base URL, ``http://127.0.0.1:PORT`` (no trailing slash).

    Raises
    ------
    BrowserError
        If the server did not start listening within :data:`SERVER_TIMEOUT` seconds.
    """
    settings: dict[str, Any] = {
        "log_level": "warning",
        "access_log": False,
        "loop": "asyncio",
        "http": "h11",
        "ws": "none",
        "lifespan": "auto",
        "timeout_graceful_shutdown": 2,
    } | options
    settings.update(host="127.0.0.1", port=0)
    server = uvicorn.Server(uvicorn.Config(app, **settings))
    # Not from the main thread, uvicorn leaves the signals (Ctrl-C) to pytest.
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while not server.started:
            if not thread.is_alive():
                raise BrowserError("uvicorn stopped before listening (see its log above)")
            if time.monotonic() > deadline:
                raise BrowserError(f"uvicorn did not listen within {SERVER_TIMEOUT} s")
            time.sleep(0.01)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=SERVER_TIMEOUT)
        if thread.is_alive():  # a request that never ends: stop waiting for it
            server.force_exit = True
            thread.join(timeout=SERVER_TIMEOUT)


@contextlib.contextmanager
def open_browser() -> Iterator[Browser]:
    """Launch Debian's Chromium headless with Playwright's sync API; closed when the block ends.

    Call it from a thread without a running asyncio loop (a plain ``def`` test, not an async
    one). Each call starts its own Playwright driver and browser: nothing is shared between
    tests or pytest-xdist workers.

    Yields
    ------
    playwright.sync_api.Browser
        The browser; open pages with ``browser.new_page()``.

    Raises
    ------
    BrowserError
        If Chromium is not installed, or if called inside a running asyncio loop.
    """
    executable = chromium_binary()
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise BrowserError(
            "open_browser() uses Playwright's sync API, which cannot run inside an asyncio "
            "loop: call it from a plain (not async) test"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            args=list(CHROMIUM_ARGS),
            timeout=LAUNCH_TIMEOUT_MS,
        )
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page: Page, name: str) -> Path:
    """Save a full-page PNG of ``page`` as ``<name>.png`` in :data:`SCREENSHOTS`.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` in ``name`` become ``_``.
    Give names unique across the suite: a later screenshot of the same name replaces it.

    Returns
    -------
    pathlib.Path
        The PNG file.
    """
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{_UNSAFE_NAME.sub('_', name).strip('.') or 'screenshot'}.png"
    page.screenshot(path=path, full_page=True)
    return path
