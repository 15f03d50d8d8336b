from collections import Counter

import pytest

from metis.tiny import world
from metis.tiny.tokenizer import SPECIAL_TOKENS, build_image_processor, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def train():
    return world.generate("train", 400)


def test_sample_is_deterministic_per_seed():
    a, b = world.sample(123), world.sample(123)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.question, a.reasoning, a.answer, a.cells) == (b.question, b.reasoning, b.answer, b.cells)
    assert world.sample(124).image.tobytes() != a.image.tobytes()


def test_splits_are_disjoint(train):
    key = lambda s: (s.image.tobytes(), s.question)
    test = world.generate("test", 400)
    assert not {key(s) for s in train} & {key(s) for s in test}
    assert not {key(s) for s in world.generate("val", 400)} & {key(s) for s in test}


def test_families_balanced_and_all_qtypes_present(train):
    assert Counter(s.family for s in train) == {"direct": 200, "reasoning": 200}
    for family, qtypes in world.QTYPES.items():
        assert {s.qtype for s in train if s.family == family} == set(qtypes)
    assert {s.family for s in world.generate("val", 50, family="reasoning")} == {"reasoning"}


def _expected_answer(s: world.Sample) -> str:
    """The answer recomputed from the drawn cells and what the question asked about."""
    items = [c for c in s.cells if c]
    shapes = [sh for _, sh in items]
    colours = [c for c, _ in items]
    p = s.params
    single = lambda plural: plural[:-1]  # noqa: E731
    if s.qtype == "count_shape":
        return str(shapes.count(single(p["p"])))
    if s.qtype == "count_all":
        return str(len(items))
    if s.qtype == "colour":
        assert shapes.count(p["s"]) == 1
        return colours[shapes.index(p["s"])]
    if s.qtype == "shape":
        assert colours.count(p["c"]) == 1
        return shapes[colours.index(p["c"])]
    if s.qtype == "cell":
        item = s.cells[p["cell"]]
        return f"{item[0]} {item[1]}" if item else "nothing"
    if s.qtype == "colour_at":
        return s.cells[p["cell"]][0]
    if s.qtype == "present":
        return "yes" if p["s"] in shapes else "no"
    if s.qtype == "count_diff":
        a, b = single(p["a"]), single(p["b"])
        assert shapes.count(a) >= shapes.count(b)
        return str(shapes.count(a) - shapes.count(b))
    if s.qtype == "total_sides":
        return str(sum(world.SIDES[sh] for sh in shapes))
    if s.qtype == "remain":
        assert shapes.count(p["s"]) >= p["removed"] >= 1
        return str(len(items) - p["removed"])
    if s.qtype == "not_colour":
        return str(sum(c != p["c"] for c in colours))
    if s.qtype == "kind_sides":
        return str(shapes.count(single(p["p"])) * world.SIDES[single(p["p"])])
    if s.qtype == "compare_two":
        nc, ns = colours.count(p["c"]), shapes.count(single(p["p"]))
        assert nc != ns
        return p["c"] if nc > ns else p["p"]
    a, b = p["ca"], p["cb"]
    assert colours.count(a) != colours.count(b)
    return a if colours.count(a) > colours.count(b) else b


def test_answers_follow_from_the_scene(train):
    for s in train:
        assert s.answer == _expected_answer(s), s
        assert s.reasoning and s.reasoning.endswith(".")
        listing = ", ".join(f"{c[0]} {c[1]}" if c else "none" for c in s.cells) + "."
        assert s.reasoning.startswith(listing)


def test_image_shows_the_recorded_items(train):
    for s in train[:100]:
        assert s.image.size == (112, 112) and s.image.mode == "RGB"
        px = s.image.load()
        for i, cell in enumerate(s.cells):
            ox, oy = (i % 2) * world.CELL, (i // 2) * world.CELL
            ink = sum(min(px[ox + x, oy + y]) < 200 for x in range(56) for y in range(56))
            if cell is None:
                assert ink == 0
                continue
            assert ink >= 700  # big enough to cover several merged image tokens
            # (28, 34) inside a cell lies inside every shape for every allowed size and jitter.
            rgb = px[ox + 28, oy + 34]
            dist = {c: sum((a - b) ** 2 for a, b in zip(ref, rgb)) for c, ref in world.COLOURS.items()}
            nearest = min(dist, key=dist.get)
            assert nearest == cell[0]


def test_format_target_and_answers_match(train):
    s = train[0]
    assert world.format_target(s, thinking=False) == f"<think></think><answer>{s.answer}</answer>"
    assert world.format_target(s, thinking=True) == f"<think>{s.reasoning}</think><answer>{s.answer}</answer>"
    assert world.answers_match(" Red. ", "red")
    assert not world.answers_match("12", "1")


def test_special_tokens_are_single_leading_ids(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for t in SPECIAL_TOKENS:
        ids = tok(t, add_special_tokens=False).input_ids
        assert ids == [SPECIAL_TOKENS.index(t)]
        assert tok.decode(ids, skip_special_tokens=False) == t


def test_user_typed_tags_are_plain_bytes(tok):
    text = "<think><|image_pad|><|im_end|>"
    ids = tok(text, split_special_tokens=True, add_special_tokens=False).input_ids
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_targets_round_trip_and_chains_are_short(tok, train):
    for s in train:
        for thinking in (False, True):
            target = world.format_target(s, thinking)
            ids = tok(target, add_special_tokens=False).input_ids
            assert tok.decode(ids, skip_special_tokens=False) == target
        assert len(tok(s.reasoning, add_special_tokens=False).input_ids) <= 56


def test_tokenizer_is_deterministic(tok):
    assert build_tokenizer().get_vocab() == tok.get_vocab()


def test_chat_template(tok):
    content = [{"type": "image"}, {"type": "text", "text": "How many shapes are there?"}]
    messages = [{"role": "user", "content": content}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{world.SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many shapes are there?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_image_processor_gives_8x8_grid(train):
    out = build_image_processor()([s.image for s in train[:2]], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert tuple(out["pixel_values"].shape) == (128, 3 * 2 * 14 * 14)


def test_questions_are_the_same_for_the_same_seeds():
    """500 samples per split, text and ground truth (not pixels), hashed: the question-type table
    (issue 25) drew exactly what the 14-branch chain it replaced drew for these seeds."""
    import hashlib

    h = hashlib.sha256()
    for split in world.SPLIT_BASE:
        for s in world.generate(split, 500, wording=split):
            h.update(repr((s.question, s.family, s.qtype, s.reasoning, s.answer, s.cells,
                           sorted(s.params.items()))).encode())
    assert h.hexdigest() == "f7ca60189082a48deb83d395662961055bf8b1b5a9934b339a653d4e9c8b2366"


def test_every_question_type_has_its_drawing():
    assert set(world.QUESTIONS) == {q for family in world.QTYPES.values() for q in family}
