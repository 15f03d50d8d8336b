"""What one request may cost, and how it is told when it asks for more: malformed API values,
the format's tags in the answer, image pixels, fine-tuning uploads, prompt tokens and time."""

import json
import urllib.request

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from loadtest import free_port

from metis.ui import build_demo


@pytest.fixture(scope="module")
def app(engine):
    demo = build_demo(engine)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo.local_url.rstrip("/")
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    return Client(app, verbose=False)


HI = {"text": "hi", "files": []}
MALFORMED_MESSAGES = [
    ("abc", "message must be an object"),
    (None, "message must be an object"),
    (["hi"], "message must be an object"),
    ({"text": 5}, "message.text must be a string"),
    ({"text": "hi", "files": "x.png"}, "message.files must be a list"),
    ({"text": "hi", "files": [5]}, r"message.files\[0\] must be a file"),
    ({"text": "hi", "files": [{"path": "x.png"}]}, "message.files: each file must be uploaded"),
]
# parameter -> (bad value, what the message must say); every parameter of /chat besides `message`
MALFORMED_SETTINGS = [
    ("mode", None, "mode must be one of auto, think, direct"),
    ("mode", 5, "mode must be one of auto, think, direct"),
    ("mode", "fast", "mode must be one of auto, think, direct"),
    ("threshold", "abc", "threshold must be a number"),
    ("threshold", [0.5], "threshold must be a number"),
    ("threshold", 2, r"threshold must be within \[0, 1\]"),
    ("thinking_budget", "abc", "thinking_budget must be a number"),
    ("thinking_budget", 2.5, r"thinking_budget must be a whole number \(integer\), got 2.5"),
    ("thinking_budget", True, "thinking_budget must be a number"),
    ("thinking_budget", -1, "thinking_budget must be within"),
    ("max_new_tokens", None, "max_new_tokens must be a number"),
    ("max_new_tokens", "many", "max_new_tokens must be a number"),
    ("max_new_tokens", 12.5, "max_new_tokens must be a whole number"),
    ("max_new_tokens", 0, "max_new_tokens must be within"),
    ("temperature", "hot", "temperature must be a number"),
    ("temperature", None, "temperature must be a number"),
    ("temperature", 100, "temperature must be within"),
    ("top_p", [1], "top_p must be a number"),
    ("top_p", {}, "top_p must be a number"),
    ("top_p", 0, "top_p must be within"),
]
ROUTE_PARAMETERS = ("mode", "threshold")


@pytest.mark.parametrize("api", ["/chat", "/route"])
@pytest.mark.parametrize("message, says", MALFORMED_MESSAGES)
def test_malformed_message_is_named(client, api, message, says):
    with pytest.raises(AppError, match=says):
        client.predict(message, api_name=api)


@pytest.mark.parametrize("name, value, says", MALFORMED_SETTINGS)
def test_malformed_chat_setting_is_named(client, name, value, says):
    with pytest.raises(AppError, match=says) as raised:
        client.predict(HI, api_name="/chat", **{name: value})
    assert "direct, token" not in str(raised.value)  # the hidden mode is never listed


@pytest.mark.parametrize("name, value, says", [c for c in MALFORMED_SETTINGS if c[0] in ROUTE_PARAMETERS])
def test_malformed_route_setting_is_named(client, name, value, says):
    with pytest.raises(AppError, match=says):
        client.predict(HI, api_name="/route", **{name: value})


