"""The live wall in a real browser (Debian's Chromium driven by Playwright; no mocks).

Real processes throughout: two ``genderlens capture`` cameras fed from real face photos (a folder
slideshow and an MJPG clip made from photos), one ``genderlens infer`` worker, and three ``genderlens
view`` servers (plain, blur on, token required) on Redis database 13. The test plays the supervisor's
part (``genderlens up``): it reads the viewer's camera requests and starts/stops capture processes.

Screenshots go to ``test-artifacts/browser/`` (gitignored), with every process's log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
import redis

from services.viewer.palette import CLASS_COLOURS, NO_MODEL_COLOUR, UNCERTAIN_COLOUR, bgr
from shared import constants as C
from shared.schema import CameraRequest, Event
from tests.helpers.browser import chromium_or_skip, launched_chromium, new_page
from tests.helpers.net import free_port
from tests.helpers.paths import REPO, WEIGHTS_DIR
from tests.helpers.photos import compose_frame, detect_faces, iou, photo_paths, sharpness
from tests.helpers.processes import genderlens
from tests.helpers.viewer import REDIS_URL, CuttableProxy, redis_or_skip
from tests.helpers.waiting import wait_until
from tools.flicker import make_clip

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]

ARTIFACTS = REPO / "test-artifacts" / "browser"
TOKEN = "wall-screen-token-0123456789"
CANVAS = (640, 480)


@dataclass
class System:
    rdb: redis.Redis
    env: dict[str, str]
    media: Path
    plain: str
    blurred: str
    guarded: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    truths: list[tuple[float, float, float, float]] = field(default_factory=list)
    requests_seen: str = "0-0"

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        proc = genderlens(*args, env={**self.env, **env}, log=ARTIFACTS / f"{name}.log", inherit_env=False)
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def capture(self, camera_id: str, source: str, fps: float = 5.0) -> None:
        self.start(
            f"capture-{camera_id}",
            "capture",
            "--source",
            source,
            "--camera-id",
            camera_id,
            "--fps",
            str(fps),
            "--loop",
        )

    def supervise(self) -> list[CameraRequest]:
        """Act on the camera requests the viewer API wrote, as `genderlens up` does."""
        done = []
        for entry_id, fields in self.rdb.xrange(C.CAMERA_REQUESTS_STREAM, f"({self.requests_seen}", "+"):
            self.requests_seen = entry_id.decode()
            request = CameraRequest.from_fields(fields)
            if request.action == "add":
                self.capture(request.camera_id, request.source)
            else:
                self.stop(f"capture-{request.camera_id}")
            done.append(request)
        return done

    def log_tail(self, name: str, chars: int = 2500) -> str:
        path = ARTIFACTS / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def compose(photo: Path) -> np.ndarray:
    """A photo centred on a fixed 640x480 canvas, so every slide has the same size."""
    return compose_frame(photo, CANVAS, background=40)[0]


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    chromium_or_skip()
    rdb = redis_or_skip()
    rdb.flushdb()  # database 13 only
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.log"):
        old.unlink()
    media = tmp_path_factory.mktemp("media")
    photos = photo_paths(8)
    (media / "alpha").mkdir()
    (media / "gamma").mkdir()
    truths = []
    for i, photo in enumerate(photos[:4]):
        canvas = compose(photo)
        ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 92])
        assert ok
        (media / "alpha" / f"{i:02d}.jpg").write_bytes(buf.tobytes())
        truths += detect_faces(buf.tobytes())
        cv2.imwrite(str(media / "gamma" / f"{i:02d}.jpg"), compose(photos[4 + i]))
    make_clip(photos[4:8], media / "beta.avi", fps=10, seconds_per_photo=3.0)
    env = {
        **os.environ,
        "GENDERLENS_REDIS_URL": REDIS_URL,
        "GENDERLENS_WEIGHTS_DIR": str(WEIGHTS_DIR),
        "GENDERLENS_MODELS_DIR": str(REPO / "models"),
        "GENDERLENS_TORCH_THREADS": "1",
        "GENDERLENS_SLIDE_SECONDS": "1.5",
        "GENDERLENS_LOG_LEVEL": "INFO",
        "GENDERLENS_SOURCE_DIRS": str(media),  # the web form adds a folder from here
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("GENDERLENS_VIEWER_TOKEN", "GENDERLENS_BLUR_FACES", "GENDERLENS_HOST", "GENDERLENS_PORT"):
        env.pop(key, None)
    ports = [free_port() for _ in range(3)]
    sys_ = System(
        rdb,
        env,
        media,
        *(f"http://127.0.0.1:{p}" for p in ports),
        truths=truths,
    )
    try:
        sys_.start("infer", "infer", "--device", "cpu", "--name", "browser-worker")
        sys_.capture("alpha", str(media / "alpha"))
        sys_.capture("beta", str(media / "beta.avi"), fps=8)
        sys_.start("view-plain", "view", "--port", str(ports[0]))
        sys_.start("view-blur", "view", "--port", str(ports[1]), GENDERLENS_BLUR_FACES="1")
        sys_.start("view-token", "view", "--port", str(ports[2]), GENDERLENS_VIEWER_TOKEN=TOKEN)

        def ready() -> bool:
            for name, proc in sys_.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited {proc.returncode}:\n{sys_.log_tail(name)}")
            cams = httpx.get(f"{sys_.plain}/api/cameras", timeout=5).json()
            return len(cams) == 2 and all(c["status"] == "live" and c["inference"] for c in cams)

        # The worker imports torch and loads YuNet: slow on a busy machine.
        wait_until(ready, timeout=240, interval=1.0, what="two live cameras with results")
        yield sys_
    finally:
        for name in list(sys_.procs):
            sys_.stop(name)
        rdb.flushdb()
        rdb.close()


@pytest.fixture(scope="module")
def browser(system: System) -> Iterator[Any]:
    with launched_chromium() as browser:
        yield browser


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    page = new_page(browser)
    yield page
    page.context.close()


def tiles(page: Any) -> list[str]:
    return [t.get_attribute("data-camera") for t in page.locator(".tile").all()]


def tile_status(page: Any, camera_id: str) -> str | None:
    tile = page.locator(f'.tile[data-camera="{camera_id}"]')
    return tile.get_attribute("data-status") if tile.count() else None


def tile_pixels(page: Any, camera_id: str) -> np.ndarray:
    png = page.locator(f'.tile[data-camera="{camera_id}"] img').screenshot()
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image.astype(np.int16)


def snapshot(page: Any, base: str, camera_id: str, **headers: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The current annotated picture (once it is a frame with its result) and the faces drawn on it,
    fetched by the browser's own HTTP client."""

    def get() -> tuple[np.ndarray, list[dict[str, Any]]] | None:
        r = page.request.get(f"{base}/cameras/{camera_id}/snapshot.jpg", headers=headers)
        assert r.ok, r.status
        if r.headers.get("x-genderlens-kind") != "shown":
            return None
        faces = json.loads(r.headers.get("x-genderlens-faces", "[]"))
        image = cv2.imdecode(np.frombuffer(r.body(), np.uint8), cv2.IMREAD_COLOR)
        return (image, faces) if faces else None

    return wait_until(get, timeout=20, interval=0.2, what=f"an annotated snapshot of {camera_id}")  # type: ignore[no-any-return]


