"""app.py as a user meets it: the server started as `python app.py` on a free localhost port, its /estimate API
called through gradio_client, the page driven by a real browser (Debian's chromium through Playwright), and 40
requests from 8 concurrent clients.

The README's screenshot is this file's browser test run on a trained model:
    AGE_APP_CHECKPOINT=checkpoints/<run>/best.pt AGE_APP_SCREENSHOT=pics/app_grace_hopper.png \
        python -m pytest tests/test_app.py -k browser
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config import Config
from faces import DEFAULT_CROP_GEOMETRIES
from model import AgeEstimationModel, save_checkpoint
from tests.helpers import REAL_DATA

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

ROOT = Path(__file__).resolve().parents[1]
HOPPER = REAL_DATA.parent / "images" / "grace_hopper_512x512.jpg"
MAX_PIXELS = 1_000_000  # the test server's --max_image_pixels


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_memory(pid: int) -> int:
    """Resident memory of a process in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python app.py` serving a small untrained distribution-head model (or $AGE_APP_CHECKPOINT) on localhost."""
    folder = tmp_path_factory.mktemp("app")
    checkpoint = os.environ.get("AGE_APP_CHECKPOINT")
    if not checkpoint:
        torch.manual_seed(0)
        model = AgeEstimationModel("resnet18", image_size=32, head="dex")
        model.set_age_statistics(35.0, 15.0)
        checkpoint = folder / "best.pt"
        save_checkpoint(checkpoint, model, Config(model_name="resnet18", pretrained=False, image_size=32, head="dex"),
                        crop_geometry={name: geometry.to_dict() for name, geometry in DEFAULT_CROP_GEOMETRIES.items()})
    port = _free_port()
    log = (folder / "server.log").open("w")
    temporary = folder / "tmp"  # the server's temporary folder: its users' photos live there, and only while it runs
    temporary.mkdir()
    process = subprocess.Popen(
        [sys.executable, "app.py", f"--checkpoint={checkpoint}", f"--checkpoint_dir={folder / 'none'}",
         f"--port={port}", f"--max_image_pixels={MAX_PIXELS}", "--max_upload_megabytes=2", "--device=cpu",
         "--max_video_seconds=5"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(temporary)})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            client = Client(url, verbose=False)
            break
        except Exception:  # noqa: BLE001 - not listening yet
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"app.py did not start:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield {"url": url, "client": client, "process": process, "folder": folder, "checkpoint": str(checkpoint),
           "temporary": temporary}
    process.terminate()  # SIGTERM, as a service stop sends it
    process.wait(timeout=30)
    log.close()
    assert not list(temporary.glob("age_app_*")), "SIGTERM left the app's folder of users' photos behind"


def _photo(folder: Path) -> Path:
    """The public-domain portrait when ../shared is present, else a generated scene with a synthetic face."""
    if HOPPER.is_file():
        return HOPPER
    from demo import SKIN_TONES, draw_face

    path = folder / "generated.jpg"
    if not path.exists():
        scene = np.full((400, 400, 3), 128, np.uint8)
        scene[100:300, 100:300] = np.asarray(draw_face(30, "female", next(iter(SKIN_TONES)),
                                                       np.random.default_rng(0), size=200))
        Image.fromarray(scene).save(path, quality=92)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG file claiming width x height RGB pixels whose data holds a few rows: opening it is cheap, decoding
    it is not."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
            + chunk(b"IEND", b""))


def _check_rows(rows: list[dict], label: str) -> None:
    assert isinstance(rows, list)
    for row in rows:
        assert 0 <= row["age"] <= 120 and row["spread"] > 0 and 0 <= row["adult_probability"] <= 1
        assert len(row["box"]) == 4 and len(row["landmarks"]) == 5 and row["model"] == label


@pytest.mark.slow  # the server fixture starts python app.py (~15 s)
def test_api_estimates_a_generated_face_and_the_portrait(server, tmp_path):
    client, label = server["client"], server["checkpoint"]
    generated = tmp_path / "scene.jpg"
    scene = np.full((300, 300, 3), 90, np.uint8)
    from demo import SKIN_TONES, draw_face

    scene[50:250, 50:250] = np.asarray(draw_face(40, "male", next(iter(SKIN_TONES)), np.random.default_rng(1),
                                                 size=200))
    Image.fromarray(scene).save(generated)
    _check_rows(client.predict(handle_file(str(generated)), api_name="/estimate"), label)  # faces or none, no error
    # gradio's copy of the upload is inside the app's own folder (removed with it), not in a shared gradio cache
    assert list(server["temporary"].glob("age_app_*/uploads/**/scene.jpg"))
    assert not (server["temporary"] / "gradio").exists()
    if not HOPPER.is_file():
        pytest.skip("../shared/images absent: the portrait check needs grace_hopper_512x512.jpg")
    rows = client.predict(handle_file(str(HOPPER)), api_name="/estimate")
    assert len(rows) == 1, rows
    _check_rows(rows, label)
    x, y, width, height = rows[0]["box"]
    assert 120 < x + width / 2 < 400 and 80 < y + height / 2 < 350  # the face, not the flag or the badge
    with_tta = client.predict(handle_file(str(HOPPER)), label, True, 40, api_name="/estimate")
    assert len(with_tta) == 1 and abs(with_tta[0]["age"] - rows[0]["age"]) < 5
    coarse = client.predict(handle_file(str(HOPPER)), label, False, 120, api_name="/estimate")
    assert [row["box"] for row in coarse] != [rows[0]["box"]]  # the smallest-face setting reaches the detector


@pytest.mark.slow  # the server fixture starts python app.py (~15 s)
def test_api_answers_bad_input_with_a_message_and_keeps_serving(server, tmp_path):
    client = server["client"]
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a photo")
    with pytest.raises(AppError, match=r"notes\.jpg is not an image"):
        client.predict(handle_file(str(text)), api_name="/estimate")
    # the page's photo input reaches read_photo undecoded: our messages, not gradio's or PIL's
    with pytest.raises(AppError, match=r"notes\.jpg is not an image"):
        client.predict(handle_file(str(text)), api_name="/photo")
    drawing = tmp_path / "drawing.svg"
    drawing.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    with pytest.raises(AppError, match=r"drawing\.svg is not an image"):
        client.predict(handle_file(str(drawing)), api_name="/photo")
    bomb = tmp_path / "bomb.png"  # a 900-megapixel header over a few bytes of data
    bomb.write_bytes(_png_header_only(30_000, 30_000))
    for api_name in ("/photo", "/estimate"):
        with pytest.raises(AppError, match=r"bomb\.png has .*more .*than the app's limit"):
            client.predict(handle_file(str(bomb)), api_name=api_name)
    huge = tmp_path / "huge.png"
    Image.new("RGB", (1100, 1000), (120, 90, 80)).save(huge)
    with pytest.raises(AppError, match="more than the app's limit"):
        client.predict(handle_file(str(huge)), api_name="/estimate")
    too_large = tmp_path / "large.bmp"  # 2.3 MB over the server's --max_upload_megabytes=2
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 960, 3), np.uint8)).save(too_large)
    with pytest.raises(Exception, match=r"(?i)file size|too large|exceed"):
        client.predict(handle_file(str(too_large)), api_name="/estimate")
    with pytest.raises(AppError, match=r"(?i)not in the list of choices|unknown model"):
        client.predict(handle_file(str(_photo(tmp_path))), "/etc/passwd", api_name="/estimate")
    broken = tmp_path / "clip.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    with pytest.raises(AppError, match=r"(?i)not a video|could not|decode"):
        client.predict(handle_file(str(broken)), api_name="/clip")
    assert server["process"].poll() is None
    _check_rows(client.predict(handle_file(str(_photo(tmp_path))), api_name="/estimate"), server["checkpoint"])


@pytest.mark.slow  # the server fixture starts python app.py (~15 s)
def test_api_annotates_a_clip(server, tmp_path):
    import cv2

    photo = np.asarray(Image.open(_photo(tmp_path)).convert("RGB"))
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (photo.shape[1], photo.shape[0]))
    for shift in range(6):  # the photo sliding right by 4 px per frame
        writer.write(cv2.cvtColor(np.roll(photo, 4 * shift, axis=1), cv2.COLOR_RGB2BGR))
    writer.release()
    video, rows_file, message = server["client"].predict(handle_file(str(clip)), api_name="/clip")
    video_path = video["video"] if isinstance(video, dict) else video
    capture = cv2.VideoCapture(video_path)
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == 6 and video_path.endswith(".webm")  # VP8 WebM: what a browser plays
    rows = [__import__("json").loads(line) for line in Path(rows_file).read_text().splitlines()]
    assert "face detections" in message and {row["frame"] for row in rows} <= set(range(6))
    if HOPPER.is_file():
        assert len(rows) == 6 and len({row["track"] for row in rows}) == 1  # one face, tracked across the clip


def test_the_default_model_is_the_shipped_one_and_ones_runs_are_offered(tmp_path, monkeypatch):
    import app
    import model

    monkeypatch.chdir(tmp_path)  # no demo_output/ here
    shipped = model.SHIPPED_MODEL
    monkeypatch.setattr(model, "SHIPPED_MODEL", tmp_path / "models" / "absent.pt")
    with pytest.raises(SystemExit, match="no shipped model"):
        app.find_model_files(Config(checkpoint_dir=str(tmp_path / "checkpoints")))
    monkeypatch.setattr(model, "SHIPPED_MODEL", shipped)
    for run, name in (("old", "best.pt"), ("old", "model.onnx"), ("new", "best.pt"), ("new", "last.pt")):
        (tmp_path / "checkpoints" / run).mkdir(parents=True, exist_ok=True)
        (tmp_path / "checkpoints" / run / name).write_bytes(b"x")
        time.sleep(0.01)
    demo = tmp_path / app.DEMO_CHECKPOINTS / "demo"
    demo.mkdir(parents=True)
    (demo / "best.pt").write_bytes(b"x")  # the newest file of all, and never the default
    files = app.find_model_files(Config(checkpoint_dir="checkpoints"))
    assert next(iter(files.values())) == shipped.resolve()  # the page's default: the shipped model
    own = ["checkpoints/new/best.pt", "checkpoints/old/model.onnx", "checkpoints/old/best.pt"]
    assert list(files)[1:4] == own and list(files.values())[-1] == (demo / "best.pt").resolve()
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "results.json").write_text("{}")  # old finished; new is still training
    latest = app.find_model_files(Config(checkpoint_dir="checkpoints", checkpoint="latest"))
    assert next(iter(latest.values())) == (tmp_path / "checkpoints" / "old" / "best.pt").resolve()
    shelf = app.ModelShelf(files)
    with pytest.raises(app.InputError, match="unknown model"):
        shelf.predictor("/etc/passwd")
    with pytest.raises(SystemExit, match="does not exist"):
        app.find_model_files(Config(checkpoint="missing.pt"))


def test_a_pasted_photo_and_a_clip_are_held_to_the_limits_whatever_they_declare(tmp_path):
    import base64

    import cv2

    import app

    too_big = "data:image/bmp;base64," + base64.b64encode(bytes(3_000_000)).decode()
    with pytest.raises(app.InputError, match="more than the app's limit of 2 MB"):
        app.uploaded_photo({"path": None, "url": too_big}, tmp_path, max_megabytes=2)
    assert not list(tmp_path.iterdir())  # refused before anything was decoded or written
    clip = tmp_path / "fast.avi"  # 400 frames declared at 1,000 frames/s: 0.4 s by its header
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 1000, (32, 32))
    for index in range(400):
        writer.write(np.full((32, 32, 3), index % 255, dtype=np.uint8))
    writer.release()
    with pytest.raises(app.InputError, match="400 frames"):
        app.estimate_clip(Config(max_video_seconds=5), None, clip, "model", False, 40, tmp_path)


def test_read_photo_checks_the_pixel_count_before_decoding(tmp_path):
    import app

    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200)).save(path)
    assert app.read_photo(path, 60_000).shape == (200, 300, 3)
    with pytest.raises(app.InputError, match="300 x 200 pixels"):
        app.read_photo(path, 59_999)


def test_the_page_photo_arrives_undecoded_as_a_file_or_a_data_url(tmp_path):
    import base64
    import io

    import app

    photo = tmp_path / "face.png"
    Image.new("RGB", (40, 30), (200, 150, 120)).save(photo)
    assert app.uploaded_photo({"path": str(photo), "url": None}, tmp_path) == photo
    assert app.uploaded_photo(None, tmp_path) is None
    encoded = io.BytesIO()
    Image.new("RGBA", (20, 10)).save(encoded, format="PNG")
    pasted = app.uploaded_photo({"path": None, "url": "data:image/png;base64,"
                                 + base64.b64encode(encoded.getvalue()).decode()}, tmp_path)
    assert pasted.parent == tmp_path and app.read_photo(pasted, 1000).shape == (10, 20, 3)
    with pytest.raises(app.InputError, match="base64"):
        app.uploaded_photo({"path": None, "url": "data:image/png;base64,@@@"}, tmp_path)
    with pytest.raises(app.InputError, match="did not arrive"):
        app.uploaded_photo({"path": None, "url": "https://example.com/a.png"}, tmp_path)


def _chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)


@pytest.mark.slow  # the server fixture starts python app.py (~15 s)
def test_browser_uploads_a_photo_and_reads_the_table(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    if executable is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's with apt)")
    photo = _photo(tmp_path)
    screenshot = Path(os.environ.get("AGE_APP_SCREENSHOT", tmp_path / "app.png"))
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1500})
        page.goto(server["url"])
        page.locator("input[type=file]").first.set_input_files(str(photo))
        page.locator("img").first.wait_for(timeout=30_000)  # the upload is shown before it is sent
        page.get_by_role("button", name="Estimate ages").first.click()
        page.get_by_text("found with").or_(page.get_by_text("No face found")).first.wait_for(timeout=90_000)
        table = page.locator("table", has_text="P(age >= 18)")
        if photo == HOPPER:  # the table is filled just after the message: wait for its first face number
            playwright.expect(table.locator("tbody tr td").first).to_have_text("1", timeout=30_000)
        cells = [table.locator("tbody tr").nth(row).locator("td").all_text_contents()
                 for row in range(table.locator("tbody tr").count())]
        page.wait_for_load_state("networkidle")  # the gallery's images (lazy: inside the tall viewport) arrive last
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    faces = [row for row in cells if row and row[0].strip()]
    if photo == HOPPER:
        assert len(faces) == 1, cells
        assert 0 <= float(faces[0][2]) <= 120 and float(faces[0][3]) > 0  # age, spread
    assert screenshot.stat().st_size > 10_000


@pytest.mark.slow  # the server fixture starts python app.py (~15 s)
def test_load_forty_requests_from_eight_clients(server, tmp_path):
    """Every request answered correctly, none lost, the server's memory back within 10 % of where it started;
    prints requests/s and the 95th-percentile latency (RESULTS.md, "The web app")."""
    photo, url, pid = str(_photo(tmp_path)), server["url"], server["process"].pid
    expected = server["client"].predict(handle_file(photo), api_name="/estimate")

    def one_client(requests: int) -> list[tuple[float, list]]:
        client = Client(url, verbose=False)
        answers = []
        for _ in range(requests):
            started = time.perf_counter()
            rows = client.predict(handle_file(photo), api_name="/estimate")
            answers.append((time.perf_counter() - started, rows))
        return answers

    with ThreadPoolExecutor(8) as pool:  # a first round from 8 clients: the server's threads and buffers exist
        list(pool.map(one_client, [1] * 8, timeout=300))
    start_memory = _server_memory(pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = [answer for answers in pool.map(one_client, [5] * 8, timeout=300) for answer in answers]
    seconds = time.perf_counter() - started
    assert len(results) == 40
    for _, rows in results:
        assert [row["age"] for row in rows] == [row["age"] for row in expected]
    latencies = sorted(latency for latency, _ in results)
    end_memory = _server_memory(pid)
    p95 = statistics.quantiles(latencies, n=20)[-1]
    print(f"\napp load: 40 requests from 8 clients in {seconds:.1f} s = {40 / seconds:.2f} requests/s; latency "
          f"median {statistics.median(latencies):.2f} s, p95 {p95:.2f} s; server memory "
          f"{start_memory / 2**20:.0f} -> {end_memory / 2**20:.0f} MiB")
    assert end_memory <= 1.10 * start_memory
