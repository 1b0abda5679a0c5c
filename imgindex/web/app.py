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
- ``/cohorts`` (researchers): the cohort builder (:mod:`imgindex.web.cohorts`): a form that
  reads and writes the YAML of ``imgindex select``, live attrition (counts under the
  disclosure threshold shown as ``<10``), charts, the YAML and the de-identified selection to
  download, and an export request to submit.
- ``/requests`` (everyone signed in: researchers see their own): export requests
  (:mod:`imgindex.web.requests`); ``/review/{id}`` (reviewers) approves or rejects one; an
  approved request is exported, de-identified, by a background runner; ``/retry/{id}``
  (operators) exports a failed one again; ``/withdraw/{id}`` (its researcher) withdraws one
  whose export has not begun.
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
import contextlib
import io
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import pyarrow.parquet as pq
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.templating import Jinja2Templates

from imgindex.errors import CohortError
from imgindex.index import Index
from imgindex.web.accounts import Accounts, User

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from starlette.datastructures import FormData
    from starlette.requests import Request
    from starlette.types import ASGIApp, Receive, Scope, Send

    from imgindex.web.cohorts import Preview
    from imgindex.web.requests import ExportRequest, ExportRunner, Requests

__all__ = ["ACCESS", "MIN_COUNT", "create_app", "roles_for"]

