"""The chat in a real browser (Debian's chromium driven by Playwright): upload, ask, watch the
thinking note stream and collapse, the answer and the router figure appear, and Stop end a long
answer. Screenshots go to artifacts/screenshots/.

The engine here is scripted: the fixture's random weights never write `<think>`, and a
deterministic, slow stream of events makes "the thinking note is open while reasoning" observable.
The real engine is exercised through the API in test_app.py.
"""

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from playwright.sync_api import expect, sync_playwright

from metis.routing import RoutingTrace
from metis.streaming import AnswerDelta, Done, GenerationStats, ReasoningDelta, Routed
from metis.tiny import world
from metis.ui import CSS, THEME, build_demo

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


class ScriptedEngine:
    """Streams a fixed reasoning and answer with pauses; "long" questions reason until stopped."""

    info = SimpleNamespace(to_dict=lambda: {"checkpoint": "scripted", "device": "cpu"})
    model = SimpleNamespace(config=SimpleNamespace(routing_threshold=0.5))

    def trace(self, settings_mode="auto"):
        return RoutingTrace(0.83, "think", [0.83, 0.61, 0.42, 0.55], settings_mode, 0.5)

    def route(self, messages, mode="auto", threshold=None, router=None):
        return self.trace(mode)

    def stream(self, messages, settings=None, cancel=None, router=None):
        assert messages[-1].images, "the uploaded image reaches the engine"
        start = time.perf_counter()
        yield Routed(self.trace(settings.mode))
        steps = 10_000 if "long" in messages[-1].text else 12
        for i in range(steps):
            time.sleep(0.15)
            yield ReasoningDelta(f"step {i}: counting shapes… ")
        for piece in ("There are ", "$2 + 2 = ", "4$", " shapes, so \\boxed{4}."):
            time.sleep(0.1)
            yield AnswerDelta(piece)
        total = time.perf_counter() - start
        yield Done(GenerationStats(0.05, total, steps + 4, steps, "eos"))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    uploads = tmp_path_factory.mktemp("upload")
    demo = build_demo(ScriptedEngine())
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True,
                theme=THEME, css=CSS)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium"), executable_path=str(CHROMIUM), args=FLAGS,
            viewport={"width": 1400, "height": 1000})
        page = browser.new_page()
        page.goto(demo.local_url)
        page.uploads = uploads
        yield page
        browser.close()
    demo.close()


def ask(page, text, seed):
    """Upload a new file each time: choosing the same file again fires no change event."""
    image = page.uploads / f"shapes-{seed}.png"
    world.sample(seed).image.save(image)
    expect(page.locator("#ask textarea")).to_be_enabled(timeout=10_000)  # the last answer is done
    page.locator("#ask input[type=file]").set_input_files(image)
    page.locator("#ask img").first.wait_for(timeout=10_000)  # uploaded: sending earlier drops it
    page.locator("#ask textarea").fill(text)
    page.locator("#ask textarea").press("Enter")


def test_thinking_streams_then_collapses_and_the_router_figure_appears(page):
    ask(page, "How many shapes are there?", 3)
    thinking = page.get_by_text("💭 Thinking…")
    thinking.wait_for(timeout=15_000)
    page.get_by_text("step 3: counting").wait_for(timeout=10_000)  # the reasoning streams, visibly
    page.get_by_text("step 6: counting").wait_for(timeout=10_000)  # (paint lags the DOM a little)
    page.screenshot(path=SHOTS / "chat-thinking.png")
    page.get_by_text("💭 Thought ·").wait_for(timeout=15_000)
    page.locator("#chat .katex").first.wait_for(timeout=10_000)  # the answer's math rendered
    page.get_by_text("step 3: counting").wait_for(state="hidden", timeout=5_000)  # the thought collapsed
    assert "p(think) = 0.83" in page.locator("#routing-plot").inner_text()
    page.get_by_text("Session thinking ratio").wait_for(timeout=10_000)
    page.screenshot(path=SHOTS / "chat-answer.png", full_page=True)


def test_stop_ends_a_long_answer(page):
    ask(page, "A long question", 4)
    page.get_by_text("💭 Thinking…").wait_for(timeout=15_000)
    time.sleep(1)
    page.locator("#stop").click()
    page.get_by_text("(stopped)").wait_for(timeout=5_000)
    page.screenshot(path=SHOTS / "chat-stopped.png", full_page=True)
    expect(page.locator("#ask textarea")).to_be_enabled(timeout=5_000)
