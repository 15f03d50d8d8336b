"""`python -m metis chat|route` on the random-weight fixture model."""

import json

from PIL import Image

from metis.__main__ import main


def test_route_prints_trace_json(tiny_checkpoint, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (112, 112), "red").save(image)
    code = main(["route", "--model", str(tiny_checkpoint), "--prompt", "How many squares?", "--image", str(image)])
    assert code == 0
    trace = json.loads(capsys.readouterr().out)
    assert {"p_think", "decision", "per_layer"} <= set(trace) and len(trace["per_layer"]) == 3


def test_chat_streams_sections(tiny_checkpoint, capsys):
    code = main(["chat", "--model", str(tiny_checkpoint), "--prompt", "hi", "--mode", "think",
                 "--max-new-tokens", "8"])
    captured = capsys.readouterr()
    assert code == 0
    assert "[router] p(think)=" in captured.err and "-> think" in captured.err
    assert " tokens, " in captured.err and "stop: " in captured.err and "[answer]" in captured.out


def test_bad_input_is_one_line_not_a_traceback(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    assert main(["route", "--model", str(tiny_checkpoint), "--prompt", "x", "--image", str(bad)]) == 2
    assert main(["chat", "--model", str(tiny_checkpoint), "--prompt", "x", "--threshold", "2"]) == 2
    err = capsys.readouterr().err
    assert "bad.png: the file is empty" in err and "threshold must be within" in err and "Traceback" not in err


def test_chat_defaults_are_the_generation_settings_defaults():
    """One source for the defaults: the CLI's are GenerationSettings' (the API's and the app's)."""
    from dataclasses import fields

    from metis.__main__ import build_parser
    from metis.serving.engine import GenerationSettings

    args = build_parser().parse_args(["chat", "--prompt", "q"])
    parsed = {f.name: getattr(args, f.name) for f in fields(GenerationSettings)}
    assert GenerationSettings(**parsed) == GenerationSettings()
