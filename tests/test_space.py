"""The Gradio app: answers through its API, survives bad input, serves concurrent users, works in a browser."""

import io
import shutil
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from hub_upload.random_checkpoint import build
from space.app import ChatEngine, build_app


ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ChatEngine(str(build(tmp_path_factory.mktemp("model") / "cumo")), max_new_tokens=8,
                      max_image_pixels=2048 * 2048)


@pytest.fixture(scope="module")
def server(engine):
    app = build_app(engine, concurrency_limit=2, max_queue=32)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(path)
    return path


def ask(client, text, files=()):
    return client.predict({"text": text, "files": [handle_file(str(f)) for f in files]}, api_name="/chat")


def test_api_answers_a_question_about_an_image(server, photo):
    answer = ask(Client(server, verbose=False), "What colour is it?", [photo])
    assert isinstance(answer, str) and answer.strip() and not answer.startswith("⚠️")


def decompression_bomb(path: Path, side: int = 60000) -> Path:
    """A small PNG whose header claims side x side pixels."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8  # after the PNG signature: length (4), b"IHDR" (4), width (4), height (4), ...
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", side, side)
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])))
    path.write_bytes(bytes(data))
    return path


def test_bad_inputs_get_a_readable_message_and_the_app_keeps_serving(server, photo, tmp_path):
    client = Client(server, verbose=False)
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a picture")
    truncated = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:60])
    bomb = decompression_bomb(tmp_path / "bomb.png")
    cases = {
        "not an image": ("What is this?", [not_image], "not an image"),
        "truncated": ("What is this?", [truncated], "not an image"),
        "decompression bomb": ("What is this?", [bomb], "pixels"),
        "empty message": ("", [], "type a question"),
        "too long": ("why " * 1000, [], "longer than"),
    }
    for name, (text, files, expected) in cases.items():
        answer = ask(client, text, files)
        assert answer.startswith("⚠️") and expected in answer, (name, answer)
        good = ask(Client(server, verbose=False), "And now?", [photo])
        assert good.strip() and not good.startswith("⚠️"), name


def test_eight_concurrent_clients_all_get_answers(server, photo):
    def one(i):
        return ask(Client(server, verbose=False), f"Question {i}: what colour?", [photo])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert all(a.strip() and not a.startswith("⚠️") for a in answers), answers


def test_image_features_are_computed_once_per_conversation(engine, photo):
    calls = []
    hook = engine.model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        other = photo.parent / "other.png"
        Image.new("RGB", (33, 21), (10, 90, 200)).save(other)
        first = list(engine.stream({"text": "Describe it.", "files": [str(other)]}, [], 0.0, 0.9, 4))[-1]
        history = [{"role": "user", "content": [{"path": str(other)}, "Describe it."]},
                   {"role": "assistant", "content": first}]
        list(engine.stream({"text": "And the colour?", "files": []}, history, 0.0, 0.9, 4))
        list(engine.stream({"text": "Sure?", "files": []}, history + [
            {"role": "user", "content": "And the colour?"}, {"role": "assistant", "content": "x"}], 0.0, 0.9, 4))
    finally:
        hook.remove()
    assert calls == [1]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_browser_chat_shows_the_streamed_answer(server, photo):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server, wait_until="domcontentloaded")
        textbox = page.get_by_placeholder("Upload an image and ask about it")
        textbox.wait_for(state="visible", timeout=60_000)
        page.locator("input[type=file]").first.set_input_files(str(photo))
        textbox.fill("What colour is the shape?")
        textbox.press("Enter")
        bot = page.locator(".message.bot, [data-testid='bot']").last
        bot.wait_for(state="visible", timeout=60_000)
        page.wait_for_function(
            "() => { const m = document.querySelectorAll('.message.bot, [data-testid=\"bot\"]');"
            " return m.length && m[m.length - 1].innerText.trim().length > 0; }", timeout=60_000)
        page.wait_for_timeout(500)
        text = bot.inner_text()
        page.screenshot(path=str(ARTIFACTS / "space_chat.png"), full_page=True)
        user_image = page.locator(".message.user img, [data-testid='user'] img")
        assert user_image.count() >= 1
        browser.close()
    assert text.strip() and "⚠️" not in text
