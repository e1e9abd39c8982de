"""The wall page in a real browser (Debian's Chromium via Playwright) for the UI fixes of issue #11
item 17, where only a browser can tell: offline /docs, a tile that fits the screen, one latency figure
in the single view, a side panel that follows the results (and clears with no worker), and a visible
"no inference" notice.

A real ``genderlens view`` process on Redis database 13; the test plays capture and a worker itself
(real photo frames; results with a chosen number of faces), so it can change what the page must show.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pytest
import redis

from shared import constants as C
from tests.test_browser_viewer import CHROMIUM, LAUNCH_ARGS, chromium_or_skip
from tests.test_viewer_hardening import ViewerProcess
from tests.test_viewer_support import (
    REPO,
    make_face,
    photo_paths,
    publish_frame,
    publish_result,
    redis_or_skip,
    register_camera,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

ARTIFACTS = REPO / "test-artifacts" / "browser"
CAMERA = "solo"
#: Drops the WebSocket's "stats" messages while window.__dropStats is true (see the panel test).
STATS_FILTER = """
(() => {
  const Native = window.WebSocket;
  window.__dropStats = false;
  class Filtered extends Native {
    set onmessage(fn) {
      super.onmessage = (ev) => {
        try { if (window.__dropStats && JSON.parse(ev.data).type === "stats") return; } catch (e) {}
        fn(ev);
      };
    }
    get onmessage() { return super.onmessage; }
  }
  window.WebSocket = Filtered;
})();
"""


@dataclass
class Feeder:
    """Plays a 10 fps camera (one real photo) and a worker whose results carry ``faces`` faces."""

    rdb: redis.Redis
    faces: int = 1
    results: bool = True
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        image = cv2.imread(str(photo_paths(1)[0]), cv2.IMREAD_COLOR)
        assert image is not None
        image = cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA)
        jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
        seq = 0
        while not self.stop.is_set():
            entry_id, frame = publish_frame(self.rdb, CAMERA, seq, jpeg, 640, 480)
            if self.results:
                boxes = [(40.0 + 140 * i, 200.0, 100.0, 100.0) for i in range(self.faces)]
                publish_result(self.rdb, entry_id, frame, [make_face(b, 0.9) for b in boxes])
            if seq % 10 == 0:
                self.rdb.set(C.camera_heartbeat_key(CAMERA), "live", ex=C.CAMERA_HEARTBEAT_TTL_S)
            seq += 1
            self.stop.wait(0.1)


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[str, Feeder]]:
    chromium_or_skip()
    rdb = redis_or_skip()
    rdb.flushdb()  # database 13 only
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    register_camera(rdb, CAMERA)
    feeder = Feeder(rdb)
    thread = threading.Thread(target=feeder.run, daemon=True)
    thread.start()
    viewer = ViewerProcess("viewer-ui")
    try:
        viewer.wait_ready()
        yield viewer.base, feeder
    finally:
        feeder.stop.set()
        thread.join(5)
        viewer.stop()
        rdb.flushdb()
        rdb.close()


@pytest.fixture(scope="module")
def browser(setup: Any) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield browser
        browser.close()


def new_page(browser: Any, width: int = 1366, height: int = 800) -> Any:
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(15_000)
    return page


def live(page: Any, base: str) -> None:
    page.goto(base)
    page.wait_for_function(
        f"document.querySelector('.tile[data-camera={CAMERA}]')?.dataset.status === 'live'"
    )


def test_docs_render_without_any_other_site(setup: Any, browser: Any) -> None:
    """/docs loaded Swagger UI from a CDN: blank on an offline machine. Requests to anything but the
    viewer are refused here, as they would fail offline."""
    base, _ = setup
    page = new_page(browser)
    outside: list[str] = []

    def only_local(route: Any) -> None:
        if route.request.url.startswith(base):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(f"{base}/docs")
    page.wait_for_selector(".opblock", timeout=20_000)
    assert page.locator(".opblock").count() >= 5
    assert page.get_by_text("/api/cameras", exact=True).count() >= 1
    page.screenshot(path=str(ARTIFACTS / "docs-offline.png"))
    assert not outside, outside
    page.context.close()


def test_a_tile_fits_a_short_wide_screen(setup: Any, browser: Any) -> None:
    """One camera on a 1920x800 screen: the 16:9 tile was taller than the screen."""
    base, _ = setup
    for width, height in ((1920, 800), (1366, 700), (880, 560)):
        page = new_page(browser, width, height)
        live(page, base)
        page.wait_for_timeout(300)
        tile = page.locator(f'.tile[data-camera="{CAMERA}"]').bounding_box()
        foot = page.locator(f'.tile[data-camera="{CAMERA}"] .tile-foot').bounding_box()
        assert tile and foot
        assert tile["height"] <= height, f"{width}x{height}: tile {tile['height']:.0f}px tall"
        assert foot["y"] + foot["height"] <= height + 1, (
            f"{width}x{height}: the tile's foot is off the screen"
        )
        page.screenshot(path=str(ARTIFACTS / f"tile-{width}x{height}.png"))
        page.context.close()


def test_single_view_shows_one_latency_figure(setup: Any, browser: Any) -> None:
    base, _ = setup
    page = new_page(browser)
    live(page, base)
    page.locator(f'.tile[data-camera="{CAMERA}"]').click()
    page.wait_for_selector("#focus:not([hidden])")
    page.wait_for_timeout(2500)  # a few stats messages, which used to rewrite the title with figures
    title = page.locator("#focus-title").inner_text()
    assert CAMERA in title and "live" in title
    # The picture's own heads-up line carries fps and latency; the title no longer repeats them.
    assert "ms" not in title and "fps" not in title, title
    page.screenshot(path=str(ARTIFACTS / "single-view-title.png"))
    page.context.close()


def test_panel_follows_the_results_and_clears_without_workers(setup: Any, browser: Any) -> None:
    """The side panel's counts came from the stats message (once a second), so they lagged the
    picture, and stayed at their last value once no worker was left."""
    base, feeder = setup
    page = new_page(browser)
    page.add_init_script(STATS_FILTER)
    live(page, base)
    page.wait_for_function("document.getElementById('c-faces').textContent === '1'")
    # Without any stats message, the counts still follow the results (each result message).
    page.evaluate("window.__dropStats = true")
    for faces in (3, 2, 1):
        feeder.faces = faces
        started = time.monotonic()
        page.wait_for_function(f"document.getElementById('c-faces').textContent === '{faces}'", timeout=5_000)
        took = time.monotonic() - started
        assert page.locator("#c-female").inner_text() == str(faces)
        assert took < 3, f"panel took {took:.1f}s"
    page.evaluate("window.__dropStats = false")
    # The worker goes away: the counts go to zero and the tile says "no inference" in its head.
    feeder.results = False
    try:
        page.wait_for_function("document.getElementById('c-faces').textContent === '0'", timeout=10_000)
        note = page.locator(f'.tile[data-camera="{CAMERA}"] .note')
        note.wait_for(state="visible", timeout=10_000)
        box = note.bounding_box()
        assert box and box["y"] >= 0 and box["y"] + box["height"] <= 800  # on the screen
        assert "no inference" in note.inner_text()
        faces_text = page.locator(f'.tile[data-camera="{CAMERA}"] .faces').inner_text()
        assert faces_text.startswith("0 faces"), faces_text
        page.screenshot(path=str(ARTIFACTS / "no-inference.png"))
    finally:
        feeder.results = True
    page.wait_for_function("document.getElementById('c-faces').textContent === '1'", timeout=10_000)
    page.locator(f'.tile[data-camera="{CAMERA}"] .note').wait_for(state="hidden", timeout=5_000)
    page.context.close()


def test_no_inference_banner_is_not_over_the_bottom_of_the_picture(setup: Any, browser: Any) -> None:
    """The burned-in "no inference" banner sat at the bottom of the video, off the screen when the
    tile was cut; it is now on the heads-up line at the top of the picture (and in the tile head)."""
    base, feeder = setup
    page = new_page(browser)
    feeder.results = False
    try:

        def raw() -> tuple[np.ndarray] | None:
            r = page.request.get(f"{base}/cameras/{CAMERA}/snapshot.jpg")
            if r.headers.get("x-genderlens-kind") != "raw":
                return None
            return (cv2.imdecode(np.frombuffer(r.body(), np.uint8), cv2.IMREAD_COLOR),)

        (image,) = wait_until(raw, timeout=10, what="a raw frame (no inference)")
    finally:
        feeder.results = True
    yellow = np.abs(image.astype(np.int16) - np.array([66, 228, 240])).max(axis=2) < 40
    height = image.shape[0]
    assert yellow[: height // 4].mean() > 0.005, "no notice at the top"
    assert yellow[height // 2 :].mean() < 0.001, "the notice still covers the bottom of the picture"
    page.context.close()
