"""The viewer with a model that records its concepts (the bundled ``medsam3-nano``), in headless Chromium.

The hint under the prompt names the concepts the model knows; a typed concept outside them comes back as a
chip marked ``unknown concept · not segmented`` whose tooltip lists the known concepts, and the status line
says it was not segmented, while the known concept beside it is drawn. A known concept on an image unlike its
training images (a CT slice for "fetal head") comes back as a chip marked ``outside its training domain``.
Uses the browser setup of ``test_serve_browser.py`` (skipped without Chromium unless
``MEDSAM3_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import medsam3
import test_serve_browser as browser
from medsam3.model.resolve import BUNDLED_MODEL_DIR
from serve_fixtures import make_settings
from test_serve_browser import TOKEN, api, free_port, serving, wait_state

# the browser setup's fixtures: Chromium present (or a skip), a fresh page
_chromium = browser._chromium
page = browser.page

SAMPLE = Path(medsam3.__file__).resolve().parent / "assets" / "samples" / "hc18_400_HC.png"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    from medsam3.serve.app import create_app

    port = free_port()
    settings = make_settings(
        BUNDLED_MODEL_DIR, tmp_path_factory.mktemp("browser-nano") / "work", token=TOKEN, port=port
    )
    with serving(create_app(settings), port) as url:
        yield url


def segment_in_viewer(page, server: str, path, prompts: str) -> dict:
    """Open ``path`` in the viewer, segment it with the typed ``prompts``; the job as the server has it."""
    page.set_input_files("#file-input", str(path))
    wait_state(page, "ready")
    page.fill("#prompt-input", prompts)
    page.click("#segment-btn")
    assert wait_state(page, "done", "error") == "done", page.text_content("#status")
    return api(server, f"/api/jobs/{page.get_attribute('body', 'data-job')}")


def test_viewer_marks_unknown_concepts(server, page):
    page.goto(f"{server}/?token={TOKEN}")
    page.wait_for_selector("#concepts-hint:not([hidden])", timeout=30_000)
    hint = page.text_content("#concepts-hint")
    assert "fetal head" in hint and "posterior hippocampus" in hint and "unknown" in hint

    job = segment_in_viewer(page, server, SAMPLE, "liver, fetal head")
    assert [e["reason"] for e in job["result"]["labels"]] == ["unknown concept", None]

    unknown = page.locator(".chip.unknown")
    assert unknown.count() == 1 and page.locator(".chip").count() == 2
    assert "liver" in unknown.text_content() and "unknown concept" in unknown.text_content()
    assert "fetal head, hippocampus, polyp" in unknown.get_attribute("title")
    status = page.text_content("#status")
    assert "1 of 2 found" in status and "unknown to this model" in status and "“liver”" in status
    assert not page.errors, page.errors


def test_viewer_marks_concepts_outside_the_training_domain(server, page, data_dir):
    # a held-out CT slice: "fetal head" is unlike the model's ultrasound training images
    page.goto(f"{server}/?token={TOKEN}")
    page.wait_for_selector("#concepts-hint:not([hidden])", timeout=30_000)
    job = segment_in_viewer(page, server, data_dir / "sam_med2d_demo/images/s0619_32.png", "fetal head")
    assert [e["reason"] for e in job["result"]["labels"]] == ["outside the training domain"]

    chip = page.locator(".chip.outside")
    assert chip.count() == 1 and "outside its training domain" in chip.text_content()
    assert "unlike the images this model learnt" in chip.get_attribute("title")
    status = page.text_content("#status")
    assert "0 of 1 found" in status and "unlike the model's training images" in status
    assert not page.errors, page.errors
