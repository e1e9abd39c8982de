"""The wall page in a real browser (Debian's Chromium via Playwright) for the UI fixes of issue #11
item 17, where only a browser can tell: offline /docs, a tile that fits the screen, one latency figure
in the single view, a side panel that follows the results (and clears with no worker), and a visible
"no inference" notice.

A real ``genderlens view`` process on Redis database 13; the test plays capture and a worker itself
(real photo frames; results with a chosen number of faces), so it can change what the page must show.
"""

from __future__ import annotations

import dataclasses
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
from shared.schema import Face, ModelRef
from tests.helpers.browser import chromium_or_skip, launched_chromium, new_page
from tests.helpers.paths import REPO
from tests.helpers.photos import photo_paths
from tests.helpers.viewer import (
    TEST_MODEL,
    ViewerProcess,
    make_face,
    publish_frame,
    publish_result,
    redis_or_skip,
    register_camera,
)
from tests.helpers.waiting import wait_until

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
    """Plays a 10 fps camera (one real photo) and a worker whose results carry ``faces`` faces; with
    ``classes``, a worker serving a model of those classes (every face the last one, at 0.9)."""

    rdb: redis.Redis
    faces: int = 1
    results: bool = True
    classes: tuple[str, ...] | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def face(self, box: tuple[float, float, float, float]) -> Face:
        if self.classes is None:
            return make_face(box, 0.9)
        probs = {c: 0.1 / (len(self.classes) - 1) for c in self.classes[:-1]} | {self.classes[-1]: 0.9}
        return dataclasses.replace(make_face(box, 0.9), label=self.classes[-1], probs=probs)

    def model(self) -> ModelRef:
        return TEST_MODEL if self.classes is None else ModelRef("pets", "1", 0.5, self.classes)

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
                publish_result(self.rdb, entry_id, frame, [self.face(b) for b in boxes], self.model())
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
    with launched_chromium() as browser:
        yield browser


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
        assert page.locator('.count[data-class="female"] .n').inner_text() == str(faces)
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


def test_the_panel_shows_the_models_own_classes_in_their_colours(setup: Any, browser: Any) -> None:
    """The panel had rows for "female" and "male" written into the page: a model retrained on other
    folders showed neither its classes nor their counts. The rows now come from the model, in its
    order, in the colours its boxes are drawn in (Okabe-Ito by index)."""
    base, feeder = setup
    page = new_page(browser)
    live(page, base)
    page.wait_for_selector('.count[data-class="female"]')
    feeder.faces, feeder.classes = 2, ("cat", "dog", "other")
    try:
        page.wait_for_function(
            "[...document.querySelectorAll('.count.cls')].map((r) => r.dataset.class).join() === 'cat,dog,other'",
            timeout=10_000,
        )
        page.wait_for_function(
            "document.querySelector('.count[data-class=\"other\"] .n').textContent === '2'", timeout=10_000
        )
        rows = page.locator(".count.cls")
        colours = [rows.nth(i).evaluate("(r) => getComputedStyle(r).borderLeftColor") for i in range(3)]
        assert colours == ["rgb(230, 159, 0)", "rgb(86, 180, 233)", "rgb(0, 158, 115)"], colours
        assert [rows.nth(i).inner_text().split() for i in range(3)] == [
            ["0", "cat"],
            ["0", "dog"],
            ["2", "other"],
        ]
        assert page.locator(".count.female, .count.male").count() == 0
        foot = page.locator(f'.tile[data-camera="{CAMERA}"] .faces')
        page.wait_for_function(
            f"document.querySelector('.tile[data-camera={CAMERA}] .faces').textContent.includes('2 other')",
            timeout=5_000,
        )
        assert foot.inner_text() == "2 faces · 2 other"
        page.screenshot(path=str(ARTIFACTS / "classes-from-the-model.png"))
    finally:
        feeder.faces, feeder.classes = 1, None
    page.wait_for_function(
        "[...document.querySelectorAll('.count.cls')].map((r) => r.dataset.class).join() === 'female,male'",
        timeout=10_000,
    )
    page.context.close()
