"""The app in a real browser (Debian's chromium driven by Playwright).

A scripted engine makes the streaming observable: upload, ask, watch the thinking note stream
and collapse, the answer and the router figure appear, Stop end a long answer (screenshots in
artifacts/screenshots/). Its reasoning waits at a gate the test opens, so "the note is open while
reasoning" never depends on how fast the page paints.

Then the embedded model, as a visitor sees it: a thinking answer with the router panel, the
compare tab and the fine-tuning tab. Those screenshots are the README's (docs/screenshots/);
running this file regenerates them. Emoji need a colour emoji font (.ci/run installs
fonts-noto-color-emoji).
"""

import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from metis.routing import RoutingTrace
from metis.serving.interface import ModelDescription
from metis.streaming import AnswerDelta, Done, GenerationStats, ReasoningDelta, Routed
from metis.tiny import world
from metis.ui import CSS, THEME, build_demo

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "artifacts" / "screenshots"
README_SHOTS = ROOT / "docs" / "screenshots"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
PACE_S = 0.15  # between scripted pieces: longer than the UI's 50 ms throttle, so each one is shown


class ScriptedEngine:
    """Streams a fixed reasoning and answer. The reasoning stops at `gate` until the test opens
    it; "long" questions reason until stopped."""

    available, error, default_threshold = True, None, 0.5

    def describe(self):
        return ModelDescription({"checkpoint": "scripted", "device": "cpu"}, attn_implementation="sdpa")

    def __init__(self):
        self.gate = threading.Event()

    def trace(self, settings_mode="auto"):
        return RoutingTrace(0.83, "think", [0.83, 0.61, 0.42, 0.55], settings_mode, 0.5)

    def route(self, messages, mode="auto", threshold=None, router=None):
        return self.trace(mode)

    def stream(self, messages, settings=None, cancel=None, router=None):
        assert messages[-1].images, "the uploaded image reaches the engine"
        start = time.perf_counter()
        yield Routed(self.trace(settings.mode))
        long = "long" in messages[-1].text
        steps = 0
        while long or steps < 12:
            if steps == 6 and not long:
                assert self.gate.wait(timeout=120), "the test never opened the gate"
            time.sleep(PACE_S)
            yield ReasoningDelta(f"step {steps}: counting shapes… ")
            steps += 1
        for piece in ("There are ", "$2 + 2 = ", "4$", " shapes, so \\boxed{4}."):
            time.sleep(PACE_S)
            yield AnswerDelta(piece)
        yield Done(GenerationStats(0.05, time.perf_counter() - start, steps + 4, steps, "eos"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    assert CHROMIUM.exists(), "the browser tests need Debian's chromium: apt-get install -y chromium"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium"), executable_path=str(CHROMIUM), args=FLAGS,
            viewport={"width": 1400, "height": 1000})
        yield context
        context.close()


def open_app(browser, engine, uploads):
    demo = build_demo(engine)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, theme=THEME, css=CSS)
    page = browser.new_page()
    page.goto(demo.local_url)
    page.uploads = uploads
    return demo, page


@pytest.fixture(scope="module")
def scripted(browser, tmp_path_factory):
    engine = ScriptedEngine()
    demo, page = open_app(browser, engine, tmp_path_factory.mktemp("upload"))
    page.engine = engine
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield page
    page.close()
    demo.close()


def ask(page, text, image=None, seed=0, scope=None):
    """Upload a new file each time: choosing the same file again fires no change event."""
    scope = scope or page.locator("#ask")
    if image is None:
        image = page.uploads / f"shapes-{seed}.png"
        world.sample(seed).image.save(image)
    expect(scope.locator("textarea")).to_be_enabled(timeout=30_000)  # the last answer is done
    scope.locator("input[type=file]").set_input_files(image)
    scope.locator("img").first.wait_for(timeout=30_000)  # uploaded: sending earlier drops it
    scope.locator("textarea").fill(text)
    scope.locator("textarea").press("Enter")