# -- tests -------------------------------------------------------------------------------------------
def test_wall_shows_two_live_tiles_whose_images_change(system: System, page: Any) -> None:
    page.goto(system.plain)
    page.wait_for_function("document.querySelectorAll('.tile[data-status=live]').length == 2")
    assert sorted(tiles(page)) == ["alpha", "beta"]
    page.wait_for_function(
        "[...document.querySelectorAll('.tile img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    page.wait_for_timeout(1500)  # let the side panel fill in from the WebSocket
    page.screenshot(path=str(ARTIFACTS / "wall.png"))
    before = {c: tile_pixels(page, c) for c in ("alpha", "beta")}
    page.wait_for_timeout(3500)
    for camera_id, first in before.items():
        after = tile_pixels(page, camera_id)
        change = float(np.abs(after - first).mean())
        assert change > 2.0, f"tile {camera_id} looks frozen (mean change {change:.2f})"
    assert page.locator('.tile[data-camera="alpha"] .status').inner_text().lower() == "live"
    assert "fps" in page.locator('.tile[data-camera="alpha"] .fps').inner_text()
    assert page.locator("#workers-pill").inner_text().startswith("1 worker")

    # A refused model (as a worker reports it) shows up in the side panel.
    message = "refused model gender-broken: weights do not match model.json; still serving none"
    system.rdb.xadd(C.EVENTS_STREAM, Event("error", "browser-worker", message, time.time()).to_fields())
    page.wait_for_selector("#events li:has-text('refused model gender-broken')")

    # Responsive: on a phone-sized screen the tiles stack in one column above the panel.
    page.set_viewport_size({"width": 420, "height": 900})
    page.wait_for_timeout(500)
    boxes = [page.locator(f'.tile[data-camera="{c}"]').bounding_box() for c in ("alpha", "beta")]
    assert boxes[0] and boxes[1] and boxes[1]["y"] > boxes[0]["y"] + boxes[0]["height"] - 1
    page.screenshot(path=str(ARTIFACTS / "wall-narrow.png"), full_page=True)


def test_boxes_and_labels_are_drawn_where_faces_are(system: System, page: Any) -> None:
    page.goto(system.plain)
    page.wait_for_function("document.querySelectorAll('.tile[data-status=live]').length == 2")
    image, faces = snapshot(page, system.plain, "alpha")
    # female, male (the shipped model's classes), uncertain, no model
    palette = np.array(
        [bgr(c) for c in (*CLASS_COLOURS[:2], UNCERTAIN_COLOUR, NO_MODEL_COLOUR)], dtype=np.int16
    )
    for face in faces:
        # The worker's box is on a real face of the photos (YuNet run here on the originals).
        assert max(iou(face["box"], t) for t in system.truths) > 0.6, face
        x, y, w = (int(v) for v in face["box"][:3])
        edge = image[max(0, y - 1) : y + 2, x : x + w].reshape(-1, 3).astype(np.int16)
        near = np.abs(edge[:, None, :] - palette[None, :, :]).max(axis=2).min(axis=1) < 70
        # dashed boxes ("no model", "uncertain") cover about half the edge
        assert near.mean() > 0.2, f"no box drawn along {face['box']} ({near.mean():.2f} of the edge)"
        # The caption sits above the box, or just inside its top edge when the HUD is in the way.
        shares = []
        for rows in (slice(max(0, y - 12), max(1, y - 4)), slice(y + 4, y + 12)):
            strip = image[rows, x + 2 : x + 40].reshape(-1, 3).astype(np.int16)
            shares.append(
                (np.abs(strip[:, None, :] - palette[None, :, :]).max(axis=2).min(axis=1) < 70).mean()
            )
        assert max(shares) > 0.3, f"no caption drawn at the box ({shares})"
        assert face["label"] in ("female", "male", "uncertain", "no model")
    cv2.imwrite(str(ARTIFACTS / "annotated-alpha.png"), image)

    # In the page: the same boxes reach the browser's <img> (drawn into a canvas and sampled).
    def drawn_in_browser() -> bool:
        _, faces_now = snapshot(page, system.plain, "alpha")
        box = faces_now[0]["box"]
        rgb = page.evaluate(
            """([id, box]) => {
                const img = document.querySelector(`.tile[data-camera="${id}"] img`);
                const c = document.createElement('canvas');
                c.width = img.naturalWidth; c.height = img.naturalHeight;
                const ctx = c.getContext('2d');
                ctx.drawImage(img, 0, 0);
                const [x, y, w] = box.map(Math.floor);
                return Array.from(ctx.getImageData(x, Math.max(0, y - 1), w, 3).data);
            }""",
            ["alpha", box],
        )
        px = np.array(rgb, dtype=np.int16).reshape(-1, 4)[:, [2, 1, 0]]  # RGBA -> BGR
        near = np.abs(px[:, None, :] - palette[None, :, :]).max(axis=2).min(axis=1) < 70
        return bool(near.mean() > 0.2)

    wait_until(drawn_in_browser, timeout=20, interval=0.3, what="the box in the browser's tile image")
    page.wait_for_function("Number(document.getElementById('c-faces').textContent) > 0")

    # Click a tile for the single large view.
    page.locator('.tile[data-camera="alpha"]').click()
    page.wait_for_selector("#focus:not([hidden])")
    page.wait_for_function("document.getElementById('focus-img').naturalWidth > 0")
    page.wait_for_timeout(800)
    page.screenshot(path=str(ARTIFACTS / "single-view.png"))
    page.keyboard.press("Escape")
    page.wait_for_selector("#focus", state="hidden")


def test_blur_smears_pixels_inside_face_boxes(system: System, page: Any) -> None:
    page.goto(system.blurred)
    page.wait_for_function("document.querySelectorAll('.tile[data-status=live]').length == 2")
    assert page.locator("#blur-pill").is_visible()
    page.wait_for_timeout(1000)
    page.screenshot(path=str(ARTIFACTS / "wall-blurred.png"))

    def compare() -> tuple[float, float] | None:
        plain, plain_faces = snapshot(page, system.plain, "alpha")
        blurred, blur_faces = snapshot(page, system.blurred, "alpha")
        if not (
            len(plain_faces) == len(blur_faces) and iou(plain_faces[0]["box"], blur_faces[0]["box"]) > 0.9
        ):
            return None  # the slideshow moved on between the two fetches
        x, y, w, h = (int(v) for v in blur_faces[0]["box"])
        inner = (slice(y + h // 4, y + 3 * h // 4), slice(x + w // 4, x + 3 * w // 4))
        cv2.imwrite(str(ARTIFACTS / "blur-plain.png"), plain)
        cv2.imwrite(str(ARTIFACTS / "blur-blurred.png"), blurred)
        return sharpness(plain[inner]), sharpness(blurred[inner])

    sharp, smeared = wait_until(compare, timeout=30, interval=0.2, what="matching plain/blurred snapshots")
    assert smeared < 0.2 * sharp, f"face pixels not blurred: sharpness {smeared:.1f} vs {sharp:.1f}"


def test_token_required_login_form_and_401_stream(system: System, page: Any) -> None:
    response = page.goto(system.guarded)
    assert response.status == 401
    assert page.locator("#login-form").is_visible()
    page.screenshot(path=str(ARTIFACTS / "login.png"))
    assert page.request.get(f"{system.guarded}/cameras/alpha/stream.mjpg?max_frames=1").status == 401
    assert page.request.get(f"{system.guarded}/api/cameras").status == 401
    bearer = page.request.get(f"{system.guarded}/api/cameras", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer.status == 200 and len(bearer.json()) == 2
    page.fill("#token", "wrong")
    page.click("button[type=submit]")
    page.wait_for_selector("text=Wrong token")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_function("document.querySelectorAll('.tile[data-status=live]').length == 2")
    assert page.request.get(f"{system.guarded}/cameras/alpha/stream.mjpg?max_frames=1").status == 200
    page.screenshot(path=str(ARTIFACTS / "wall-after-login.png"))


def test_redis_outage_shows_reconnecting_then_recovers(system: System, page: Any) -> None:
    proxy = CuttableProxy()  # the viewer reaches Redis through it; the rest of the system does not
    proxy.start()
    port = free_port()
    try:
        system.start("view-proxied", "view", "--port", str(port), GENDERLENS_REDIS_URL=proxy.url)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200, timeout=30)
        page.goto(base)
        page.wait_for_function("document.querySelectorAll('.tile[data-status=live]').length == 2")
        proxy.cut()
        page.wait_for_function(
            "document.querySelectorAll('.tile[data-status=reconnecting]').length == 2", timeout=10_000
        )
        assert "reconnecting" in page.locator("#redis-pill").inner_text()
        page.wait_for_function(
            "document.querySelector('.tile[data-camera=alpha] img').naturalHeight === 360", timeout=5_000
        )  # the stream itself shows the "RECONNECTING" placeholder
        page.screenshot(path=str(ARTIFACTS / "wall-reconnecting.png"))
        proxy.restore()
        page.wait_for_function(
            "document.querySelectorAll('.tile[data-status=live]').length == 2", timeout=20_000
        )
        assert page.locator("#redis-pill").inner_text() == "redis ok"
    finally:
        proxy.cut()
        system.stop("view-proxied")


def test_added_camera_appears_then_shows_no_signal_when_its_source_stops(system: System, page: Any) -> None:
    page.goto(system.plain)
    page.wait_for_function("document.querySelectorAll('.tile').length == 2")
    page.click("#add-toggle")
    page.fill("input[name=source]", str(system.media / "gamma"))
    page.fill("input[name=camera_id]", "gamma")
    page.click("#add-form button[type=submit]")
    page.wait_for_selector("text=requested gamma")
    requests = wait_until(system.supervise, timeout=5, what="the add request")
    assert [(r.action, r.camera_id) for r in requests] == [("add", "gamma")]
    # The wall follows without a reload.
    page.wait_for_function(
        "document.querySelector('.tile[data-camera=gamma]')?.dataset.status === 'live'", timeout=60_000
    )
    assert len(tiles(page)) == 3
    page.screenshot(path=str(ARTIFACTS / "wall-three.png"))

    # The source dies hard (no goodbye; its heartbeat key lingers): "no signal" within a few seconds.
    stopped_at = time.monotonic()
    system.stop("capture-gamma", signal.SIGKILL)
    page.wait_for_function(
        "document.querySelector('.tile[data-camera=gamma]')?.dataset.status === 'no_signal'", timeout=10_000
    )
    took = time.monotonic() - stopped_at
    assert took < 6, f"no signal shown after {took:.1f}s"
    assert page.locator('.tile[data-camera="gamma"] .status').inner_text().lower() == "no signal"
    r = page.request.get(f"{system.plain}/cameras/gamma/snapshot.jpg")
    assert r.headers["x-genderlens-kind"] == "no_signal"  # a placeholder, not a frozen last frame
    # The tile's MJPEG image itself switches to the 640x360 "NO SIGNAL" placeholder (frames are 640x480).
    page.wait_for_function(
        "document.querySelector('.tile[data-camera=gamma] img').naturalHeight === 360", timeout=5_000
    )
    page.screenshot(path=str(ARTIFACTS / "wall-no-signal.png"))


def test_removing_a_camera_through_the_api_removes_its_tile(system: System, page: Any) -> None:
    page.goto(system.plain)
    page.wait_for_function("document.querySelector('.tile[data-camera=beta]') !== null")
    for camera_id in ("beta", "gamma"):
        r = page.request.delete(f"{system.plain}/api/cameras/{camera_id}")
        if camera_id == "beta":
            assert r.status == 202, r.text()
    system.supervise()  # stops beta's capture process, as `genderlens up` would
    assert "capture-beta" not in system.procs
    page.wait_for_function("document.querySelector('.tile[data-camera=beta]') === null", timeout=5_000)
    page.wait_for_timeout(4000)  # and it stays gone
    assert tiles(page) == ["alpha"]
    ids = [c["id"] for c in page.request.get(f"{system.plain}/api/cameras").json()]
    assert ids == ["alpha"]
    page.screenshot(path=str(ARTIFACTS / "wall-after-remove.png"))