def raw_call(app: str, api: str, data_json: str) -> str:
    """A request as any HTTP client may send it (gradio_client cannot send NaN): the error text."""
    request = urllib.request.Request(f"{app}/gradio_api/call{api}", data=f'{{"data": {data_json}}}'.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{app}/gradio_api/call{api}/{event}", timeout=60) as response:
        return response.read().decode()


@pytest.mark.parametrize("api, data, says", [
    ("/chat", '[{"text": "hi", "files": []}, "auto", 0.5, NaN, 8, 0, 1]', "thinking_budget must be a finite number"),
    ("/chat", '[{"text": "hi", "files": []}, "auto", 0.5, 0, Infinity, 0, 1]', "max_new_tokens must be a finite"),
    ("/route", '[{"text": "hi", "files": []}, "auto", NaN]', "threshold must be a finite number"),
])
def test_nan_and_infinity_are_named(app, api, data, says):
    stream = raw_call(app, api, data)
    assert "event: error" in stream and says in stream and "null" not in stream.split("event: error")[1]


def test_null_threshold_and_budget_mean_the_defaults(client):
    assert client.predict(HI, mode="direct", threshold=None, thinking_budget=None, max_new_tokens=2.0,
                          api_name="/chat")
    assert client.predict(HI, mode="Think", threshold=None, api_name="/route")["mode"] == "think"


def test_a_server_file_named_in_a_forged_upload_is_refused(app):
    forged = '[{"text": "hi", "files": [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}]}, "auto", 0.5]'
    stream = raw_call(app, "/route", forged)
    assert "event: error" in stream and "root:" not in stream


# -- the format's tags never reach the displayed text ---------------------------------------------

from metis.streaming import AnswerDelta, OutputParser, ReasoningDelta  # noqa: E402

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def parse(pieces):
    parser = OutputParser()
    events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
    return ("".join(e.text for e in events if isinstance(e, ReasoningDelta)),
            "".join(e.text for e in events if isinstance(e, AnswerDelta)))


@pytest.mark.parametrize("text, expected", [
    ("<think>a</think><answer>b</answer>", ("a", "b")),
    ("<think>a <think>b</think><answer>c</answer>", ("a b", "c")),
    ("<think>a</answer> b</think><answer>c</answer>", ("a b", "c")),
    ("<think>a<answer>b</answer>", ("a", "b")),  # the answer opened while still reasoning
    ("</think>b", ("", "b")),
    ("</answer>b", ("", "b")),
    ("<answer>b <think>c</think> d <answer>e</answer>", ("", "b c d e")),
    ("plain <think>x</think> answer</answer> after", ("", "plain x answer")),
    ("<think></think><answer>b</answer></think><think>", ("", "b")),
    ("<think></think> <think>more</think> <answer>b", ("more", "b")),
    ("<answer>b</ans", ("", "b")),  # cut off by the token limit mid-tag
    ("<answer>x < y and y<z", ("", "x < y and y<z")),
])
def test_stray_tags_are_absorbed_wherever_they_are(text, expected):
    assert parse([text]) == expected
    assert parse(list(text)) == expected  # one character at a time: every tag split across pieces
    for cut in range(1, len(text)):
        assert parse([text[:cut], text[cut:]]) == expected


@pytest.mark.parametrize("seed", range(50))
def test_no_tag_survives_random_mixtures(seed):
    import random

    rng = random.Random(seed)
    words = [*TAGS, "x", " y", "<", "</", "<thin", "k>", "answer", ">", "\n"]
    pieces = [rng.choice(words) for _ in range(60)]
    reasoning, answer = parse(pieces)
    for tag in TAGS:
        assert tag not in reasoning and tag not in answer


# -- fine-tuning uploads: one budget per run ---------------------------------------------------------

import zipfile  # noqa: E402

from metis.finetune.data import DatasetError, UploadBudget, unpack_upload  # noqa: E402


def small_zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return str(path)


def test_many_zips_of_one_run_never_unpack_more_than_its_budget(tmp_path):
    zips = [small_zip(tmp_path / f"part{i}.zip", {f"p{i}/blob.bin": b"\0" * 400_000}) for i in range(6)]
    budget = UploadBudget(max_bytes=1_000_000)
    with pytest.raises(DatasetError, match=r"part2.zip: the uploads of this run would unpack to 1 MiB, at most 0 MiB"):
        unpack_upload(zips, tmp_path / "run", budget)
    unpacked = sum(p.stat().st_size for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert unpacked == 800_000 <= budget.max_bytes


def test_files_are_counted_across_zips_and_loose_uploads(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "q", "label": "think"}\n')
    archive = small_zip(tmp_path / "many.zip", {f"{i}.txt": b"x" for i in range(5)})
    with pytest.raises(DatasetError, match="many.zip: the uploads of this run would hold 11 files, at most 6"):
        unpack_upload([str(tmp_path / "d.jsonl"), archive, archive], tmp_path / "run", UploadBudget(max_files=6))


# -- prompt tokens and time per request -------------------------------------------------------------

import time  # noqa: E402

from bench.fairness import long_conversation  # noqa: E402
from metis.budget import RequestLimits, count_tokens  # noqa: E402
from metis.prompting import Message, PromptError  # noqa: E402
from metis.serving.interface import GenerationSettings  # noqa: E402
from metis.streaming import Done, Notice  # noqa: E402
from metis.ui.events import ChatTurn  # noqa: E402


@pytest.fixture
def limits(engine):
    saved = engine.limits
    yield lambda **kw: setattr(engine, "limits", RequestLimits(**kw))
    engine.limits = saved


def test_an_over_long_conversation_is_refused_at_once(engine, limits):
    limits(max_prompt_tokens=4096, overflow="refuse")
    start = time.perf_counter()
    with pytest.raises(PromptError, match=r"over this server's limit of 512 tokens per request \(images included\)"):
        list(engine.stream(long_conversation(), GenerationSettings(max_new_tokens=4)))
    assert time.perf_counter() - start < 1.0  # limit: min(4096, the fixture model's 512-position context)


def test_an_over_long_conversation_is_trimmed_with_a_note(engine, limits):
    limits(max_prompt_tokens=4096, overflow="trim")
    events = list(engine.stream(long_conversation(), GenerationSettings(mode="direct", max_new_tokens=4)))
    assert isinstance(events[0], Notice) and "oldest 32 message(s) were left out" in events[0].text
    assert isinstance(events[-1], Done)
    turn = ChatTurn()
    for event in events:
        turn.feed(event)
    assert turn.messages()[0]["metadata"]["title"] == "ℹ️ Note"


def test_image_tokens_are_counted_without_processing_pixels(engine):
    from PIL import Image

    messages = [Message("user", "what?", [Image.new("RGB", (300, 200)), Image.new("RGB", (56, 56))])]
    assert count_tokens(engine.prompts, messages) == engine.prompts.build(messages)["input_ids"].shape[1]


def test_no_answer_holds_the_model_past_its_deadline(engine, limits, long_question_messages):
    limits(max_seconds=0.5)
    start = time.perf_counter()
    events = list(engine.stream(long_question_messages, GenerationSettings(mode="think", max_new_tokens=16384)))
    assert events[-1].stats.stop_reason == "deadline" and time.perf_counter() - start < 5


@pytest.fixture
def long_question_messages():
    from PIL import Image

    return [Message("user", "How many squares are there?", [Image.new("RGB", (112, 112), "white")])]


# -- memory of one request's images, measured in a fresh process (tests/rss_probe.py) ---------------

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def probe(kind: str, target) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "rss_probe.py"), kind, str(target)], cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_images_at_the_pixel_cap_stay_under_a_gigabyte(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (7300, 5479), (200, 30, 30))  # 40.0 Mpixel, the per-image cap
    image.save(tmp_path / "a.jpg")
    image.save(tmp_path / "b.png")
    del image
    measured = probe("chat", tmp_path)
    assert measured["outcome"] == "ok"
    assert measured["peak_above_mib"] < 1024 and measured["after_above_mib"] < 100, measured


def test_a_zip_of_huge_images_is_refused_from_its_headers(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (13000, 13000)).save(buf, "PNG")
    rows = []
    with zipfile.ZipFile(tmp_path / "big.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for r in range(4):
            names = [f"img/{r}_{i}.png" for i in range(8)]
            for name in names:
                zf.writestr(name, buf.getvalue())
            rows.append(json.dumps({"text": f"q{r}", "images": names, "label": "think"}))
        zf.writestr("d.jsonl", "\n".join(rows) + "\n")
    measured = probe("finetune", tmp_path / "big.zip")
    assert "32 problem(s)" in measured["outcome"] and "too large to decode" in measured["outcome"]
    assert measured["peak_above_mib"] < 1024 and measured["after_above_mib"] < 100, measured