def test_thinking_streams_then_collapses_and_the_router_figure_appears(scripted):
    page = scripted
    ask(page, "How many shapes are there?", seed=3)
    page.get_by_text("💭 Thinking…").wait_for(timeout=30_000)
    page.get_by_text("step 5: counting").wait_for(timeout=30_000)  # streamed up to the gate
    page.screenshot(path=SHOTS / "chat-thinking.png")
    page.engine.gate.set()
    page.get_by_text("💭 Thought ·").wait_for(timeout=30_000)
    page.locator("#chat .katex").first.wait_for(timeout=30_000)  # the answer's math rendered
    page.get_by_text("step 3: counting").wait_for(state="hidden", timeout=30_000)  # the thought collapsed
    assert "p(think) = 0.83" in page.locator("#routing-plot").inner_text()
    page.get_by_text("Session thinking ratio").wait_for(timeout=30_000)
    page.screenshot(path=SHOTS / "chat-answer.png", full_page=True)


def test_stop_ends_a_long_answer(scripted):
    page = scripted
    ask(page, "A long question", seed=4)
    page.get_by_text("💭 Thinking…").wait_for(timeout=30_000)
    page.get_by_text("step 2: counting").wait_for(timeout=30_000)  # it is generating
    page.locator("#stop").click()
    page.get_by_text("(stopped)").wait_for(timeout=30_000)
    page.screenshot(path=SHOTS / "chat-stopped.png", full_page=True)
    expect(page.locator("#ask textarea")).to_be_enabled(timeout=30_000)


def test_readme_screenshots_of_the_embedded_model(browser, tmp_path):
    """The embedded model thinking, then comparing its experts, then fine-tuning its router."""
    from metis.serving.engine import Engine

    README_SHOTS.mkdir(parents=True, exist_ok=True)
    demo, page = open_app(browser, Engine.load(), tmp_path)
    try:
        ask(page, "How many more circles than squares are there?", ROOT / "assets/examples/shapes-reasoning-2.png")
        page.get_by_text("💭 Thought ·").wait_for(timeout=60_000)
        page.get_by_text("Session thinking ratio").wait_for(timeout=60_000)
        page.get_by_text("💭 Thought ·").click()  # open the reasoning for the picture
        page.screenshot(path=README_SHOTS / "chat.png", full_page=True)

        page.get_by_role("tab", name="Compare experts").click()
        panel = page.get_by_role("tabpanel").filter(visible=True)
        ask(page, "How many more circles than squares are there?",
            ROOT / "assets/examples/shapes-reasoning-5.png", scope=panel)
        panel.get_by_text("The direct expert used").wait_for(timeout=60_000)
        page.screenshot(path=README_SHOTS / "compare.png", full_page=True)

        page.get_by_role("tab", name="Fine-tune router").click()
        panel = page.get_by_role("tabpanel").filter(visible=True)
        panel.get_by_role("button", name="Start").click()
        panel.get_by_text("Done.", exact=True).wait_for(timeout=180_000)  # the sample dataset, trained
        page.screenshot(path=README_SHOTS / "finetune.png", full_page=True)
    finally:
        page.close()
        demo.close()
    assert all((README_SHOTS / f"{name}.png").stat().st_size > 20_000 for name in ("chat", "compare", "finetune"))


def test_evaluate_tab_upload_to_plot(browser, tmp_path):
    """The embedded model on an uploaded 4-question dataset: progress, tables and the curve."""
    import json

    from metis.serving.engine import Engine

    rows = []
    for i, s in enumerate(world.generate("test", 4, wording="test")):
        s.image.save(tmp_path / f"q{i}.png")
        rows.append({"question": s.question, "images": [f"q{i}.png"], "answer": s.answer})
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    demo, page = open_app(browser, Engine.load(), tmp_path)
    try:
        page.get_by_role("tab", name="Evaluate").click()
        files = page.locator("#evaluate-files")
        files.locator("input[type=file]").set_input_files([tmp_path / "mine.jsonl"]
                                                          + [tmp_path / f"q{i}.png" for i in range(4)])
        files.get_by_text("mine.jsonl").wait_for(timeout=30_000)  # uploaded
        page.locator("#evaluate-start").click()
        page.locator("#evaluate-curve").get_by_text("Trade-off: auto at threshold").wait_for(timeout=120_000)
        assert "4 questions" in page.locator("#evaluate-status").inner_text()
        page.get_by_text("Download per-question results").wait_for(timeout=30_000)
        page.screenshot(path=SHOTS / "evaluate.png", full_page=True)
    finally:
        page.close()
        demo.close()
