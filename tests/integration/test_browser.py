"""The dashboard in a real browser after a real study went through the node.

Orthanc pushes a CT to ``mednode serve``; the CT analyzer's SEG and SR come back to Orthanc. Then
headless Chromium (Debian ``chromium``, driven by Playwright for Python; never ``playwright
install``) opens the queue page and the study page, checks that the key image with the SEG overlay
is drawn and the numbers are shown, and saves screenshots under ``docs/screenshots/`` (the README
uses them). With admin credentials configured, it also logs in, asks a question through the page
and waits until the page shows what became of it, refreshing by itself.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import REPO_ROOT, MednodeFactory, MednodeNode
from tests.integration.e2e import poll, wait_for_results
from tests.models import tiny_vlm_dirs  # noqa: F401  (session fixture)
from tests.peers import Orthanc, in_ci

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
ADMIN_ENV = {
    "MEDNODE_WEB_ADMIN_USER": "admin",
    "MEDNODE_WEB_ADMIN_PASSWORD": "browser-test-password",
    "MEDNODE_WEB_SECRET_KEY": "browser-test-secret-key-0123456789abcdef",
}


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} not found: apt-get install -y chromium chromium-driver"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def processed_node(orthanc_factory, mednode_factory: MednodeFactory, shared_dicom: Path,  # type: ignore[no-untyped-def]
                   tiny_vlm_dirs) -> tuple[MednodeNode, str]:  # noqa: F811
    """A node (with a tiny Gemma 3 model for questions) whose CT study went PACS → node → CT
    analyzer → SEG + SR → PACS."""
    files = sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm"))
    orthanc: Orthanc = orthanc_factory()
    model_env = {"MEDNODE_VLM_PATH": str(tiny_vlm_dirs["gemma3"]), "MEDNODE_VLM_FAMILY": "gemma3",
                 "MEDNODE_MODELS__VLM__MAX_NEW_TOKENS": "16"}
    node = mednode_factory(destination=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                           extra_env={**ADMIN_ENV, **model_env})
    orthanc.add_modality("mednode", node.ae_title, node.dicom_port)
    answers = [orthanc.upload(f) for f in files]
    orthanc.store_to_modality("mednode", answers[0]["ParentStudy"])
    import pydicom

    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    wait_for_results(orthanc, study_uid)
    poll(lambda: node.status()["jobs"]["delivered"] == 1, 60, what="job delivered")
    return node, study_uid


def test_queue_and_study_pages_show_the_overlay_and_numbers(browser, processed_node) -> None:  # type: ignore[no-untyped-def]
    node, study_uid = processed_node
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{node.web_url}/queue")
        assert page.locator("h1").inner_text() == "Queue"
        assert "delivered" in page.locator("#live").inner_text()
        page.screenshot(path=str(SCREENSHOTS / "queue.png"), full_page=True)

        # key images and results are patient data: a login configured means they need it
        _log_in(page, node.web_url, "/studies")
        assert page.locator(f"a[href='/studies/{study_uid}']").count() >= 1
        page.locator(f"a[href='/studies/{study_uid}']").first.click()
        page.wait_for_url(f"**/studies/{study_uid}")
        image = page.locator("img.key-image").first
        image.wait_for(state="visible", timeout=30_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('img.key-image')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=30_000,
        )
        assert page.evaluate("() => document.querySelector('img.key-image').naturalWidth") >= 512
        # the overlay is drawn: the rendered PNG has coloured (non-grey) pixels
        coloured = page.evaluate(
            """() => { const img = document.querySelector('img.key-image');
                 const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
                 const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                 const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
                 for (let i = 0; i < d.length; i += 4) { if (Math.abs(d[i] - d[i+1]) + Math.abs(d[i+1] - d[i+2]) > 30) n++; }
                 return n / (c.width * c.height); }"""
        )
        assert coloured > 0.01, f"only {coloured:.3%} of the key image is coloured: no overlay"
        numbers = page.locator("table.numbers").first.inner_text()
        assert "volume ml" in numbers and "mean hu" in numbers
        timeline = page.locator("table.timeline").inner_text()
        for event in ("first instance received", "complete (version 1)", "routed: rule ct-analysis",
                      "SEG delivered", "SR delivered"):
            assert event in timeline, timeline
        page.screenshot(path=str(SCREENSHOTS / "study.png"), full_page=True)
        page.locator("figure").first.screenshot(path=str(SCREENSHOTS / "key-image.png"))
    finally:
        page.close()


def _log_in(page, web_url: str, next_path: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{web_url}/login?next={next_path}")
    page.fill("input[name=username]", ADMIN_ENV["MEDNODE_WEB_ADMIN_USER"])
    page.fill("input[name=password]", ADMIN_ENV["MEDNODE_WEB_ADMIN_PASSWORD"])
    page.click("form.stack button")
    page.wait_for_url(f"**{next_path}")


def test_ask_a_question_through_the_page(browser, processed_node) -> None:  # type: ignore[no-untyped-def]
    node, study_uid = processed_node
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        _log_in(page, node.web_url, f"/studies/{study_uid}")
        page.select_option("#ask-form select[name=kind]", "vqa")
        page.fill("#ask-form textarea[name=text]", "Is there a pleural effusion?")
        page.click("#ask-form button")
        page.wait_for_url(f"**/studies/{study_uid}?msg=*")
        job = page.locator("article.job .tag", has_text="ask").first
        job.wait_for(timeout=10_000)
        # the page refreshes itself until the model has answered
        page.wait_for_function(
            """() => { const a = document.querySelector('article.job');
                 return a && /failed|delivered|succeeded/.test(a.querySelector('h3').innerText); }""",
            timeout=180_000,
        )
        article = page.locator("article.job").first
        assert "Is there a pleural effusion?" in article.locator("h3").inner_text()
        assert article.locator("p.reason").count() == 0, article.inner_text()
        assert article.locator(".summary").count() > 0, article.inner_text()
        assert "Is there a pleural effusion?" in article.locator(".summary").first.inner_text()
        page.screenshot(path=str(SCREENSHOTS / "ask.png"), full_page=True)
    finally:
        page.close()
