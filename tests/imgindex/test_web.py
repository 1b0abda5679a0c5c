"""imgindex serve: who may open what (every route, every role, no session, a forged cookie),
login and the audit trail, the pages on real data, QIDO-RS behind a login, and the pages in
a real browser (Debian's chromium through Playwright), with screenshots."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import polars as pl
import pytest
from _export_helpers import index_folder, write_selection, write_set
from peers.browser import open_browser, screenshot, serve_app
from playwright.sync_api import expect
from starlette.routing import Mount, Route

from imgindex.export import export
from imgindex.index import Index
from imgindex.web.accounts import ROLES, Accounts
from imgindex.web.app import ACCESS, create_app, roles_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    from playwright.sync_api import Browser

pytestmark = pytest.mark.filterwarnings("ignore:Object at manifest.parquet:UserWarning")

IMGINDEX = str(Path(sys.executable).with_name("imgindex"))
PASSWORDS = {role: f"{role}-secret-1" for role in ROLES}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("web")
    root = base / "root"
    written = write_set(base / "in", seed=61)
    index_folder(base / "in", root)
    selection = write_selection(base / "sel.txt", [s.uid for s in written[:2]])
    assert export(selection, root, base / "out.zarr", workers=1).ok
    accounts = Accounts(root)
    for role in ROLES:
        accounts.add_user(role, role, PASSWORDS[role])
    return root


@pytest.fixture(scope="module")
def base_url(root: Path) -> Iterator[str]:
    with serve_app(create_app(root)) as url:
        yield url


@pytest.fixture(scope="module")
def series_uid(root: Path) -> str:
    uids = Index(root).series.select("SeriesInstanceUID").collect().to_series().to_list()
    return str(min(uids))


@contextlib.contextmanager
def _client(base_url: str, role: str | None = None) -> Iterator[httpx.Client]:
    """An HTTP client, signed in as ``role`` (a user of that name) unless ``None``."""
    with httpx.Client(base_url=base_url, follow_redirects=False, timeout=30) as client:
        if role is not None:
            done = client.post("/login", data={"user": role, "password": PASSWORDS[role]})
            assert done.status_code == 303, done.text
        yield client


def _paths(series_uid: str) -> dict[str, frozenset[str]]:
    """Every GET route of the app with an example path, and who may open it."""
    return {
        "/": frozenset(ROLES),
        "/explore": frozenset({"researcher", "reviewer"}),
        f"/series/{series_uid}": frozenset({"researcher", "reviewer"}),
        f"/series/{series_uid}/thumbnail.png": frozenset({"researcher", "reviewer"}),
        "/cohorts": frozenset({"researcher"}),
        "/cohorts?example=mi_cad_ct": frozenset({"researcher"}),
        "/requests": frozenset(ROLES),
        "/operations": frozenset({"operator"}),
        "/metrics": frozenset({"operator"}),
        "/audit": frozenset({"reviewer", "operator"}),
        "/dicom-web/studies": frozenset({"researcher", "operator"}),
    }


def test_every_route_has_an_access_rule(root: Path) -> None:
    app = create_app(root)
    for route in app.routes:
        assert isinstance(route, Route | Mount)
        path = route.path if isinstance(route, Route) else route.path + "/"
        assert roles_for(path.replace("{uid}", "1.2.3")) != frozenset(), path
    assert roles_for("/no/such/page") == frozenset()  # denied by default
    assert [prefix for prefix, roles in ACCESS if roles is None] == ["/login"]


@pytest.mark.parametrize("role", [None, *ROLES])
def test_each_role_opens_its_pages_and_no_other(
    base_url: str, series_uid: str, role: str | None
) -> None:
    with _client(base_url, role) as client:
        for path, allowed in _paths(series_uid).items():
            status = client.get(path).status_code
            if role is None:
                api = path.startswith(("/metrics", "/dicom-web"))
                assert status == (401 if api else 303), path
            elif role in allowed:
                assert status in (200, 303), (path, status)  # / redirects to the home page
            else:
                assert status == 403, (path, role, status)
        assert client.get("/no/such/page").status_code == 404


#: Every POST route, and who may post to it (with the session's CSRF token).
POSTS = {
    "/cohorts": frozenset({"researcher"}),
    "/cohorts/preview": frozenset({"researcher"}),
    "/cohorts/cohort.yaml": frozenset({"researcher"}),
    "/cohorts/selection.parquet": frozenset({"researcher"}),
    "/requests": frozenset({"researcher"}),
    "/review/1": frozenset({"reviewer"}),
    "/retry/1": frozenset({"operator"}),
    "/withdraw/1": frozenset({"researcher"}),
    "/logout": frozenset(ROLES),
}


@pytest.mark.parametrize("role", [None, *ROLES])
def test_each_role_posts_only_its_forms_and_only_with_its_token(
    base_url: str, role: str | None
) -> None:
    with _client(base_url, role) as client:
        for path, allowed in POSTS.items():
            answer = client.post(path, data={"csrf": "not the session's", "name": "x"})
            if role is None:
                assert answer.status_code == 303, path
                assert answer.headers["location"].startswith("/login")
            elif role in allowed:
                assert answer.status_code == 403, (path, role)
                assert "stale form" in answer.text
            else:
                assert answer.status_code == 403, (path, role)
                assert answer.text.startswith("forbidden")  # by role, before the form is read
                assert "stale form" not in answer.text


def test_a_forged_or_foreign_cookie_is_no_session(base_url: str, root: Path) -> None:
    with _client(base_url, "operator") as client:
        cookie = client.cookies["imgindex_session"]
    payload, _, signature = cookie.rpartition(".")
    forged = {"imgindex_session": payload + "." + signature[::-1]}
    with httpx.Client(base_url=base_url, cookies=forged, follow_redirects=False) as client:
        assert client.get("/operations").status_code == 303
        assert client.get("/metrics").status_code == 401
    # A cookie signed with another key (another deployment) is no session either.
    with serve_app(create_app(root, secret=b"another key" * 3)) as other:
        stranger = httpx.Client(base_url=other, follow_redirects=False)
        stranger.post("/login", data={"user": "operator", "password": PASSWORDS["operator"]})
        stolen = {"imgindex_session": stranger.cookies["imgindex_session"]}
        stranger.close()
    with httpx.Client(base_url=base_url, cookies=stolen, follow_redirects=False) as client:
        assert client.get("/operations").status_code == 303


def test_login_logout_and_the_audit_trail(base_url: str, root: Path) -> None:
    with _client(base_url) as client:
        wrong = client.post("/login", data={"user": "reviewer", "password": "nope-nope"})
        assert wrong.status_code == 401
        assert "wrong user or password" in wrong.text
        nobody = client.post("/login", data={"user": "ghost", "password": "whatever1"})
        assert nobody.status_code == 401
        # After login, back to the page asked for; never to another site.
        done = client.post(
            "/login",
            data={"user": "reviewer", "password": PASSWORDS["reviewer"], "next": "/audit"},
        )
        assert done.headers["location"] == "/audit"
        page = client.get("/audit")
        assert "login_failed" in page.text
        assert client.post("/logout", data={"csrf": "not the token"}).status_code == 403
        token = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        assert client.post("/logout", data={"csrf": token}).status_code == 303
        assert client.get("/audit").status_code == 303  # signed out
    with _client(base_url) as client:
        away = client.post(
            "/login",
            data={"user": "reviewer", "password": PASSWORDS["reviewer"], "next": "//evil.org/x"},
        )
        assert away.headers["location"] == "/explore"
    actions = [(e.user, e.action) for e in Accounts(root).audit_trail()]
    assert ("reviewer", "login_failed") in actions
    assert ("ghost", "login_failed") in actions
    assert ("reviewer", "logout") in actions


def test_a_removed_user_loses_the_session_at_once(base_url: str, root: Path) -> None:
    accounts = Accounts(root)
    accounts.add_user("temp", "researcher", "temporary-1")
    client = httpx.Client(base_url=base_url, follow_redirects=False)
    client.post("/login", data={"user": "temp", "password": "temporary-1"})
    assert client.get("/explore").status_code == 200
    accounts.add_user("temp", "operator", "temporary-1")  # a new role applies now
    assert client.get("/explore").status_code == 403
    assert client.get("/operations").status_code == 200
    accounts.remove_user("temp")
    assert client.get("/operations").status_code == 303
    client.close()


def test_pages_show_the_index(base_url: str, series_uid: str, root: Path) -> None:
    with _client(base_url, "researcher") as client:
        page = client.get("/explore")
        assert "Series by modality" in page.text
        assert page.text.count('<a href="/series/') == 4
        found = client.get("/explore", params={"q": "mr"})
        assert found.text.count('<a href="/series/') == 2  # the two MR series
        mr_series = Index(root).series.filter(pl.col("Modality") == "MR").collect()
        mr_bytes = int(mr_series["size_bytes"].sum())
        for measure, expected in (
            ("studies", mr_series["StudyInstanceUID"].n_unique()),
            ("MB", round(mr_bytes / 1e6, 1)),
        ):
            chart = client.get("/explore", params={"measure": measure}).text
            assert f"{measure if measure == 'MB' else measure.capitalize()} by modality" in chart
            mr = re.search(r">MR</text>.*?<text[^>]*>([^<]+)</text>", chart, re.DOTALL)
            assert mr is not None
            shown = f"{expected:,.1f} MB" if measure == "MB" else f"{expected:,}"
            assert mr.group(1) == shown, (measure, mr.group(1), shown)
        series = client.get(f"/series/{series_uid}")
        instances = Index(root).instances.collect()
        for uid in instances.filter(instances["SeriesInstanceUID"] == series_uid)["SOPInstanceUID"]:
            assert uid in series.text
        thumbnail = client.get(f"/series/{series_uid}/thumbnail.png")
        assert thumbnail.headers["content-type"] == "image/png"
        assert thumbnail.content.startswith(b"\x89PNG")
        assert client.get("/series/1.2.3.4").status_code == 404
    with _client(base_url, "operator") as client:
        ops = client.get("/operations")
        assert "out.zarr" in ops.text
        metrics = client.get("/metrics").text
        assert "imgindex_index_instances 37.0" in metrics
        assert 'imgindex_export_series{export="' in metrics


def test_dicomweb_clients_sign_in_with_basic_auth(base_url: str, root: Path) -> None:
    from dicomweb_client.api import DICOMwebClient
    from requests import HTTPError, Session

    session = Session()
    session.auth = ("researcher", PASSWORDS["researcher"])
    client = DICOMwebClient(url=f"{base_url}/dicom-web", session=session)
    studies = client.search_for_studies()
    expected = Index(root).studies.select("StudyInstanceUID").collect().height
    assert len(studies) == expected
    session.auth = ("researcher", "wrong-password")
    with pytest.raises(HTTPError, match="401"):
        client.search_for_studies()
    session.auth = ("reviewer", PASSWORDS["reviewer"])
    with pytest.raises(HTTPError, match="403"):
        client.search_for_studies()


def test_users_are_managed_from_the_command_line(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("a-long-password\n")
    root = str(tmp_path / "root")

    def users(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [IMGINDEX, "users", "--root", root, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    done = users("add", "ada", "--role", "reviewer", "--password-file", str(secret))
    assert done.returncode == 0, done.stderr
    assert Accounts(root).verify("ada", "a-long-password") is not None
    assert "ada\treviewer" in users("list").stdout
    assert users("remove", "ada").returncode == 0
    assert users("remove", "ada").returncode != 0
    short = tmp_path / "short"
    short.write_text("short\n")
    bad = users("add", "bob", "--role", "reviewer", "--password-file", str(short))
    assert bad.returncode != 0
    assert "at least 8 characters" in bad.stderr


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with open_browser() as opened:
        yield opened


@pytest.mark.peers
def test_the_pages_in_a_browser(base_url: str, series_uid: str, browser: Browser) -> None:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(10_000)
        page.goto(f"{base_url}/explore")
        expect(page).to_have_url(f"{base_url}/login?next=/explore")
        page.fill("input[name=user]", "researcher")
        page.fill("input[name=password]", PASSWORDS["researcher"])
        screenshot(page, "login")
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{base_url}/explore")
        expect(page.locator("#series tr")).to_have_count(5)  # a header and 4 series
        assert page.locator("svg rect").count() >= 4  # the charts' bars
        screenshot(page, "explore")
        page.click(f"a[href='/series/{series_uid}']")
        image = page.locator("img")
        expect(image).to_be_visible()
        assert page.evaluate("document.querySelector('img').naturalWidth") > 0
        screenshot(page, "series")
        page.click("text=Log out")
        expect(page).to_have_url(f"{base_url}/login")
        page.fill("input[name=user]", "operator")
        page.fill("input[name=password]", PASSWORDS["operator"])
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{base_url}/operations")
        expect(page.locator("#exports")).to_contain_text("out.zarr")
        screenshot(page, "operations")
    finally:
        context.close()


def test_the_demo_leaves_the_app_running(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    errors = tmp_path / "demo.stderr"
    with errors.open("w") as stderr:
        demo = subprocess.Popen(
            [IMGINDEX, "demo", "--root", str(tmp_path / "demo"), "--size-mb", "5", "--serve",
             "--port", str(port)],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
    try:
        assert demo.stdout is not None
        passwords: dict[str, str] = {}
        shown: list[str] = []
        deadline = time.monotonic() + 240
        for line in demo.stdout:
            shown.append(line)
            words = line.split()
            if len(words) == 3 and words[0] in ROLES and words[1] == "password":
                passwords[words[0]] = words[2]
            if f"http://127.0.0.1:{port}/" in line or time.monotonic() > deadline:
                break
        assert set(passwords) == set(ROLES), (
            f"the demo stopped (exit {demo.poll()}):\n{''.join(shown[-30:])}\n"
            f"{errors.read_text()[-4000:]}"
        )
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, follow_redirects=False, timeout=30) as client:
            for _ in range(100):  # the server starts right after the line
                try:
                    client.get("/login")
                    break
                except httpx.ConnectError:
                    time.sleep(0.1)
            done = client.post(
                "/login", data={"user": "researcher", "password": passwords["researcher"]}
            )
            assert done.headers["location"] == "/explore"
            assert "Series by modality" in client.get("/explore").text
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=30)
        if demo.stdout is not None:
            demo.stdout.close()
