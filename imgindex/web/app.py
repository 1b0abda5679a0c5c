"""``imgindex serve``: the web app for researchers, reviewers and operations.

One Starlette application, server-rendered pages (Jinja2 templates, charts as inline SVG: no
front-end build, nothing downloaded at run time):

- ``/login``, ``/logout``: password login; the session is a signed cookie (HttpOnly,
  SameSite=Strict, ``Secure`` with ``https_only``) holding the user's name, whose role is
  looked up again on every request, so a removed user or a changed role takes effect at once.
- ``/explore`` and ``/series/{uid}`` (researchers, reviewers): counts by modality, body part
  and month as charts, a searchable table of series, a series' instances and a middle-slice
  thumbnail rendered on demand.
- ``/operations`` (operators): :func:`imgindex.status.collect_status` as a page;
  ``/metrics`` (operators) the same figures for Prometheus (``imgindex_*``).
- ``/audit`` (reviewers, operators): the audit trail.
- ``/dicom-web/...`` (researchers, operators): QIDO-RS over the index
  (:func:`imgindex.web.qido.qido_app`); DICOMweb clients sign in with HTTP Basic.

Access is denied by default: :data:`ACCESS` gives the roles of every path prefix, and a path
it does not list answers 404 to everyone. Without a session a page redirects to ``/login``
and an API answers 401; with the wrong role, 403.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.templating import Jinja2Templates

from imgindex.index import Index
from imgindex.web.accounts import Accounts, User

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["ACCESS", "create_app"]

#: Who may open what, by path prefix (the first match wins). ``None``: anyone.
ACCESS: Final[tuple[tuple[str, frozenset[str] | None], ...]] = (
    ("/login", None),
    ("/logout", frozenset({"researcher", "reviewer", "operator"})),
    ("/explore", frozenset({"researcher", "reviewer"})),
    ("/series/", frozenset({"researcher", "reviewer"})),
    ("/operations", frozenset({"operator"})),
    ("/metrics", frozenset({"operator"})),
    ("/audit", frozenset({"reviewer", "operator"})),
    ("/dicom-web/", frozenset({"researcher", "operator"})),
)
#: Paths answered to API clients (401 with a Basic challenge, not a login page).
_API_PREFIXES: Final = ("/dicom-web/", "/metrics")
_HOME: Final = {"researcher": "/explore", "reviewer": "/explore", "operator": "/operations"}
_SESSION_COOKIE: Final = "imgindex_session"
_SESSION_HOURS: Final = 8
_PAGE: Final = 50
_TEMPLATES: Final = Path(__file__).with_name("templates")


def create_app(
    root: str | os.PathLike[str], *, secret: bytes | None = None, https_only: bool = False
) -> Starlette:
    """The app serving the catalog at ``root`` (see the module docstring).

    Parameters
    ----------
    root : str or path-like
        The catalog root: the index, and ``ROOT/web/app.sqlite`` for users and audit.
    secret : bytes, optional
        Signs the session cookies (default: ``ROOT/secrets/web.key``, made on first use).
    https_only : bool
        Send the session cookie only over HTTPS (set it when serving beyond loopback
        behind TLS).
    """
    from imgindex.web.qido import qido_app

    root = Path(root)
    accounts = Accounts(root)
    templates = Jinja2Templates(directory=str(_TEMPLATES))
    pages = _Pages(root, accounts, templates)
    routes = [
        Route("/", pages.home),
        Route("/login", pages.login_form, methods=["GET"]),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/explore", pages.explore),
        Route("/series/{uid}", pages.series),
        Route("/series/{uid}/thumbnail.png", pages.thumbnail),
        Route("/operations", pages.operations),
        Route("/metrics", pages.metrics),
        Route("/audit", pages.audit),
        Mount("/dicom-web", app=qido_app(root)),
    ]
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=(secret or _secret(root)).hex(),
            session_cookie=_SESSION_COOKIE,
            max_age=_SESSION_HOURS * 3600,
            same_site="strict",
            https_only=https_only,
        ),
        Middleware(_AccessControl, accounts=accounts),
    ]
    return Starlette(routes=routes, middleware=middleware)


def _secret(root: Path) -> bytes:
    """``ROOT/secrets/web.key``: 32 random bytes, made once, readable by the owner only."""
    path = root / "secrets" / "web.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = path.with_name(f".web.key.{os.getpid()}")
        descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
        try:
            os.link(fresh, path)  # never replaces a key another process made first
        except FileExistsError:
            pass
        finally:
            fresh.unlink()
    return bytes.fromhex(path.read_text(encoding="ascii").strip())


def roles_for(path: str) -> frozenset[str] | None:
    """The roles :data:`ACCESS` gives ``path``: a set (empty for a path no rule lists:
    nobody), or ``None`` (anyone)."""
    if path == "/":
        return frozenset(_HOME)
    for prefix, roles in ACCESS:
        if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return roles
    return frozenset()


class _AccessControl:
    """Every request's user (from the session, or HTTP Basic for API paths) against
    :data:`ACCESS`; the user goes to ``request.state.user``."""

    def __init__(self, app: ASGIApp, accounts: Accounts) -> None:
        self.app = app
        self.accounts = accounts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        allowed = roles_for(path)
        user = self._user(scope)
        scope.setdefault("state", {})["user"] = user
        if allowed is None:
            await self.app(scope, receive, send)
            return
        response: Response | None = None
        if not allowed:
            response = PlainTextResponse("not found", status_code=404)
        elif user is None:
            if path.startswith(_API_PREFIXES):
                response = PlainTextResponse(
                    "sign in (HTTP Basic, an imgindex user)",
                    status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="imgindex"'},
                )
            else:
                response = RedirectResponse(f"/login?next={quote(path)}", status_code=303)
        elif user.role not in allowed:
            response = PlainTextResponse(
                f"forbidden: {path} is for {', '.join(sorted(allowed))}", status_code=403
            )
        if response is not None:
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _user(self, scope: Scope) -> User | None:
        name = scope.get("session", {}).get("user")
        if isinstance(name, str):
            return self.accounts.user(name)
        if scope["path"].startswith(_API_PREFIXES):
            for key, value in scope.get("headers", ()):
                if key == b"authorization" and value[:6].lower() == b"basic ":
                    return self._basic(value[6:])
        return None

    def _basic(self, encoded: bytes) -> User | None:
        try:
            name, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return self.accounts.verify(name, password)


class _Pages:
    """The page endpoints."""

    def __init__(self, root: Path, accounts: Accounts, templates: Jinja2Templates) -> None:
        self.root = root
        self.accounts = accounts
        self.templates = templates

    def _render(self, request: Request, name: str, **context: Any) -> Response:
        session = request.session
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(24)
        context.update(user=request.state.user, csrf=session["csrf"])
        return self.templates.TemplateResponse(request, name, context)

    async def home(self, request: Request) -> Response:
        user: User = request.state.user
        return RedirectResponse(_HOME[user.role], status_code=303)

    async def login_form(self, request: Request) -> Response:
        return self._render(request, "login.html", next=request.query_params.get("next", ""))

    async def login(self, request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("user", "")), str(form.get("password", ""))
        target = str(form.get("next", "") or "")
        user = self.accounts.verify(name, password)
        if user is None:
            self.accounts.audit(name or None, "login_failed")
            response = self._render(
                request, "login.html", error="wrong user or password", next=target
            )
            response.status_code = 401
            return response
        request.session.clear()
        request.session.update(user=user.name, csrf=secrets.token_urlsafe(24))
        self.accounts.audit(user.name, "login")
        if not target.startswith("/") or target.startswith("//"):  # only our own pages
            target = _HOME[user.role]
        return RedirectResponse(target, status_code=303)

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        if not secrets.compare_digest(str(form.get("csrf", "")), request.session.get("csrf", "")):
            return PlainTextResponse("forbidden: stale form, reload the page", status_code=403)
        self.accounts.audit(request.state.user.name, "logout")
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    async def explore(self, request: Request) -> Response:
        from imgindex.web.explore import explore_figures

        q = request.query_params.get("q", "")
        try:
            page = max(0, int(request.query_params.get("page", "0")))
        except ValueError:
            page = 0
        measure = request.query_params.get("measure", "series")
        figures = explore_figures(
            Index(self.root), q=q, page=page, page_size=_PAGE, measure=measure
        )
        return self._render(request, "explore.html", q=q, page=page, **figures)

    async def series(self, request: Request) -> Response:
        from imgindex.web.explore import series_detail

        found = series_detail(Index(self.root), request.path_params["uid"])
        if found is None:
            response = self._render(
                request, "message.html", title="No such series", message="not in the index"
            )
            response.status_code = 404
            return response
        series, instances = found
        return self._render(request, "series.html", series=series, instances=instances)

    async def thumbnail(self, request: Request) -> Response:
        from imgindex.web.explore import thumbnail_png

        png = thumbnail_png(Index(self.root), request.path_params["uid"])
        if png is None:
            return PlainTextResponse("no image to show for this series", status_code=404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private"})

    async def operations(self, request: Request) -> Response:
        from imgindex.web.operations import operations_context

        return self._render(request, "operations.html", **operations_context(self.root))

    async def metrics(self, request: Request) -> Response:
        from imgindex.web.explore import metrics_text

        return PlainTextResponse(
            metrics_text(self.root), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def audit(self, request: Request) -> Response:
        return self._render(request, "audit.html", entries=self.accounts.audit_trail())
