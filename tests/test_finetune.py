"""Router fine-tuning: data validation, features, training, router files, CLI and the Gradio tab."""

import argparse
import dataclasses
import json
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metis.finetune import (
    DatasetError,
    RouterTrainer,
    TrainSettings,
    apply_router,
    cli,
    extract_features,
    load_dataset,
    load_router,
    metrics,
    train_router,
)
from metis.finetune.data import unpack_upload
from metis.tiny import world
from metis.ui.runtime import Runner

THINK = ["Work out the total of all sides.", "Subtract the squares from the circles.",
         "Compare both colours and reason which is more.", "Add the sides then subtract two."]
DIRECT = ["What colour is it?", "Name the shape.", "Is it red?", "Which hue?"]


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Labels separable by wording, one shared image: a random model can still learn them."""
    root = tmp_path_factory.mktemp("toy")
    world.sample(1).image.save(root / "img.png")
    rows = [{"text": f"{t} ({i})", "images": ["img.png"], "label": "think"} for i in range(8) for t in THINK]
    rows += [{"text": f"{t} ({i})", "label": "direct"} for i in range(8) for t in DIRECT]
    return load_dataset(write_jsonl(root / "toy.jsonl", rows))


@pytest.fixture(scope="module")
def toy_features(engine, toy):
    return extract_features(engine, toy)


def test_validation_lists_every_bad_line(tmp_path):
    world.sample(0).image.save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path.parent / "secret.png").write_bytes(b"x")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "fine", "images": ["ok.png"], "label": "think"},
        "{not json",
        {"images": [], "label": "direct"},
        {"text": "q", "label": "maybe"},
        {"text": "q", "images": ["broken.png"], "label": "direct"},
        {"text": "q", "images": ["../secret.png"], "label": "direct"},
        "",
        {"text": "q", "images": ["missing.png"], "label": "think"},
    ])
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 4", "line 5", "line 6", "line 8"]
    for text in ("bad JSON", "missing field 'text'", "unknown label 'maybe'", "unreadable image",
                 "outside the dataset's folder", "unreadable image 'missing.png'"):
        assert any(text in p for p in problems), text


def test_csv_and_limits(tmp_path, monkeypatch):
    world.sample(0).image.save(tmp_path / "a.png")
    (tmp_path / "d.csv").write_text('text,images,label\n"Sum it, please",a.png;a.png,think\n'
                                    'Colour?,,direct\nx,,bogus\n')
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path / "d.csv")
    assert info.value.problems == ["line 4: unknown label 'bogus' (expected one of think, direct)"]
    (tmp_path / "d.csv").write_text('text,images,label\n"Sum it, please",a.png;a.png,think\nColour?,,direct\n')
    examples = load_dataset(tmp_path / "d.csv")
    assert [(e.line, e.label, len(e.images)) for e in examples] == [(2, "think", 2), (3, "direct", 0)]
    monkeypatch.setattr("metis.finetune.data.MAX_BYTES", 10)
    with pytest.raises(DatasetError, match="too large"):
        load_dataset(tmp_path / "d.csv")


def test_unpack_upload_refuses_escaping_zip(tmp_path):
    archive = tmp_path / "up.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/d.jsonl", '{"text": "q", "label": "think"}\n')
        zf.writestr("../evil.txt", "x")
    with pytest.raises(DatasetError, match="outside"):
        unpack_upload([archive], tmp_path / "a")
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/d.jsonl", '{"text": "q", "images": ["i/x.png"], "label": "think"}\n')
        zf.writestr("data/i/x.png", b"bytes")
    assert unpack_upload([archive], tmp_path / "b").name == "d.jsonl"


def test_metrics():
    rng = np.random.default_rng(0)
    p, y = rng.integers(0, 5, 200) / 4, rng.random(200) < 0.5
    pairs = [(a > b) + 0.5 * (a == b) for a in p[y] for b in p[~y]]
    assert metrics.roc_auc(p, y) == pytest.approx(np.mean(pairs))
    p = np.linspace(0, 0.9, 10)  # (at p = 1.0 no threshold within [0, 1] sends nothing to think)
    assert (p >= metrics.threshold_for_ratio(p, 0.3)).mean() == pytest.approx(0.3)
    assert (p >= metrics.threshold_for_ratio(p, 0.0)).mean() == 0.0
    sweep = metrics.threshold_sweep(p, p > 0.5)
    assert sweep[0]["think_ratio"] == 1.0 and max(r["accuracy"] for r in sweep) == 1.0


def test_features_are_cached(engine, toy, toy_features, tmp_path):
    hidden = engine.model.config.text_config.hidden_size
    assert toy_features.inputs.shape == (len(toy), len(engine.model.moe_blocks()), hidden)
    again = extract_features(engine, toy, cache_dir=tmp_path)
    assert again.cached and again.seconds == 0.0 and torch.equal(again.inputs, toy_features.inputs)


def test_pooled_features_reproduce_the_routers_logits(engine, toy, toy_features):
    """gate(mean x) == mean gate(x): the feature path computes what routing computes."""
    gate = engine.model.moe_blocks()[0].gate.weight
    trace = engine.route(toy[0].messages())
    p = (toy_features.inputs[0, 0] @ gate.detach().T).softmax(-1)[engine.model.config.thinking_expert]
    assert float(p) == pytest.approx(trace.p_think, abs=1e-5)


def test_training_improves_routing_and_router_round_trips(engine, toy, toy_features, tmp_path):
    result = train_router(toy_features, TrainSettings(epochs=80, lr=0.05, batch_size=16, patience=0))
    s = result.summary
    assert s.val_accuracy_after > s.val_accuracy_before and s.val_accuracy_after >= 0.9
    assert len(result.history) == 80 and s.train_seconds > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.best_epoch = 0
    path = result.save(tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("val_accuracy_before", "val_accuracy_after", "val_auc_after", "threshold_sweep",
                "feature_seconds", "train_seconds", "epochs", "settings"):
        assert key in written
    router = load_router(path)
    assert router.keys() == engine.model.router_state_dict().keys()
    assert all(torch.equal(router[k], result.router[k]) for k in router)
    # the engine accepts it per call and keeps its own gates
    own = {k: v.clone() for k, v in engine.model.router_state_dict().items()}
    think = [ex for ex in toy if ex.label == "think"][0].messages()
    tuned = engine.route(think, router=router)
    assert tuned.decision == "think"
    assert all(torch.equal(own[k], v) for k, v in engine.model.router_state_dict().items())
    saved = engine.save_model(router, tmp_path / "model")
    from metis.serving.engine import Engine

    baked = Engine.load(str(saved))
    assert all(torch.equal(baked.model.router_state_dict()[k], router[k]) for k in router)
    assert baked.route(think).p_think == pytest.approx(tuned.p_think, abs=1e-6)
    apply_router(baked.model, own)
    assert baked.route(think).p_think == pytest.approx(engine.route(think).p_think, abs=1e-6)


def test_cancel_keeps_the_best_epoch_so_far(engine, toy_features):
    cancel = threading.Event()
    trainer = RouterTrainer(toy_features, TrainSettings(epochs=50, patience=0), cancel)
    for m in trainer:
        if m.epoch == 3:
            cancel.set()
    result = trainer.result()
    assert len(result.history) == 3 and result.summary.cancelled
    with pytest.raises(ValueError, match="epochs"):
        TrainSettings(epochs=0)


def test_early_stopping(engine, toy_features):
    result = train_router(toy_features, TrainSettings(epochs=500, lr=0.5, patience=3))
    assert len(result.history) < 500
    assert len(result.history) - result.summary.best_epoch == 3


def cli_args(**kw):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def refuse_to_load(*args, **kwargs):
    raise AssertionError("an invalid dataset is refused before the model loads")


def test_cli(tiny_checkpoint, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "q", "label": "think"}, "oops", {"label": "direct"}])
    assert cli.main(cli_args(data=bad, out=tmp_path / "o"), load_engine=refuse_to_load) == 2
    err = capsys.readouterr().err
    assert "line 2: bad JSON" in err and "line 3: missing field 'text'" in err
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t, "label": "think"} for t in THINK]
                       + [{"text": t, "label": "direct"} for t in DIRECT])
    from metis.serving.engine import Engine

    args = cli_args(data=good, out=tmp_path / "o", model=tiny_checkpoint, epochs=3, target_ratio=0.5)
    assert cli.main(args, Engine.load) == 0
    assert (tmp_path / "o" / "router.safetensors").exists()
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["target_threshold"] is not None


def run_tab(runner, files, use_sample=False, epochs=3, job=None):
    from metis.ui.finetune import start
    from metis.ui.session import Job

    return list(start(runner, files, use_sample, epochs, 0.05, 16, 0.2, 0, 0, 0.5, job or Job()))


def test_tab_handlers(engine, tmp_path):
    from metis.ui.finetune import cancel, start, use_in_chat
    from metis.ui.session import Job
    from metis.ui.wiring import KEEP

    runner, job = Runner(engine), Job()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "q", "label": "perhaps"}])
    (update,) = run_tab(runner, [str(bad)])
    status = update.status
    assert "cannot be used" in status and "line 1: unknown label" in status and "Traceback" not in status
    for update in start(runner, [], True, 3, 0.05, 16, 0.2, 0, 0, 0.5, job):
        download = update.download
        if isinstance(download, dict) and download.get("value"):  # read it while the run's folder exists
            saved = load_router(download["value"]).keys()
    status, summary, confusion, result = update.status, update.summary, update.confusion, update.result
    assert status == "Done." and "Validation accuracy" in summary and len(confusion) == 4
    assert saved == result.router.keys() and not Path(download["value"]).exists()  # removed with its run
    handed = use_in_chat(result)
    assert handed.router_weights is result.router and "this browser session" in handed.status
    assert use_in_chat(None).router_weights is KEEP  # nothing trained: the chat's router stays
    assert cancel(job).status == "Nothing to cancel."  # the run is over


def test_tab_removes_the_unpacked_upload(engine, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": "think"} for t in THINK]
                       + [{"text": t, "label": "direct"} for t in DIRECT])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert run_tab(Runner(engine), [str(data)], epochs=2)[-1].status == "Done."
    assert not list((tmp_path / "tmp").glob("metis-finetune-*"))


def test_tab_failed_run_says_why_and_leaves_the_router(engine, monkeypatch):
    from metis.ui import finetune as tab_module
    from metis.ui.session import Job

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    before = {k: v.clone() for k, v in engine.model.router_state_dict().items()}
    job = Job()
    monkeypatch.setattr(tab_module.RouterTrainer, "result", broken)
    status = run_tab(Runner(engine), [], use_sample=True, epochs=2, job=job)[-1].status
    assert status.startswith("### The run failed") and "RuntimeError: disk full" in status
    assert "Traceback" not in status and job.cancel is None
    assert all(torch.equal(v, before[k]) for k, v in engine.model.router_state_dict().items())
    monkeypatch.undo()
    assert run_tab(Runner(engine), [], use_sample=True, epochs=2, job=job)[-1].status == "Done."  # the next run works


def test_tab_cancel(engine):
    from metis.ui.finetune import cancel, start
    from metis.ui.session import Job

    job = Job()
    run = start(Runner(engine), [], True, 100, 0.05, 16, 0.2, 0, 0, 0.5, job)
    next(run)  # features under way
    for status in (update.status for update in run):
        if status.startswith("Epoch 2/"):
            assert cancel(job).status == "Cancelling…"
    assert status.startswith("Cancelled") and job.cancel is None


def test_tab_cancel_while_queued(engine):
    """Cancel pressed while the run waits for the slot: it never starts, and the next one does."""
    from metis.ui.finetune import cancel, enqueue, start
    from metis.ui.session import Job

    job = Job()
    assert "Waiting" in enqueue(job).status
    assert cancel(job).status == "Cancelling…"
    (update,) = start(Runner(engine), [], True, 3, 0.05, 16, 0.2, 0, 0, 0.5, job)
    assert update.status == "Cancelled before it started." and job.cancel is None
    enqueue(job)
    assert run_tab(Runner(engine), [], use_sample=True, epochs=2, job=job)[-1].status == "Done."


def page_event(url: str, demo, api_name: str, data: list) -> list:
    """Run one of the page's own events as the browser does (they are not API endpoints, so
    gradio_client cannot): join the queue, read the session's messages to the event's end."""
    import uuid

    import httpx

    fn_index = next(fn._id for fn in demo.fns.values() if fn.api_name == api_name)
    session = uuid.uuid4().hex
    with httpx.Client(base_url=url + "gradio_api", timeout=300) as http:
        http.post("/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session}).raise_for_status()
        with http.stream("GET", "/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_completed":
                    return message["output"]["data"]
    raise AssertionError("the event never completed")


def test_tab_served_for_real(engine, tmp_path):
    """The tab served for real, driven as the page drives it: bad data comes back as a readable
    message, the sample trains."""
    import gradio as gr
    import httpx

    from metis.ui import finetune

    with gr.Blocks() as demo:
        finetune.build(Runner(engine), gr.State(None))
    demo.queue().launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        bad = write_jsonl(tmp_path / "bad.jsonl", ["{", {"text": "q", "label": "think"}])
        with open(bad, "rb") as f:
            path = httpx.post(demo.local_url + "gradio_api/upload", files={"files": (bad.name, f)}).json()[0]
        upload = {"path": path, "orig_name": bad.name, "meta": {"_type": "gradio.FileData"}}
        # the last input is the session's Job (gr.State): the server fills it in, as for the page
        status, *_ = page_event(demo.local_url, demo, "start", [[upload], False, 2, 0.05, 16, 0.2, 0, 0, 0.5, None])
        assert "line 1: bad JSON" in status
        status, *_, download = page_event(demo.local_url, demo, "start",
                                          [[], True, 2, 0.05, 16, 0.2, 0, 0, 0.5, None])
        saved = load_router(download["value"]["path"])
        assert status == "Done." and saved.keys() == engine.model.router_state_dict().keys()
    finally:
        demo.close()
