"""The web viewer end to end in a real headless browser (Debian's Chromium driven by Playwright).

The server runs on a free loopback port in a thread, with an access token and the tiny model biased to
"present" (``serve_fixtures``), so every concept gives a visible mask. The browser logs in through
``?token=``, uploads a real ultrasound PNG through the file picker, segments a typed concept, and the test
reads the canvas pixels to find the overlay colour; then it draws a box (text + box request), downloads
the mask and checks it, and scrolls the planes of a real MR volume. A screenshot is saved under
``tests/artifacts/``. Skipped when ``/usr/bin/chromium`` is missing (``scripts/install_browser.sh``
installs it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serve_fixtures import HC18, HIPPO, make_settings

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TOKEN = "browser-test-token"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(autouse=True)
def _chromium():
    """Skip without Chromium, or fail with ``MEDSAM3_REQUIRE_SERVICES=1`` (CI installs it)."""
    if CHROMIUM.exists():
        return
    message = "/usr/bin/chromium is missing (run scripts/install_browser.sh)"
    if os.environ.get("MEDSAM3_REQUIRE_SERVICES", "").strip() not in ("", "0"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(serve_model, tmp_path_factory):
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    from medsam3.serve.app import create_app

    port = free_port()
    app = create_app(
        make_settings(serve_model, tmp_path_factory.mktemp("browser") / "work", token=TOKEN, port=port)
    )
    with serving(app, port) as url:
        yield url


@contextlib.contextmanager
def serving(app, port: int) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1:``port`` in a thread; yields its address, stops it after."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture
def page(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 800},
            accept_downloads=True,
        )
        errors: list[str] = []
        pg = context.new_page()
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.errors = errors
        try:
            yield pg
        finally:
            context.close()


def api(server: str, path: str) -> dict:
    import httpx

    r = httpx.get(server + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    r.raise_for_status()
    return r.json()


def wait_state(page, *states: str, timeout: float = 60_000) -> str:
    selector = ", ".join(f"body[data-state={s}]" for s in states)
    page.wait_for_selector(selector, timeout=timeout)
    return page.get_attribute("body", "data-state")


def drag_box(page, left: float, top: float, width: float, height: float) -> None:
    """Draw a box on the viewer canvas; arguments are fractions of the canvas size."""
    view = page.locator("#view").bounding_box()
    x0, y0 = view["x"] + view["width"] * left, view["y"] + view["height"] * top
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + view["width"] * width, y0 + view["height"] * height, steps=6)
    page.mouse.up()


COUNT_COLOUR = """([r, g, b]) => {
  const c = document.getElementById("view");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] === r && d[i + 1] === g && d[i + 2] === b) n++;
  return n;
}"""


def test_viewer_upload_segment_refine_download(server, page, data_dir, tmp_path):
    # Without the token the viewer sends the browser to the login page.
    page.goto(server + "/")
    assert page.url.endswith("/login") and page.locator("input[name=token]").count() == 1
    page.goto(f"{server}/?token={TOKEN}")
    assert page.locator("#segment-btn").is_disabled()

    page.set_input_files("#file-input", str(data_dir / HC18))
    wait_state(page, "ready")
    assert "800 × 540" in page.text_content("#image-info")
    assert page.locator("#scope").is_hidden()  # a 2D picture has no slice scope

    page.fill("#prompt-input", "fetal head")
    page.click("#segment-btn")
    assert wait_state(page, "done", "error") == "done", page.text_content("#status")
    job = api(server, f"/api/jobs/{page.get_attribute('body', 'data-job')}")
    (entry,) = job["result"]["labels"]
    assert entry["name"] == "fetal head" and entry["area_px"] > 0
    chip = page.locator(".chip")
    assert chip.count() == 1 and "fetal head" in chip.text_content()
    assert "presence 100%" in chip.text_content()

    page.locator("#opacity").fill("100")  # opaque overlay: mask pixels show the label colour exactly
    colour = entry["color"]
    fit = page.evaluate("() => { const c = document.getElementById('view'); return [c.width, c.height]; }")
    painted = page.evaluate(COUNT_COLOUR, colour)
    scale = min((fit[0] - 32) / 800, (fit[1] - 32) / 540)
    expected = entry["area_px"] * scale * scale
    assert painted > 0.5 * expected, (painted, expected)
    page.locator("#opacity").fill("0")
    assert page.evaluate(COUNT_COLOUR, colour) < 0.01 * expected  # the image alone lacks that colour
    page.locator("#opacity").fill("60")

    # Draw a box: the viewer sends the typed text with the box.
    drag_box(page, 0.35, 0.35, 0.3, 0.3)
    first_job = job["job_id"]
    page.wait_for_selector(f"body[data-state=done]:not([data-job='{first_job}'])", timeout=60_000)
    refined = api(server, f"/api/jobs/{page.get_attribute('body', 'data-job')}")
    prompt = refined["request"]["prompts"][0]
    assert prompt["text"] == "fetal head" and len(prompt["boxes"]) == 1
    x1, y1, x2, y2 = prompt["boxes"][0]
    assert 0 <= x1 < x2 <= 800 and 0 <= y1 < y2 <= 540 and x2 - x1 > 100
    assert refined["result"]["labels"][0]["prompt"]["kind"] == "text+box"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_viewer.png"))

    with page.expect_download() as info:
        page.click("#download-mask")
    download = info.value
    assert download.suggested_filename == "000_HC_mask.png"
    saved = tmp_path / download.suggested_filename
    download.save_as(str(saved))
    from PIL import Image as PILImage

    mask = np.asarray(PILImage.open(saved))
    assert mask.shape == (540, 800) and set(np.unique(mask).tolist()) <= {0, 1}
    assert int(mask.sum()) == refined["result"]["labels"][0]["area_px"]

    # A volume: three planes, scrolled with the slider, aspect from the spacing.
    page.set_input_files("#file-input", str(data_dir / HIPPO))
    wait_state(page, "ready")
    tabs = page.locator("#planes button")
    assert [tabs.nth(i).text_content() for i in range(tabs.count())] == ["Axial", "Coronal", "Sagittal"]
    assert page.locator("#scope").is_visible()
    page.click("#planes button[data-plane=sagittal]")
    page.locator("#slice-slider").fill("3")
    assert page.text_content("#slice-label").startswith("Sagittal 4 /")
    page.screenshot(path=str(ARTIFACTS / "serve_viewer_volume.png"))
    assert not page.errors, page.errors


HIPPO19 = "msd_hippocampus/images/hippocampus_019.nii.gz"  # MR NIfTI (41, 47, 36), stored RAS


def painted_expected(page, geo: dict, voxels: int) -> float:
    """Canvas pixels that ``voxels`` label voxels of a slice with plane geometry ``geo`` cover (dpr 1)."""
    w, h = page.evaluate("() => { const c = document.getElementById('view'); return [c.width, c.height]; }")
    scale = min((w - 32) / (geo["cols"] * geo["col_spacing"]), (h - 32) / (geo["rows"] * geo["row_spacing"]))
    return voxels * geo["col_spacing"] * geo["row_spacing"] * scale * scale


def test_viewer_box_on_acquired_slice_segments_the_whole_volume(server, page, data_dir):
    import httpx

    page.goto(f"{server}/?token={TOKEN}")
    page.set_input_files("#file-input", str(data_dir / HIPPO19))
    wait_state(page, "ready")
    # Stored RAS: the slice axis k points superior (direction column (0, 0, 1) in LPS), so the volume was
    # acquired in axial slices; the viewer opens on that plane, at the middle slice (41 // 2 = 20).
    assert page.get_attribute("#planes button[data-plane=axial]", "aria-selected") == "true"
    assert page.text_content("#slice-label") == "Axial 21 / 41"
    assert page.locator("#box-scope").is_visible()
    assert page.is_checked("#box-slice") and page.locator("#propagate").is_enabled()
    assert page.locator("#box-hint").is_hidden()

    page.check("#propagate")
    page.fill("#prompt-input", "hippocampus")
    page.locator("#opacity").fill("100")  # opaque overlay: mask pixels show the label colour exactly
    drag_box(page, 0.4, 0.3, 0.2, 0.4)
    assert wait_state(page, "done", "error") == "done", page.text_content("#status")

    job = api(server, f"/api/jobs/{page.get_attribute('body', 'data-job')}")
    assert job["request"]["propagate"] is True
    assert job["request"]["slice"] == {"plane": "axial", "index": 20}
    # RAS -> display flips y and x only: axial display slice 20 is stored slice 20.
    assert job["result"]["scope"] == {
        "kind": "volume",
        "key_slice": {"plane": "axial", "index": 20, "input_slice": 20},
    }
    (entry,) = job["result"]["labels"]
    assert entry["prompt"]["kind"] == "text+box" and not entry["absent"]
    info = api(server, f"/api/images/{job['image_id']}")
    assert info["display"]["acquired_plane"] == "axial"

    r = httpx.get(
        f"{server}/api/jobs/{job['job_id']}/labels", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    r.raise_for_status()
    assert r.headers["x-dtype"] == "uint8" and r.headers["x-shape"] == "41,47,36"
    labels = np.frombuffer(r.content, np.uint8).reshape(41, 47, 36)
    per_slice = labels.reshape(41, -1).astype(bool).sum(axis=1)
    others = [k for k in np.flatnonzero(per_slice).tolist() if k != 20]
    assert per_slice[20] > 0 and others, per_slice  # labels beyond the key slice
    status = page.text_content("#status")
    assert f"Labels on {int((per_slice > 0).sum())} of 41 axial slices, propagated from slice 21." in status

    # The viewer stays on the key slice, with the box; the overlay shows there and on another labelled slice.
    assert page.text_content("#slice-label") == "Axial 21 / 41"
    colour = entry["color"]
    axial = info["display"]["planes"]["axial"]
    assert page.evaluate(COUNT_COLOUR, colour) > 0.5 * painted_expected(page, axial, int(per_slice[20]))
    far = max(others, key=lambda k: abs(k - 20))
    page.locator("#slice-slider").fill(str(far))
    assert page.text_content("#slice-label") == f"Axial {far + 1} / 41"
    assert page.evaluate(COUNT_COLOUR, colour) > 0.5 * painted_expected(page, axial, int(per_slice[far]))
    page.locator("#slice-slider").fill("20")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_viewer_propagate_axial.png"))

    # A coronal slice: the volume result shows there too, but a box drawn on it cannot be propagated.
    page.click("#planes button[data-plane=coronal]")
    assert page.locator("#propagate").is_disabled() and page.is_checked("#box-slice")
    hint = "draw the box on an axial slice to propagate it through the volume"
    assert hint in page.text_content("#box-hint") and page.locator("#box-hint").is_visible()
    assert hint in page.get_attribute("#propagate-option", "title").lower()
    per_row = labels.astype(bool).sum(axis=(0, 2))  # coronal slice j = display axis 1
    row = int(np.argmax(per_row))
    page.locator("#slice-slider").fill(str(row))
    coronal = info["display"]["planes"]["coronal"]
    assert page.evaluate(COUNT_COLOUR, colour) > 0.5 * painted_expected(page, coronal, int(per_row[row]))
    page.screenshot(path=str(ARTIFACTS / "serve_viewer_propagate_coronal.png"))

    # A box drawn here segments this coronal slice only (the whole-volume choice waits for an axial slice).
    first = job["job_id"]
    drag_box(page, 0.4, 0.4, 0.15, 0.2)
    page.wait_for_selector(f"body[data-state=done]:not([data-job='{first}'])", timeout=60_000)
    sliced = api(server, f"/api/jobs/{page.get_attribute('body', 'data-job')}")
    assert not sliced["request"]["propagate"]
    assert sliced["result"]["scope"] == {"kind": "slice", "plane": "coronal", "index": row}
    # The box on the displayed slice decides the scope (the text row is dimmed) until it is cleared.
    assert "inactive" in page.get_attribute("#scope", "class")
    page.click("#clear-box")
    assert page.locator("#clear-box").is_hidden() and "inactive" not in page.get_attribute("#scope", "class")
    # Back on the axial plane the whole-volume choice is offered again, as the user left it.
    page.click("#planes button[data-plane=axial]")
    assert page.locator("#propagate").is_enabled() and page.is_checked("#propagate")
    assert page.locator("#box-hint").is_hidden()
    assert not page.errors, page.errors
