"""Evaluation on your own data: the format and its refusals, the matching rules, the curve against
real auto runs, the report, the built-in samples, the CLI and the tab's handlers."""

import json
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageChops

from metis.__main__ import main as cli
from metis.evaluation import samples
from metis.evaluation.dataset import DatasetError, load_questions, load_upload
from metis.evaluation.matching import extract, is_correct
from metis.evaluation.report import GRID, curve, report, routed, rows
from metis.evaluation.runner import Cancelled, RunSettings, answer, evaluate
from metis.tiny import world
from metis.ui.runtime import Runner


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def embedded():
    from metis.serving.engine import Engine

    return Engine.load()


@pytest.fixture(scope="module")
def sample_results(embedded):
    """The embedded model on 42 questions of its built-in sample (three of each task)."""
    questions = load_questions(samples.TINY_FILE)[:42]
    return evaluate(embedded.stream, questions, RunSettings(0.5, 96, embedded.concurrency))


# -- the format --------------------------------------------------------------------------------

def test_a_dataset_loads_with_choices_numbers_and_labels(tmp_path):
    world.sample(0).image.save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "How many?", "images": ["a.png"], "answer": 3, "category": "direct/count"},
        {"question": "Which one?", "answer": "B", "choices": ["red", "blue"], "category": "charts"},
        "",
        {"question": "Plain", "answer": "yes", "category": "think"},
    ])
    first, second, third = load_questions(path)
    assert first.answer == "3" and first.images == (tmp_path / "a.png",) and first.label == "direct"
    assert second.prompt() == "Which one?\nA. red\nB. blue" and second.label is None
    assert third.line == 4 and third.label == "think" and third.images == ()
    assert len(first.messages()[0].images) == 1


def test_every_bad_line_is_refused_with_its_number(tmp_path):
    world.sample(0).image.save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "fine", "images": ["ok.png"], "answer": "x"},
        "{not json",
        {"images": [], "answer": "x"},
        {"question": "q"},
        {"question": "q", "answer": True},
        {"question": "q", "answer": "C", "choices": ["a", "b"]},
        {"question": "q", "answer": "a", "choices": "a,b"},
        {"question": "q", "answer": "x", "images": ["../ok.png"]},
        {"question": "q", "answer": "x", "images": ["broken.png"]},
        {"question": "q", "answer": "x", "category": "c" * 101},
        {"question": "q" * 8001, "answer": "x"},
    ])
    with pytest.raises(DatasetError) as info:
        load_questions(path)
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == [f"line {n}" for n in range(2, 12)]
    for text in ("bad JSON", "missing field 'question'", "missing field 'answer'", "'answer' must be",
                 "neither a choice's letter (A-B)", "'choices' must be a list", "outside the dataset's folder",
                 "unreadable image", "category too long", "question too long"):
        assert any(text in p for p in problems), text


def test_file_level_refusals_and_zip_uploads(tmp_path):
    (tmp_path / "d.csv").write_text("question,answer\nq,a\n")
    with pytest.raises(DatasetError, match="expected a .jsonl file"):
        load_questions(tmp_path / "d.csv")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="the dataset is empty"):
        load_questions(tmp_path / "e.jsonl")
    archive = tmp_path / "up.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("set/q.jsonl", json.dumps({"question": "q", "images": ["img/a.png"], "answer": "a"}))
        zf.write(samples.TINY_FILE.parent / "images" / "000.png", "set/img/a.png")
    (question,) = load_upload([archive], tmp_path / "unpacked")
    assert question.images[0].name == "a.png"
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../../evil.jsonl", "{}")
    with pytest.raises(DatasetError, match="outside"):
        load_upload([tmp_path / "evil.zip"], tmp_path / "evil")


# -- the matching rules --------------------------------------------------------------------------

@pytest.mark.parametrize("output,expected,choices,right", [
    ("B", "B", ("Q1", "Q4"), True), ("(b)", "B", ("Q1", "Q4"), True), ("B. Q4", "B", ("Q1", "Q4"), True),
    ("q4", "B", ("Q1", "Q4"), True), ("B: 36", "Q4", ("Q1", "Q4"), True), ("A", "B", ("Q1", "Q4"), False),
    ("Q4 by far", "B", ("Q1", "Q4"), False), ("A circle", "B", ("Q1", "Q4"), False),
    ("14.4", "14.40", (), True), ("$14.40", "14.40", (), True), ("The total is 14.40.", "14.40", (), True),
    ("14.5", "14.40", (), False), ("14.40 plus tax 1", "14.40", (), False), ("3.1416", "3.14", (), True),
    ("99", "100", (), False), ("70", "70°", (), True), ("1,234", "1234", (), True), ("50%", "50", (), True),
    ("0.5", "50%", (), False), ("three", "3", (), False),
    ("Red circle.", "red circle", (), True), ("**red  circle**", "red circle", (), True),
    ("a red circle", "red circle", (), False), ("red", "red circle", (), False),
])
def test_matching_rules(output, expected, choices, right):
    assert is_correct(output, expected, choices) is right