#: Who may open what, by path prefix (the first match wins). ``None``: anyone.
ACCESS: Final[tuple[tuple[str, frozenset[str] | None], ...]] = (
    ("/login", None),
    ("/logout", frozenset({"researcher", "reviewer", "operator"})),
    ("/explore", frozenset({"researcher", "reviewer"})),
    ("/cohorts", frozenset({"researcher"})),
    ("/requests", frozenset({"researcher", "reviewer", "operator"})),
    ("/review/", frozenset({"reviewer"})),
    ("/retry/", frozenset({"operator"})),
    ("/withdraw/", frozenset({"researcher"})),
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
#: Counts from 1 to this minus 1 are shown to researchers as ``<N`` (the disclosure rule).
MIN_COUNT: Final = 10
_TEMPLATES: Final = Path(__file__).with_name("templates")


def create_app(
    root: str | os.PathLike[str],
    *,
    secret: bytes | None = None,
    https_only: bool = False,
    min_count: int = MIN_COUNT,
    run_exports: bool = True,
    export_workers: int | None = None,
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
    min_count : int
        The disclosure threshold: researchers see counts from 1 to ``min_count - 1`` as
        ``<min_count`` (default 10).
    run_exports : bool
        Export approved requests in the background while the app runs (default); without
        it requests wait until an app that runs them starts.
    export_workers : int, optional
        Worker processes of each export (default: one per CPU).
    """
    from imgindex.web.qido import qido_app
    from imgindex.web.requests import ExportRunner, Requests

    root = Path(root)
    accounts = Accounts(root)
    templates = Jinja2Templates(directory=str(_TEMPLATES))
    requests = Requests(root, accounts)
    runner = ExportRunner(root, requests, workers=export_workers) if run_exports else None
    pages = _Pages(root, accounts, templates, requests, runner, min_count)
    routes = [
        Route("/", pages.home),
        Route("/login", pages.login_form, methods=["GET"]),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/explore", pages.explore),
        Route("/cohorts", pages.cohorts, methods=["GET", "POST"]),
        Route("/cohorts/preview", pages.cohort_preview, methods=["POST"]),
        Route("/cohorts/codes", pages.cohort_codes),
        Route("/cohorts/cohort.yaml", pages.cohort_yaml, methods=["POST"]),
        Route("/cohorts/selection.parquet", pages.cohort_selection, methods=["POST"]),
        Route("/requests", pages.requests, methods=["GET"]),
        Route("/requests", pages.submit_request, methods=["POST"]),
        Route("/requests/{id:int}", pages.request_detail),
        Route("/requests/{id:int}/cohort.yaml", pages.request_yaml),
        Route("/review/{id:int}", pages.review, methods=["POST"]),
        Route("/retry/{id:int}", pages.retry, methods=["POST"]),
        Route("/withdraw/{id:int}", pages.withdraw, methods=["POST"]),
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

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if runner is not None:
            runner.start()
        try:
            yield
        finally:
            if runner is not None:
                await run_in_threadpool(runner.stop)

    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


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

    def __init__(
        self,
        root: Path,
        accounts: Accounts,
        templates: Jinja2Templates,
        requests: Requests,
        runner: ExportRunner | None,
        min_count: int,
    ) -> None:
        self.root = root
        self.accounts = accounts
        self.templates = templates
        self.requests_ = requests
        self.runner = runner
        self.min_count = min_count

    def _render(self, request: Request, name: str, **context: Any) -> Response:
        session = request.session
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(24)
        context.update(user=request.state.user, csrf=session["csrf"])
        context.setdefault("min_count", getattr(self, "min_count", MIN_COUNT))
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

    # -- the cohort builder ------------------------------------------------------------------

    async def _form(self, request: Request) -> FormData | Response:
        """The posted form, or a 403 when its CSRF token is not the session's."""
        form = await request.form()
        if not secrets.compare_digest(str(form.get("csrf", "")), request.session.get("csrf", "")):
            return PlainTextResponse("forbidden: stale form, reload the page", status_code=403)
        return form

    def _cohort_files(self) -> dict[str, Path]:
        """Cohorts to start from: imgindex's examples, then the catalog's own
        (``ROOT/cohorts/*.yaml``, which win over an example of the same name)."""
        from imgindex.cohort.examples import example_cohorts

        files = example_cohorts()
        files.update({p.stem: p for p in sorted((self.root / "cohorts").glob("*.yaml"))})
        return files

    def _builder(self, request: Request, values: dict[str, str], **context: Any) -> Response:
        from imgindex.web.cohorts import DOMAIN_LABELS, GROUPS, criteria_rows

        return self._render(
            request,
            "cohorts.html",
            values=values,
            rows=criteria_rows(values),
            domains=DOMAIN_LABELS,
            groups=GROUPS,
            examples=list(self._cohort_files()),
            min_count=self.min_count,
            **context,
        )

    async def cohorts(self, request: Request) -> Response:
        """The builder: empty, an example (``?example=``), or the YAML posted to it."""
        from imgindex.cohort import Cohort
        from imgindex.cohort.examples import examples_folder
        from imgindex.web.cohorts import cohort_to_form

        values: dict[str, str] = {"mode": "simple", "entry.domain": "condition"}
        text = ""
        if request.method == "POST":
            form = await self._form(request)
            if isinstance(form, Response):
                return form
            text = str(form.get("yaml", "")).replace("\r\n", "\n")
        base_dir = examples_folder()
        if request.method == "GET" and (name := request.query_params.get("example")):
            path = self._cohort_files().get(name)
            if path is None:
                return self._builder(request, values, error=f"no example cohort {name!r}")
            text, base_dir = path.read_text(encoding="utf-8"), path.parent
        if text.strip():
            try:
                cohort = Cohort.from_yaml_text(text, base_dir=base_dir)
                values = cohort_to_form(cohort)
            except CohortError as exc:
                response = self._builder(request, values, error=str(exc), yaml_text=text)
                response.status_code = 422
                return response
        return self._builder(request, values, yaml_text=text)

    async def cohort_codes(self, request: Request) -> Response:
        """Codes of a domain matching ``q``, with their persons (masked as on the page), for
        the builder's code search."""
        from imgindex.web.cohorts import code_suggestions, shown

        user: User = request.state.user
        found = await run_in_threadpool(
            code_suggestions,
            self.root,
            request.query_params.get("domain", "condition"),
            request.query_params.get("q", "")[:100],
        )
        exact = user.role != "researcher"
        return JSONResponse(
            [
                {
                    "label": c.label,
                    "concept_id": c.concept_id,
                    "source_code": c.source_code,
                    "vocabulary": c.vocabulary,
                    "persons": shown(c.persons, self.min_count, exact=exact),
                }
                for c in found
            ]
        )

    def _cohort_of(self, form: FormData) -> Any:
        from imgindex.web.cohorts import form_to_cohort

        return form_to_cohort(_values(form))

    async def cohort_preview(self, request: Request) -> Response:
        """The builder's live result: the attrition, charts and YAML (an HTML fragment)."""
        from imgindex.web.cohorts import preview

        form = await self._form(request)
        if isinstance(form, Response):
            return form
        user: User = request.state.user
        try:
            cohort = self._cohort_of(form)
            found = await run_in_threadpool(preview, cohort, self.root)
        except CohortError as exc:
            return self._render(request, "cohort_preview.html", error=str(exc), found=None)
        return self._render(
            request, "cohort_preview.html", found=found, **self._counts(user, found)
        )

    def _counts(self, user: User, found: Preview) -> dict[str, Any]:
        """The preview's counts as ``user`` may see them (see :func:`~imgindex.web.cohorts.shown`)."""
        from imgindex.web.cohorts import shown

        exact = user.role != "researcher"

        def show(n: int) -> str:
            return shown(n, self.min_count, exact=exact)

        def bar(label: str, n: int) -> tuple[str, int, str]:
            text = show(n)
            return (label, n if text == f"{n:,}" else self.min_count, text)

        return {
            "attrition": [(step, show(p), show(e)) for step, p, e in found.attrition],
            "persons": show(found.persons),
            "series": show(found.series),
            "by_modality": [bar(label, n) for label, n in found.by_modality],
            "by_days": [bar(label, n) for label, n in found.by_days],
            "yaml": found.cohort.to_yaml(),
            "exact": exact,
        }

    async def cohort_yaml(self, request: Request) -> Response:
        """The form's cohort as a YAML file for ``imgindex select``."""
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        try:
            cohort = self._cohort_of(form)
        except CohortError as exc:
            return PlainTextResponse(f"the cohort is not complete:\n{exc}", status_code=422)
        return _attachment(cohort.to_yaml(), "application/yaml", f"{cohort.name}.yaml")

    async def cohort_selection(self, request: Request) -> Response:
        """The form's selection, de-identified with the catalog's key (the export's
        pseudonyms and date shifts), as Parquet; refused under the disclosure threshold."""
        from imgindex.deid import Deidentifier
        from imgindex.web.cohorts import deidentified_selection, preview

        form = await self._form(request)
        if isinstance(form, Response):
            return form
        user: User = request.state.user
        try:
            cohort = self._cohort_of(form)
            found = await run_in_threadpool(preview, cohort, self.root)
        except CohortError as exc:
            return PlainTextResponse(f"the cohort is not complete:\n{exc}", status_code=422)
        if found.persons < self.min_count:
            return PlainTextResponse(
                f"the selection has fewer than {self.min_count} persons: it cannot be "
                "downloaded (the disclosure rule); submit an export request instead",
                status_code=403,
            )
        table = deidentified_selection(found.selection.table, Deidentifier.for_root(self.root))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.accounts.audit(
            user.name,
            "selection_downloaded",
            f"cohort/{found.selection.sha256}",
            {"cohort": cohort.name, "persons": found.persons, "series": found.series},
            found.selection.versions,
        )
        return _attachment(
            buffer.getvalue(), "application/vnd.apache.parquet", f"{cohort.name}.selection.parquet"
        )

    # -- export requests ---------------------------------------------------------------------

    async def submit_request(self, request: Request) -> Response:
        """A researcher's export request, from the builder's form and a purpose."""
        from imgindex.web.requests import RequestError

        user: User = request.state.user
        if user.role != "researcher":
            return PlainTextResponse(
                "forbidden: export requests are submitted by researchers", status_code=403
            )
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        try:
            cohort = self._cohort_of(form)
            made = await run_in_threadpool(
                lambda: self.requests_.submit(
                    user,
                    cohort,
                    str(form.get("purpose", "")),
                    with_emr=form.get("with_emr") == "on",
                )
            )
        except (CohortError, RequestError) as exc:
            values = _values(form)
            response = self._builder(request, values, error=str(exc))
            response.status_code = 422
            return response
        return RedirectResponse(f"/requests/{made.id}", status_code=303)

    def _visible(self, request: Request) -> ExportRequest | None:
        user: User = request.state.user
        found = self.requests_.get(request.path_params["id"])
        if found is None or (user.role == "researcher" and found.requester != user.name):
            return None
        return found

    async def requests(self, request: Request) -> Response:
        user: User = request.state.user
        return self._render(request, "requests.html", requests=self.requests_.visible_to(user))

    async def request_detail(self, request: Request) -> Response:
        """One request: its cohort, counts (pinned to the versions it was submitted
        with), status, review and export."""
        from imgindex.cohort import Cohort
        from imgindex.web.cohorts import preview

        found = self._visible(request)
        if found is None:
            response = self._render(
                request, "message.html", title="No such request", message="not found"
            )
            response.status_code = 404
            return response
        user: User = request.state.user
        cohort = Cohort.from_yaml_text(found.cohort_yaml)
        counts: dict[str, Any] = {}
        try:
            result = await run_in_threadpool(preview, cohort, self.root, found.versions)
            counts = self._counts(user, result)
        except CohortError as exc:  # e.g. a table vacuumed past the pinned version
            counts = {"counts_error": str(exc)}
        return self._render(request, "request.html", req=found, **counts)

    async def request_yaml(self, request: Request) -> Response:
        found = self._visible(request)
        if found is None:
            return PlainTextResponse("not found", status_code=404)
        return _attachment(
            found.cohort_yaml, "application/yaml", f"request-{found.id}-{found.cohort_name}.yaml"
        )

    async def review(self, request: Request) -> Response:
        """A reviewer's decision; an approval wakes the export runner."""
        from imgindex.web.requests import RequestError

        form = await self._form(request)
        if isinstance(form, Response):
            return form
        user: User = request.state.user
        request_id = request.path_params["id"]
        decision = str(form.get("decision", ""))
        if decision not in ("approve", "reject"):
            return PlainTextResponse("decision: approve or reject", status_code=400)
        try:
            await run_in_threadpool(
                lambda: self.requests_.review(
                    request_id,
                    user,
                    approve=decision == "approve",
                    comment=str(form.get("comment", "")),
                )
            )
        except RequestError as exc:
            found = self.requests_.get(request_id)
            if found is None:
                return PlainTextResponse("not found", status_code=404)
            response = self._render(request, "request.html", req=found, error=str(exc))
            response.status_code = 409
            return response
        if decision == "approve" and self.runner is not None:
            self.runner.wake()
        return RedirectResponse(f"/requests/{request_id}", status_code=303)

    async def retry(self, request: Request) -> Response:
        """An operator's "export again" of a failed request; wakes the export runner."""
        response = await self._request_step(request, self.requests_.retry)
        if response.status_code == 303 and self.runner is not None:
            self.runner.wake()
        return response

    async def withdraw(self, request: Request) -> Response:
        """A researcher withdraws their request before its export begins."""
        return await self._request_step(request, self.requests_.withdraw)

    async def _request_step(
        self, request: Request, step: Callable[[int, User], ExportRequest]
    ) -> Response:
        """Take ``step`` on the request of the path as the signed-in user: back to its
        page, or its page with why not (409)."""
        from imgindex.web.requests import RequestError

        form = await self._form(request)
        if isinstance(form, Response):
            return form
        user: User = request.state.user
        request_id = request.path_params["id"]
        found = self._visible(request)
        if found is None:
            return PlainTextResponse("not found", status_code=404)
        try:
            await run_in_threadpool(step, request_id, user)
        except RequestError as exc:
            response = self._render(
                request, "request.html", req=self.requests_.get(request_id), error=str(exc)
            )
            response.status_code = 409
            return response
        return RedirectResponse(f"/requests/{request_id}", status_code=303)


def _values(form: FormData) -> dict[str, str]:
    """A posted form's text fields (the last of a repeated name)."""
    return {k: v for k, v in form.multi_items() if isinstance(v, str)}


def _attachment(body: str | bytes, media_type: str, filename: str) -> Response:
    """``body`` as a download named ``filename`` (made safe for the header)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in filename) or "download"
    return Response(
        body,
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{safe}"'},
    )
