"""The cohort builder and data requests of imgindex serve (issue 9).

The form and the YAML of ``imgindex select`` say the same thing (round trips of the example
cohorts, and of a cohort built on the form through the downloaded YAML and the command line);
live counts are masked under the disclosure threshold for researchers and exact for
reviewers; the selection downloads de-identified; and, in a real browser, the whole flow on
the demo's catalog: a researcher builds the MI/CAD cohort on the form, sees the counts and
requests an export; a reviewer approves it; the export runs, de-identified; the operations
page shows its throughput. Screenshots of every page go to test-artifacts/.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pyarrow.parquet as pq
import pytest
from peers.browser import open_browser, screenshot, serve_app
from playwright.sync_api import expect

from imgindex.cohort import Cohort, read_selection
from imgindex.cohort.examples import example_cohorts
from imgindex.emr import Emr
from imgindex.errors import CohortError
from imgindex.export import read_manifest
from imgindex.web.accounts import ROLES, Accounts, User
from imgindex.web.app import create_app
from imgindex.web.cohorts import (
    _days_histogram,
    cohort_to_form,
    criteria_rows,
    form_to_cohort,
    shown,
)
from imgindex.web.requests import Requests

if TYPE_CHECKING:
    from collections.abc import Iterator

    from playwright.sync_api import Page

pytestmark = pytest.mark.filterwarnings("ignore:Object at manifest.parquet:UserWarning")

IMGINDEX = str(Path(sys.executable).with_name("imgindex"))
PASSWORDS = {role: f"{role}-secret-1" for role in ROLES} | {"bob": "bob-secret-12"}
PURPOSE = "Train a model of coronary CT after myocardial infarction (study approval 2026-17)."
EXPORT_TIMEOUT_S = 180


# -- the form and the model ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(example_cohorts()))
def test_every_example_cohort_survives_the_form(name: str) -> None:
    cohort = Cohort.from_yaml(example_cohorts()[name])
    if cohort.entry.list is not None:
        with pytest.raises(CohortError, match="list file"):
            cohort_to_form(cohort)
        return
    values = cohort_to_form(cohort)
    back = form_to_cohort(values)
    assert back.sha256() == cohort.sha256()  # same cohort, same hash as imgindex select's
    assert Cohort.from_yaml_text(back.to_yaml()).sha256() == cohort.sha256()
    assert values["mode"] == ("advanced" if cohort.inclusion or cohort.demographics else "simple")


def test_the_simple_form_is_one_event_in_a_date_range_and_its_imaging() -> None:
    values = {
        "mode": "simple",
        "name": "mi-ct",
        "entry.domain": "measurement",
        "entry.source_codes": "M8140/3, 8140*",
        "entry.from": "2023-10-01",
        "entry.to": "2023-10-10",
        "img.modality": "CT, MR",
        "img.window": "after",
        "img.first": "0",
        "img.last": "30",
        # advanced fields left over from a switch between modes do not count in simple mode
        "age.min": "18",
        "c0.name": "ignored",
        "c0.source_codes": "X1",
    }
    cohort = form_to_cohort(values)
    assert cohort.entry.domain == "measurement"
    assert cohort.codeset(cohort.entry.codeset or "").source_codes == ("M8140/3", "8140*")
    assert (str(cohort.entry.dates.from_ if cohort.entry.dates else None)) == "2023-10-01"
    assert cohort.imaging.modality == ("CT", "MR")
    assert cohort.imaging.after == (0, 30)
    assert cohort.demographics is None
    assert cohort.inclusion == ()
    assert cohort_to_form(cohort)["mode"] == "simple"


def test_form_mistakes_are_named_by_field() -> None:
    with pytest.raises(CohortError) as caught:
        form_to_cohort(
            {
                "mode": "advanced",
                "entry.domain": "condition",
                "entry.concepts": "4329847, MI",
                "entry.from": "2023-13-01",
                "c3.name": "procedure after",
                "c3.domain": "procedure",
                "c3.window": "after",
                "c3.first": "seven",
            }
        )
    message = str(caught.value)
    assert "entry event: concept ids: 'MI' is not a concept id" in message
    assert "entry event: from: '2023-13-01' is not a date" in message
    assert "criterion procedure_after: give at least one concept id or source code" in message
    assert "criterion procedure_after: first day: 'seven' is not a whole number" in message
    with pytest.raises(CohortError, match=r"after.*cannot be negative"):  # the model's check
        form_to_cohort(
            {
                "entry.source_codes": "I21*",
                "mode": "advanced",
                "c0.source_codes": "92920",
                "c0.window": "after",
                "c0.first": "-3",
                "c0.last": "4",
            }
        )


def test_criteria_rows_keep_their_order_and_names() -> None:
    values = {"c2.name": "b", "c10.name": "c", "c0.name": "a", "cx.name": "no", "c1": "no"}
    assert criteria_rows(values) == [0, 2, 10]
    cohort = form_to_cohort(
        {
            "mode": "advanced",
            "entry.source_codes": "I21*",
            "c0.group": "exclusion",
            "c0.name": "prior stroke!",
            "c0.source_codes": "I63*",
            "c0.window": "before",
            "c0.first": "1",
            "c1.group": "labels",
            "c1.name": "troponin",
            "c1.domain": "measurement",
            "c1.source_codes": "6598-7",
            "c1.value_min": "0.04",
            "c1.at_least": "2",
        }
    )
    assert [c.name for c in cohort.exclusion] == ["prior_stroke"]
    assert cohort.exclusion[0].before == (1, None)
    (label,) = cohort.labels
    assert label.value is not None
    assert (label.value.min, label.at_least) == (0.04, 2)


def test_counts_under_the_threshold_are_masked_for_researchers_only() -> None:
    assert [shown(n, 10, exact=False) for n in (0, 1, 9, 10, 12345)] == [
        "0",
        "<10",
        "<10",
        "10",
        "12,345",
    ]
    assert shown(3, 10, exact=True) == "3"
    assert shown(4, 5, exact=False) == "<5"


def test_days_from_the_entry_event_are_binned_to_at_most_thirty_bars() -> None:
    assert _days_histogram([]) == []
    assert _days_histogram([0, 0, 2]) == [("day 0", 2), ("day 1", 0), ("day 2", 1)]
    weekly = _days_histogram([0, 6, 7, 100])
    assert weekly[0] == ("days 0..6", 2)
    assert weekly[1] == ("days 7..13", 1)
    assert weekly[-1] == ("days 98..104", 1)
    assert sum(n for _, n in _days_histogram(list(range(-400, 400, 3)))) == len(range(-400, 400, 3))
    assert len(_days_histogram(list(range(-400, 400, 3)))) <= 30


# -- on the demo's catalog -------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The demo's catalog (index, EMR, the MI/CAD selection and its export), its users, and
    the MI/CAD cohort's entry dates as the demo widened them."""
    root = tmp_path_factory.mktemp("web-cohorts") / "demo"
    done = subprocess.run(
        [IMGINDEX, "demo", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    accounts = Accounts(root)
    for role in ROLES:
        accounts.add_user(role, role, PASSWORDS[role])
    accounts.add_user("bob", "researcher", PASSWORDS["bob"])  # another researcher
    _, info = read_selection(root / "selections" / "mi_cad_ct.parquet")
    dates = info["cohort"]["entry"]["dates"]
    return root, {"entry.from": dates["from"], "entry.to": dates["to"]}


@pytest.fixture(scope="module")
def base_url(demo: tuple[Path, dict[str, str]]) -> Iterator[str]:
    with serve_app(create_app(demo[0], export_workers=1)) as url:
        yield url


@contextlib.contextmanager
def _client(base_url: str, role: str) -> Iterator[tuple[httpx.Client, str]]:
    """A client signed in as ``role``, and its session's CSRF token."""
    with httpx.Client(base_url=base_url, follow_redirects=False, timeout=60) as client:
        assert client.post("/login", data={"user": role, "password": PASSWORDS[role]}).is_redirect
        page = client.get("/requests")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        yield client, token.group(1)


def _mi_cad_form(demo: tuple[Path, dict[str, str]], csrf: str) -> dict[str, str]:
    """The MI/CAD cohort as the form posts it (the example's code sets, the demo's dates)."""
    values = cohort_to_form(Cohort.from_yaml(example_cohorts()["mi_cad_ct"]))
    values.update(demo[1])
    values["csrf"] = csrf
    return values


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&lt;", "<")


def test_live_counts_match_imgindex_select_and_are_masked(
    demo: tuple[Path, dict[str, str]], base_url: str
) -> None:
    root = demo[0]
    table, _ = read_selection(root / "selections" / "mi_cad_ct.parquet")
    persons = len(set(table.column("person_id").to_pylist()))
    assert 0 < persons < 10  # the demo's MI/CAD cohort is small: researchers see "<10"
    with _client(base_url, "researcher") as (client, csrf):
        form = _mi_cad_form(demo, csrf)
        preview = client.post("/cohorts/preview", data=form)
        assert preview.status_code == 200
        text = _text(preview.text)
        assert f"series {table.num_rows}" in text  # 20 series: not masked
        assert "persons <10" in text
        assert "with matching imaging <10 <10" in text
        assert "CT 20" in text
        # the YAML shown is the cohort: it runs with imgindex select to the same hash
        yaml_text = client.post("/cohorts/cohort.yaml", data=form)
        assert yaml_text.status_code == 200
        assert "mi_cad_ct" in yaml_text.headers["content-disposition"] or yaml_text.headers[
            "content-disposition"
        ].endswith('.yaml"')
        downloaded = Cohort.from_yaml_text(yaml_text.text)
        assert downloaded.sha256() == form_to_cohort(form).sha256()
        assert downloaded.sha256() == table.column("cohort_sha256")[0].as_py()
        # and it loads back into the form
        loaded = client.post("/cohorts", data={"csrf": csrf, "yaml": yaml_text.text})
        assert loaded.status_code == 200
        assert 'name="c0.name" value="coronary_procedure"' in loaded.text
        assert 'value="advanced" checked' in loaded.text
        # the demo saved its cohort (dates widened) in the catalog: the builder starts from it
        saved = client.get("/cohorts", params={"example": "mi_cad_ct_demo"})
        assert saved.status_code == 200
        assert f'name="entry.from" value="{demo[1]["entry.from"]}"' in saved.text
        assert 'name="entry.codeset_name" value="myocardial_infarction"' in saved.text
        assert client.get("/cohorts", params={"example": "nope"}).text.count("no example") == 1
        # the code search: concepts by name with the persons of them and their descendants
        codes = client.get("/cohorts/codes", params={"domain": "condition", "q": "infarction"})
        by_id = {c["concept_id"]: c for c in codes.json() if c["concept_id"]}
        mi = by_id[4329847]
        assert mi["label"] == "Myocardial infarction"
        assert mi["persons"] == "12"  # every demo MI is one of its descendants
        assert by_id[4270024]["persons"] == "<10"  # NSTEMI: 5 persons, masked
        sources = client.get("/cohorts/codes", params={"domain": "condition", "q": "i21"}).json()
        conditions = Emr(root).scan("condition_occurrence").collect()
        expected_codes = {
            c for c in conditions["condition_source_value"].drop_nulls() if c.startswith("I21")
        }
        assert expected_codes  # the demo's MIs are coded I21.x
        assert {c["source_code"] for c in sources if c["source_code"]} == expected_codes
        assert client.get("/cohorts/codes", params={"domain": "nope", "q": "x"}).json() == []
        # a form that is not a cohort yet says why, as a fragment
        broken = client.post("/cohorts/preview", data={**form, "entry.concepts": "x1"})
        assert "Not a complete cohort yet" in broken.text
        assert "&#39;x1&#39; is not a concept id" in broken.text
        # under the threshold, the selection is not downloaded
        refused = client.post("/cohorts/selection.parquet", data=form)
        assert refused.status_code == 403
        assert "fewer than 10 persons" in refused.text
        # and no POST is taken without the session's token
        assert client.post("/cohorts/preview", data={**form, "csrf": "forged"}).status_code == 403


def test_the_selection_downloads_deidentified(demo: tuple[Path, dict[str, str]]) -> None:
    root = demo[0]
    table, _ = read_selection(root / "selections" / "mi_cad_ct.parquet")
    with (
        serve_app(create_app(root, min_count=1, run_exports=False)) as url,
        _client(url, "researcher") as (client, csrf),
    ):
        got = client.post("/cohorts/selection.parquet", data=_mi_cad_form(demo, csrf))
    assert got.status_code == 200, got.text
    rows = pq.read_table(io.BytesIO(got.content))
    assert rows.num_rows == table.num_rows
    original_ids = set(table.column("PatientID").to_pylist())
    original_uids = set(table.column("SeriesInstanceUID").to_pylist())
    assert not original_ids & set(rows.column("PatientID").to_pylist())
    assert not original_uids & set(rows.column("SeriesInstanceUID").to_pylist())
    assert all(uid.startswith("2.25.") for uid in rows.column("SeriesInstanceUID").to_pylist())
    assert "AccessionNumber" not in rows.column_names
    # the export's pseudonyms: the file lines up with the demo's export of the same cohort
    manifest = read_manifest(root / "exports" / "mi_cad_ct.zarr")
    assert set(rows.column("SeriesInstanceUID").to_pylist()) == set(
        manifest.get_column("SeriesInstanceUID").to_list()
    )
    assert set(rows.column("days_from_index").to_pylist()) == set(
        table.column("days_from_index").to_pylist()
    )
    trail = Accounts(root).audit_trail()
    assert any(e.action == "selection_downloaded" and e.index_version for e in trail)


# -- the whole flow in a browser -------------------------------------------------------------


def _login(page: Page, base_url: str, role: str) -> None:
    page.goto(f"{base_url}/login")
    page.fill("input[name=user]", role)
    page.fill("input[name=password]", PASSWORDS[role])
    page.click("button[type=submit]")


@pytest.mark.peers
def test_researcher_to_reviewer_to_export_in_a_browser(
    demo: tuple[Path, dict[str, str]], base_url: str
) -> None:
    root = demo[0]
    with open_browser() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.set_default_timeout(20_000)
            # the researcher builds the MI/CAD cohort on the form
            _login(page, base_url, "researcher")
            expect(page).to_have_url(f"{base_url}/explore")
            screenshot(page, "explore-demo")
            page.click("text=Cohort builder")
            expect(page).to_have_url(f"{base_url}/cohorts")
            page.fill("input[name=name]", "mi-cad-ct")
            page.select_option("select[name='entry.domain']", "condition")
            # the diagnosis is picked by name: the search lists concepts with their persons
            page.fill(".code-search[data-prefix='entry']", "myocardial infarction")
            pick = page.locator(".suggestions[data-prefix='entry'] .suggestion").filter(
                has_text=re.compile(r"^Myocardial infarction · SNOMED 22298006 · 4329847 · ")
            )
            expect(pick).to_have_count(1)
            pick.click()
            expect(page.locator("input[name='entry.concepts']")).to_have_value("4329847")
            page.check("input[name='entry.descendants']")
            page.fill("input[name='entry.source_codes']", "I21*, I22*")
            page.fill("input[name='entry.from']", demo[1]["entry.from"])
            page.fill("input[name='entry.to']", demo[1]["entry.to"])
            page.fill("input[name='img.modality']", "CT")
            page.select_option("select[name='img.window']", "after")
            page.fill("input[name='img.first']", "0")
            page.fill("input[name='img.last']", "30")
            # the simple cohort: every MI with a CT in the 30 days after it
            expect(page.locator("#cohort-yaml")).to_contain_text(re.compile(r"after:\s*- 0\s*- 30"))
            assert int(page.locator("#count-series").inner_text().replace(",", "")) >= 20
            page.check("input[name=mode][value=advanced]")
            page.fill("input[name='age.min']", "18")
            page.click("#add-criterion")
            row = page.locator(".criterion").last
            row.locator("select[name$='.group']").select_option("inclusion")
            row.locator("input[name$='.name']").fill("coronary_procedure")
            row.locator("select[name$='.domain']").select_option("procedure")
            row.locator("input[name$='.concepts']").fill(
                "4216130, 4336464, 4324124, 4184832, 4304209"
            )
            row.locator("input[name$='.descendants']").check()
            row.locator("input[name$='.source_codes']").fill("92920, 92928, 92941, 33533, 93458")
            row.locator("select[name$='.window']").select_option("after")
            row.locator("input[name$='.first']").fill("7")
            row.locator("input[name$='.last']").fill("14")
            expect(page.locator("#cohort-yaml")).to_contain_text(re.compile(r"after:\s*- 7\s*- 14"))
            expect(page.locator("#attrition")).to_contain_text("inclusion: coronary_procedure")
            expect(page.locator("#count-persons")).to_have_text("<10")
            expect(page.locator("#count-series")).to_have_text("20")
            expect(page.locator("#chart-modality")).to_contain_text("CT")
            expect(page.locator("#chart-days")).to_contain_text("<10")
            screenshot(page, "cohort-builder")
            page.fill("textarea[name=purpose]", PURPOSE)
            page.click("#submit-request")
            expect(page).to_have_url(re.compile(rf"{base_url}/requests/\d+$"))
            expect(page.locator("#request-status")).to_have_text("submitted")
            request_url = page.url
            screenshot(page, "request-submitted")
            page.click("text=Log out")

            # the reviewer sees exact counts and approves
            _login(page, base_url, "reviewer")
            page.goto(f"{base_url}/requests")
            expect(page.locator("#requests")).to_contain_text("submitted")
            screenshot(page, "requests-reviewer")
            page.goto(request_url)
            persons = page.locator("#count-persons").inner_text()
            assert persons.isdigit()
            assert 0 < int(persons) < 10
            page.fill("textarea[name=comment]", "Approved under study 2026-17.")
            page.click("#approve")
            expect(page.locator("#request-status")).not_to_have_text("submitted")
            deadline = time.monotonic() + EXPORT_TIMEOUT_S
            while page.locator("#request-status").inner_text() in ("approved", "exporting"):
                assert time.monotonic() < deadline, "the approved export did not finish"
                time.sleep(0.5)
                page.reload()
            expect(page.locator("#request-status")).to_have_text("exported")
            expect(page.locator("#request-outcome")).to_contain_text("20 of 20 series")
            screenshot(page, "request-exported")
            page.click("text=Audit")
            request_id = request_url.rsplit("/", 1)[1]
            for action in ("request_submitted", "request_approved", "export_finished"):
                row = (
                    page.locator("#audit tr")
                    .filter(has_text=action)
                    .filter(has_text=f"request/{request_id}")
                )
                expect(row).to_have_count(1)
                expect(row).to_contain_text("index.series")  # the index version it saw
            screenshot(page, "audit")
            page.click("text=Log out")

            # operations shows the export's throughput
            _login(page, base_url, "operator")
            expect(page).to_have_url(f"{base_url}/operations")
            expect(page.locator("#exports")).to_contain_text(f"request-{request_id}.zarr")
            expect(page.locator("#ledger")).to_contain_text(f"request-{request_id}.zarr")
            export_line = page.locator("#chart-mbps-60m polyline[data-kind='export']")
            moved = float(export_line.get_attribute("data-moved") or "0")  # MB in the window
            assert moved >= 15.0  # this export alone moved 15.2 MB of DICOM
            screenshot(page, "operations-after-export")
        finally:
            context.close()
    # what was exported is de-identified and complete
    out = root / "exports" / f"request-{request_id}.zarr"
    manifest = read_manifest(out)
    assert manifest.height == 20
    table, _ = read_selection(root / "selections" / "mi_cad_ct.parquet")
    assert not set(table.column("PatientID").to_pylist()) & set(
        manifest.get_column("PatientID").to_list()
    )
    check = subprocess.run(
        [IMGINDEX, "deid-check", str(out), "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout
    # and every step is in the audit trail with the index version it saw
    steps = [e for e in Accounts(root).audit_trail() if e.target == f"request/{request_id}"]
    assert [e.action for e in reversed(steps)] == [
        "request_submitted",
        "request_approved",
        "export_started",
        "export_finished",
    ]
    assert all(e.index_version and "index.series" in e.index_version for e in steps)


def test_requests_are_seen_and_reviewed_only_by_whom_they_concern(
    demo: tuple[Path, dict[str, str]],
) -> None:
    root = demo[0]
    with serve_app(create_app(root, run_exports=False)) as url:
        with _client(url, "researcher") as (client, csrf):
            short = client.post(
                "/requests", data={**_mi_cad_form(demo, csrf), "purpose": "too short"}
            )
            assert short.status_code == 422  # the builder again, with the reason
            assert "at least 20 characters" in _text(short.text)
            made = client.post("/requests", data={**_mi_cad_form(demo, csrf), "purpose": PURPOSE})
            assert made.status_code == 303
            path = made.headers["location"]
            assert client.get(path).status_code == 200
            assert client.get(path + "/cohort.yaml").text.startswith("name: mi-cad-ct")
        with _client(url, "bob") as (client, csrf):
            assert client.get(path).status_code == 404  # another researcher's request
            assert client.get(path + "/cohort.yaml").status_code == 404
            assert path not in client.get("/requests").text
        with _client(url, "operator") as (client, csrf):
            assert path in client.get("/requests").text  # operators follow every request
            assert (
                client.post(path.replace("/requests/", "/review/"), data={"csrf": csrf}).status_code
                == 403
            )
        with _client(url, "reviewer") as (client, csrf):
            review = path.replace("/requests/", "/review/")
            refused = client.post(review, data={"csrf": csrf, "decision": "reject"})
            assert refused.status_code == 409
            assert "comment" in _text(refused.text)
            assert client.post(review, data={"csrf": csrf, "decision": "maybe"}).status_code == 400
            done = client.post(
                review, data={"csrf": csrf, "decision": "reject", "comment": "Purpose unclear."}
            )
            assert done.status_code == 303
            page = _text(client.get(path).text)
            assert "rejected by reviewer" in page
            assert "Purpose unclear." in page
            again = client.post(review, data={"csrf": csrf, "decision": "approve"})
            assert again.status_code == 409  # reviewed once
    request_id = path.rsplit("/", 1)[1]
    actions = [
        e.action for e in Accounts(root).audit_trail() if e.target == f"request/{request_id}"
    ]
    assert actions == ["request_rejected", "request_submitted"]  # newest first


def test_a_researcher_withdraws_their_request(demo: tuple[Path, dict[str, str]]) -> None:
    with serve_app(create_app(demo[0], run_exports=False)) as url:
        with _client(url, "researcher") as (client, csrf):
            made = client.post("/requests", data={**_mi_cad_form(demo, csrf), "purpose": PURPOSE})
            path = made.headers["location"]
            assert 'id="withdraw"' in client.get(path).text
        withdraw = path.replace("/requests/", "/withdraw/")
        with _client(url, "bob") as (client, csrf):
            assert client.post(withdraw, data={"csrf": csrf}).status_code == 404  # not bob's
        with _client(url, "researcher") as (client, csrf):
            assert client.post(withdraw, data={"csrf": csrf}).status_code == 303
            page = client.get(path).text
            assert 'id="request-status">withdrawn' in page
            assert 'id="withdraw"' not in page
            assert client.post(withdraw, data={"csrf": csrf}).status_code == 409
        with _client(url, "reviewer") as (client, csrf):
            review = path.replace("/requests/", "/review/")
            late = client.post(review, data={"csrf": csrf, "decision": "approve"})
            assert late.status_code == 409
            assert "withdrawn" in _text(late.text)


def test_an_operator_exports_a_failed_request_again(
    demo: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    # A copy: the module's app runs an export runner on the demo's root.
    root = shutil.copytree(demo[0], tmp_path / "root", symlinks=True)
    requests = Requests(root, Accounts(root))
    made = requests.submit(
        User("researcher", "researcher"), form_to_cohort(_mi_cad_form(demo, "")), PURPOSE
    )
    requests.review(made.id, User("reviewer", "reviewer"), approve=True, comment="ok")
    claimed = requests.claim_next()
    assert claimed is not None
    assert claimed.id == made.id
    requests.finish(made.id, ok=False, outcome={"message": "the disk was full"})
    path = f"/requests/{made.id}"
    with serve_app(create_app(root, run_exports=False)) as url:
        with _client(url, "reviewer") as (client, csrf):
            assert "Export again" not in client.get(path).text
            assert client.post(f"/retry/{made.id}", data={"csrf": csrf}).status_code == 403
        with _client(url, "operator") as (client, csrf):
            page = client.get(path).text
            assert "the disk was full" in page
            assert 'id="retry"' in page
            again = client.post(f"/retry/{made.id}", data={"csrf": csrf})
            assert again.status_code == 303
            assert 'id="request-status">exporting' in client.get(path).text
            twice = client.post(f"/retry/{made.id}", data={"csrf": csrf})
            assert twice.status_code == 409
            assert "only a failed request" in twice.text
    retried = next(e for e in Accounts(root).audit_trail() if e.target == f"request/{made.id}")
    assert (retried.action, retried.user) == ("export_retried", "operator")
    assert retried.detail["previous"] == "the disk was full"