def test_the_answer_is_taken_from_the_answer_tag_boxed_or_last_line():
    assert extract("<think>2+2</think><answer>4</answer>") == "4"
    assert extract("so the answer is \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract("First, count.\nThen 7\n\n") == "Then 7"
    assert is_correct("reasoning...\n<answer>The angle is \\boxed{70}</answer>", "70°")


# -- the runs, the curve and the report ------------------------------------------------------------

def test_the_curve_equals_real_auto_runs_at_two_thresholds(embedded, sample_results):
    """Auto routing at t rebuilt from the think and direct runs gives the same answers, tokens and
    accuracy as running auto at t, at the model's threshold and at one that routes differently."""
    p = sorted({o.p_think for o in sample_results.outcomes["auto"]})
    gaps = [(b - a, (a + b) / 2) for a, b in zip(p, p[1:]) if 0.05 < (a + b) / 2 < 0.95 and not a < 0.5 <= b]
    other = max(gaps)[1]  # the middle of the widest gap not holding 0.5: no p_think near it
    questions = sample_results.questions
    for threshold in (0.5, round(other, 4)):
        settings = RunSettings(threshold, 96, embedded.concurrency)
        with ThreadPoolExecutor(embedded.concurrency) as pool:
            real = list(pool.map(lambda i, s=settings: answer(embedded.stream, questions, i, "auto", s,
                                                              threading.Event()), range(len(questions))))
        rebuilt = routed(sample_results, threshold)
        assert [(o.answer, o.correct, o.tokens) for o in real] == [(o.answer, o.correct, o.tokens) for o in rebuilt]
        assert [o.decision for o in real] == [o.decision for o in rebuilt]
        point = next(c for c in curve(sample_results) if c["threshold"] == threshold) if threshold in GRID else None
        if point:
            assert point["accuracy"] == sum(o.correct for o in real) / len(real)
    assert sum(o.decision == "think" for o in routed(sample_results, other)) != \
        sum(o.decision == "think" for o in routed(sample_results, 0.5)), "the two thresholds route differently"


def test_report_keys_end_points_and_categories(sample_results):
    rep = report(sample_results)
    for mode in ("auto", "think", "direct"):
        assert {"accuracy", "mean_tokens", "mean_seconds"} <= rep["modes"][mode].keys()
    assert all({"threshold", "accuracy", "mean_tokens", "think_share"} <= p.keys() for p in rep["curve"])
    first, last = rep["curve"][0], rep["curve"][-1]
    assert first["threshold"] == 0 and first["accuracy"] == rep["modes"]["think"]["accuracy"]
    if max(o.p_think for o in sample_results.outcomes["auto"]) < 1:
        assert last["think_share"] == 0 and last["mean_tokens"] == rep["modes"]["direct"]["mean_tokens"]
    cats = rep["categories"]
    assert {"think", "direct", "think/count_diff", "direct/colour"} <= cats.keys()
    assert cats["direct/colour"]["questions"] == 3 and 0 <= cats["think"]["routing_agreement"] <= 1
    assert rep["modes"]["think"]["think_share"] == 1 and rep["modes"]["direct"]["think_share"] == 0
    assert len(rows(sample_results)) == 3 * 42
    json.dumps(rep)


def test_targets_on_the_embedded_model(embedded):
    """The issue's targets on the whole held-out sample (BENCHMARKS.md has the measured numbers)."""
    questions = load_questions(samples.TINY_FILE)
    rep = report(evaluate(embedded.stream, questions, RunSettings(0.5, 96, embedded.concurrency)))
    auto, think, direct = (rep["modes"][m] for m in ("auto", "think", "direct"))
    assert len(questions) >= 80 and len(rep["curve"]) >= 5 and len(rep["categories"]) >= 5
    assert auto["accuracy"] >= think["accuracy"] - 0.02
    assert auto["mean_tokens"] <= 0.7 * think["mean_tokens"]
    assert think["accuracy"] > direct["accuracy"]


def test_cancel_ends_the_runs(embedded):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        evaluate(embedded.stream, load_questions(samples.TINY_FILE)[:4], RunSettings(0.5, 96, 4), cancel)
    with pytest.raises(ValueError, match="threshold"):
        RunSettings(2.0)


# -- the built-in samples ----------------------------------------------------------------------------

def test_the_shipped_samples_are_what_the_generator_draws(tmp_path):
    samples.write_tiny(tmp_path / "tiny" / "questions.jsonl")
    assert (tmp_path / "tiny" / "questions.jsonl").read_text() == samples.TINY_FILE.read_text()
    for name in ("000.png", "057.png", "111.png"):
        drawn, shipped = (Image.open(d / "images" / name).convert("RGB")
                          for d in (tmp_path / "tiny", samples.TINY_FILE.parent))
        assert ImageChops.difference(drawn, shipped).getbbox() is None
    questions = load_questions(samples.TINY_FILE)
    assert len(questions) == 112 and len({q.category for q in questions}) == 14
    real = load_questions(samples.REAL_FILE)
    assert [is_correct(out, q.answer, q.choices) for out, q in
            zip(["B", "58", "x = 70°", "$14.40", "7.40", "Corner Cafe."], real)] == [True] * 6
    tiny, real = samples.SAMPLES
    assert {samples.sample_for(info) for info in (None, {"checkpoint": "embedded tiny"},
                                                   {"checkpoint": "/x/assets/metis-home-tiny"})} == {tiny}
    assert {samples.sample_for(info) for info in ({"checkpoint": "mmthinking/Metis-HOME"},
                                                   {"router": "r", "think_endpoint": "http://x"})} == {real}


# -- the CLI and the tab ------------------------------------------------------------------------------

def small_dataset(tmp_path):
    rows = []
    for i, s in enumerate(world.generate("test", 4, wording="test")):
        s.image.save(tmp_path / f"{i}.png")
        rows.append({"question": s.question, "images": [f"{i}.png"], "answer": s.answer,
                     "category": f"{'think' if s.family == 'reasoning' else 'direct'}/{s.qtype}"})
    return write_jsonl(tmp_path / "small.jsonl", rows)


def test_cli(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli(["eval", "--data", str(small_dataset(tmp_path)), "--json", str(out), "--limit", "3",
                "--max-new-tokens", "96"]) == 0
    rep = json.loads(out.read_text())
    assert rep["questions"] == 3 and set(rep["modes"]) == {"auto", "think", "direct"}
    assert "| mode | accuracy |" in capsys.readouterr().out
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    assert cli(["eval", "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "line 1: missing field 'answer'" in capsys.readouterr().err


def test_tab_handlers(engine, tmp_path):
    from metis.ui.evaluate import cancel, prepare, start
    from metis.ui.session import Job

    runner, job = Runner(engine), Job()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "z", "choices": ["x", "y"]}])
    prepare(job)
    (update,) = list(start(runner, [str(bad)], None, 0.5, 32, 10, job, None))
    assert "cannot be used" in update.status and "line 1: answer 'z'" in update.status
    data = small_dataset(tmp_path)
    files = [str(data)] + [str(tmp_path / f"{i}.png") for i in range(4)]
    prepare(job)
    for update in start(runner, files, None, 0.5, 32, 10, job, None):
        if isinstance(update.download, dict):
            csv_text = open(update.download["value"]).read()  # read it while the run's folder exists
    assert "4 questions" in update.status and len(update.modes) == 3
    assert update.curve.data and csv_text.startswith("line,question,category,mode,answer")
    assert len(csv_text.strip().splitlines()) == 1 + 3 * 4
    assert cancel(job).status == "Nothing to cancel."  # the run is over
    prepare(job)
    assert cancel(job).status == "Cancelling…"
    assert list(start(runner, [], list(samples.SAMPLES)[0], 0.5, 32, 10, job, None))[-1].status == "Cancelled."
    (update,) = list(start(runner, [], list(samples.SAMPLES)[0], 0.5, 0, 10, job, None))
    assert "Invalid settings" in update.status and "max_new_tokens" in update.status


def test_tab_events_are_not_api_endpoints_and_go_with_fine_tuning(engine):
    from metis.ui import build_demo

    def tab_fns(demo):
        return [f for f in demo.fns.values() if getattr(f.fn, "__module__", None) == "metis.ui.evaluate"]

    found = tab_fns(build_demo(engine))
    assert len(found) == 3 and all(f.api_visibility == "private" for f in found)
    assert not tab_fns(build_demo(engine, finetune=False))  # a public deployment (METIS_FINETUNE=0)
